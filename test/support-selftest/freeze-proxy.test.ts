/**
 * Self-test of test/support/freeze-proxy.ts against a real PostgreSQL: a
 * frozen connection goes silent in both directions (no result, no 'error',
 * no 'end', the server never sees the query), new connections still work,
 * the blackhole mode hangs new connections too, thaw() delivers what was
 * held, reset() is an ECONNRESET, close() ends everything.
 */
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import pg from 'pg';
import { adminUrl } from '../support/db.ts';
import { startFreezeProxy, type FreezeProxy } from '../support/freeze-proxy.ts';
import { waitFor } from '../support/wait.ts';

// the shared test cluster (nothing here stops or crashes it)
const cluster = {
  url: (): string => adminUrl(),
  get port(): number {
    return Number(new URL(adminUrl()).port);
  },
};
const proxies: FreezeProxy[] = [];
const clients: pg.Client[] = [];

after(async () => {
  for (const p of proxies) await p.close();
  await Promise.allSettled(clients.map((c) => c.end()));
});

async function proxy(): Promise<FreezeProxy> {
  const p = await startFreezeProxy(cluster.port);
  proxies.push(p);
  return p;
}

interface Watched {
  client: pg.Client;
  events: string[];
}

/** A pg.Client that records its 'error' and 'end' events instead of crashing the process. */
function watched(url: string, extra: pg.ClientConfig = {}): Watched {
  const client = new pg.Client({ connectionString: url, ...extra });
  const events: string[] = [];
  client.on('error', (err) => events.push(`error: ${err.message}`));
  client.on('end', () => events.push('end'));
  clients.push(client);
  return { client, events };
}

type Outcome = { settled: false } | { settled: true; ok: boolean; value: unknown };

/** Starts `p` and reports whether it settled within `ms` (it keeps running either way). */
async function within(p: Promise<unknown>, ms: number): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p.then(
        (value) => ({ settled: true as const, ok: true, value }),
        (value: unknown) => ({ settled: true as const, ok: false, value }),
      ),
      new Promise<Outcome>((resolve) => (timer = setTimeout(() => resolve({ settled: false }), ms))),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function serverSees(marker: string): Promise<boolean> {
  const admin = new pg.Client({ connectionString: cluster.url() });
  await admin.connect();
  try {
    const { rows } = await admin.query<{ n: string }>(
      "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
      [marker],
    );
    return Number(rows[0]!.n) > 0;
  } finally {
    await admin.end();
  }
}

describe('freeze proxy', () => {
  test('forwards; freeze() silences existing connections both ways while new ones work; close() ends them', async () => {
    const p = await proxy();
    const old = watched(p.url(cluster.url()));
    await old.client.connect();
    assert.equal((await old.client.query<{ v: number }>('SELECT 1 AS v')).rows[0]!.v, 1);
    const { rows } = await old.client.query<{ port: number }>('SELECT inet_server_port() AS port');
    assert.equal(rows[0]!.port, cluster.port, 'the proxy forwards to the target');
    assert.equal(p.connections, 1);

    p.freeze();
    assert.equal(p.frozenConnections, 1);
    const marker = `frozen_${Date.now()}`;
    const pending = old.client.query(`SELECT '${marker}' AS m, pg_backend_pid()`);
    const outcome = await within(pending, 2000);
    assert.equal(outcome.settled, false, 'a query on a frozen connection must not complete');
    assert.deepEqual(old.events, [], 'no error and no end on a frozen connection');
    assert.equal(await serverSees(marker), false, 'the query never reached the server');

    // a new connection through the same proxy is not frozen
    const fresh = watched(p.url(cluster.url()));
    await fresh.client.connect();
    assert.equal((await fresh.client.query<{ v: number }>('SELECT 2 AS v')).rows[0]!.v, 2);
    assert.equal(p.connections, 2);
    assert.equal(p.frozenConnections, 1);

    await p.close();
    await p.close(); // idempotent
    const after = await within(pending, 10_000);
    assert.equal(after.settled, true, 'close() ends the frozen connection');
    assert.equal(after.settled && after.ok, false, 'its query fails');
    await waitFor(() => old.events.length > 0 && fresh.events.length > 0, "both clients' end/error events");
    assert.equal(p.connections, 0);
    await assert.rejects(
      new pg.Client({ connectionString: p.url(cluster.url()), connectionTimeoutMillis: 5000 }).connect(),
      'nobody listens after close()',
    );
  });

  test('thaw(): what was held is delivered, the frozen query completes', async () => {
    const p = await proxy();
    const c = watched(p.url(cluster.url()));
    await c.client.connect();
    p.freeze();
    const pending = c.client.query<{ v: number }>('SELECT 42 AS v');
    assert.equal((await within(pending, 500)).settled, false);
    p.thaw();
    const outcome = await within(pending, 10_000);
    assert.ok(outcome.settled && outcome.ok, 'completes after thaw');
    assert.equal((await c.client.query<{ v: number }>('SELECT 43 AS v')).rows[0]!.v, 43);
    assert.deepEqual(c.events, []);
    assert.equal(p.frozenConnections, 0);
    await c.client.end();
    await waitFor(() => p.connections === 0, 'the proxy sees the client leave');
  });

  test('freeze({ newConnections: true }): new connections are accepted but hang; thaw() lets them through', async () => {
    const p = await proxy();
    p.freeze({ newConnections: true });
    const c = watched(p.url(cluster.url()));
    const connecting = c.client.connect();
    const outcome = await within(connecting, 2000);
    assert.equal(outcome.settled, false, 'connect() must hang in a blackhole');
    assert.equal(p.accepted, 1, 'the TCP connection was accepted');
    assert.equal(p.frozenConnections, 1);
    assert.deepEqual(c.events, []);
    p.thaw();
    assert.ok((await within(connecting, 10_000)).settled, 'connects after thaw');
    assert.equal((await c.client.query<{ v: number }>('SELECT 7 AS v')).rows[0]!.v, 7);
    await c.client.end();
  });

  test('reset(): existing connections get ECONNRESET', async () => {
    const p = await proxy();
    const c = watched(p.url(cluster.url()));
    await c.client.connect();
    p.reset();
    await waitFor(() => c.events.length > 0, 'an error event');
    assert.match(c.events[0]!, /ECONNRESET/);
    assert.equal(p.connections, 0);
    // the proxy itself still works
    const d = watched(p.url(cluster.url()));
    await d.client.connect();
    assert.equal((await d.client.query<{ v: number }>('SELECT 1 AS v')).rows[0]!.v, 1);
    await d.client.end();
  });
});
