/**
 * Self-test of test/support/backend.ts on a cluster of its own: SIGKILL of an
 * idle backend makes PostgreSQL run crash recovery (UNLOGGED tables emptied,
 * LOGGED rows kept, the crash in the server log, other sessions cut off);
 * SIGTERM only ends that one backend; killBackend refuses non-backends.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { crashServer, killBackend, processExists, waitForRecovery } from '../support/backend.ts';
import { startCluster, type Cluster } from '../support/cluster.ts';

let cluster: Cluster | undefined;
const clients: pg.Client[] = [];

before(async () => {
  // synchronous_commit on: a committed LOGGED row must survive the crash (with off, the last ~600 ms may not)
  cluster = await startCluster({ settings: { shared_buffers: '16MB', max_connections: 20, synchronous_commit: 'on' } });
});
after(async () => {
  await Promise.allSettled(clients.map((c) => c.end()));
  await cluster?.destroy();
});

interface Watched {
  client: pg.Client;
  events: string[];
}

async function connect(): Promise<Watched> {
  const client = new pg.Client({ connectionString: cluster!.url() });
  const events: string[] = [];
  client.on('error', (err) => events.push(`error: ${err.message}`));
  client.on('notice', (n) => events.push(`notice: ${n.message}`));
  client.on('end', () => events.push('end'));
  clients.push(client);
  await client.connect();
  return { client, events };
}

async function count(c: pg.Client, table: string): Promise<number> {
  const { rows } = await c.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`);
  return Number(rows[0]!.n);
}

async function pidOf(c: pg.Client): Promise<number> {
  return (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
}

async function postmasterStart(c: pg.Client): Promise<string> {
  return (await c.query<{ t: string }>('SELECT pg_postmaster_start_time()::text AS t')).rows[0]!.t;
}

const matches = (text: string, re: RegExp): number => text.match(new RegExp(re.source, 'g'))?.length ?? 0;

describe('killBackend / waitForRecovery', () => {
  test('refuses pids that are not PostgreSQL backends', async () => {
    const postmasterPid = Number(readFileSync(join(cluster!.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    await assert.rejects(killBackend(postmasterPid), /not a PostgreSQL backend/);
    await assert.rejects(killBackend(process.pid), /not a PostgreSQL backend/);
    await assert.rejects(killBackend(0), /not a pid/);
    assert.ok(processExists(postmasterPid));
  });

  test('SIGTERM ends only that backend: no crash, UNLOGGED rows stay', async () => {
    const { client: setup } = await connect();
    await setup.query('CREATE UNLOGGED TABLE term_unlogged AS SELECT g FROM generate_series(1, 100) g');
    const victim = await connect();
    const pid = await pidOf(victim.client);
    const logBefore = cluster!.log();
    await killBackend(pid, 'SIGTERM');
    assert.equal(processExists(pid), false);
    assert.equal(await count(setup, 'term_unlogged'), 100, 'the other session carries on, nothing reset');
    assert.equal(matches(cluster!.log(), /reinitializing/), matches(logBefore, /reinitializing/), 'no crash cycle');
    await setup.end();
  });

  test('SIGKILL of an idle backend: crash recovery empties UNLOGGED tables, LOGGED rows survive', async () => {
    const observer = await connect();
    await observer.client.query('CREATE TABLE kept (g int)');
    await observer.client.query('INSERT INTO kept SELECT generate_series(1, 1000)');
    await observer.client.query('CREATE UNLOGGED TABLE wiped (g int)');
    await observer.client.query('INSERT INTO wiped SELECT generate_series(1, 1000)');
    assert.equal(await count(observer.client, 'wiped'), 1000);
    const startedAt = await postmasterStart(observer.client);

    const victim = await connect();
    const pid = await pidOf(victim.client);
    const killedAt = Date.now();
    await killBackend(pid); // SIGKILL, reaped
    const ms = await waitForRecovery(cluster!.url(), 60_000);
    console.log(`crash: backend reaped after ${Date.now() - killedAt - ms} ms, server back after ${Date.now() - killedAt} ms`);

    const after = await connect();
    assert.equal(await count(after.client, 'kept'), 1000, 'LOGGED rows survive crash recovery');
    assert.equal(await count(after.client, 'wiped'), 0, 'the UNLOGGED table still exists but is empty');
    assert.equal(await postmasterStart(after.client), startedAt, 'same postmaster: a crash-restart cycle, not a restart');

    const log = cluster!.log();
    assert.match(log, new RegExp(`(server process|client backend) \\(PID ${pid}\\) was terminated by signal 9`));
    assert.match(log, /all server processes terminated; reinitializing/);
    assert.match(log, /database system was not properly shut down; automatic recovery in progress/);

    // the other session was cut off by the crash
    await assert.rejects(observer.client.query('SELECT 1'));
    assert.ok(observer.events.some((e) => /crash of another server process|terminated|end/.test(e)), observer.events.join('; '));
    assert.ok(victim.events.length > 0, 'the killed backend\'s client saw its connection end');
    await after.client.end();
  });

  test('crashServer(): the same crash in one call', async () => {
    const setup = await connect();
    await setup.client.query('CREATE UNLOGGED TABLE wiped2 AS SELECT g FROM generate_series(1, 10) g');
    const before = matches(cluster!.log(), /all server processes terminated; reinitializing/);
    const pid = await crashServer(cluster!.url());
    await waitForRecovery(cluster!.url());
    const after = await connect();
    assert.equal(await count(after.client, 'wiped2'), 0);
    assert.equal(matches(cluster!.log(), /all server processes terminated; reinitializing/), before + 1);
    assert.match(cluster!.log(), new RegExp(`PID ${pid}\\) was terminated by signal 9`));
    await after.client.end();
  });
});
