/**
 * Self-test of test/support/standby.ts: the standby really streams from the
 * primary (pg_stat_replication, replayed rows, read-only), waitForReplay()
 * waits for replay (it hangs while replay is paused), promote() makes it a
 * read-write primary on which LOGGED rows are there and UNLOGGED tables exist
 * but are empty.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { standbyUnavailable, startPrimaryWithStandby, type PrimaryWithStandby } from '../support/standby.ts';
import { waitFor } from '../support/wait.ts';

let pair: PrimaryWithStandby | undefined;
const clients: pg.Client[] = [];
const skip = standbyUnavailable();

before(async () => {
  if (!skip) pair = await startPrimaryWithStandby();
});
after(async () => {
  await Promise.allSettled(clients.map((c) => c.end()));
  await pair?.destroy();
});

async function connect(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => {});
  clients.push(client);
  await client.connect();
  return client;
}

async function count(c: pg.Client, table: string): Promise<number> {
  return Number((await c.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n);
}

describe('primary with a streaming standby', { skip }, () => {
  test('the standby streams from the primary and is read-only', async () => {
    const { primary, standby } = pair!;
    assert.notEqual(primary.port, standby.port);
    assert.notEqual(primary.dataDir, standby.dataDir);
    const p = await connect(primary.url());
    const s = await connect(standby.url());
    assert.equal((await s.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r')).rows[0]!.r, true);
    assert.equal((await p.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r')).rows[0]!.r, false);
    await waitFor(
      async () => (await p.query("SELECT 1 FROM pg_stat_replication WHERE state = 'streaming'")).rowCount === 1,
      'one streaming walsender on the primary',
      30_000,
    );
    await assert.rejects(s.query('CREATE TABLE nope (x int)'), /read-only transaction/);
  });

  test('waitForReplay() waits until the standby has replayed what the primary wrote', async () => {
    const p = await connect(pair!.primary.url());
    const s = await connect(pair!.standby.url());
    await p.query('CREATE TABLE replay_probe (g int)');
    await pair!.waitForReplay();
    await s.query('SELECT pg_wal_replay_pause()');
    await waitFor(async () => (await s.query<{ st: string }>('SELECT pg_get_wal_replay_pause_state() AS st')).rows[0]!.st === 'paused', 'replay paused');
    await p.query('INSERT INTO replay_probe SELECT generate_series(1, 500)');
    let done = false;
    const waiting = pair!.waitForReplay(30_000).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(done, false, 'waitForReplay() must not return while replay is paused');
    assert.equal(await count(s, 'replay_probe'), 0);
    await s.query('SELECT pg_wal_replay_resume()');
    await waiting;
    assert.equal(await count(s, 'replay_probe'), 500, 'replayed by the time waitForReplay() returns');
  });

  test('promote(): LOGGED rows are there, UNLOGGED tables exist but are empty, writes are accepted', async () => {
    const { primary, standby } = pair!;
    const p = await connect(primary.url());
    await p.query('CREATE TABLE kept AS SELECT g FROM generate_series(1, 1000) g');
    await p.query('CREATE UNLOGGED TABLE staged AS SELECT g FROM generate_series(1, 1000) g');
    assert.equal(await count(p, 'staged'), 1000);
    await pair!.waitForReplay();

    const s = await connect(standby.url());
    assert.equal(await count(s, 'kept'), 1000, 'LOGGED rows replicated');
    await assert.rejects(count(s, 'staged'), /cannot access temporary or unlogged relations during recovery/);

    // failover: the primary dies, the standby takes over
    await p.end();
    await primary.stopServer('immediate');
    await pair!.promote();
    const promoted = await connect(standby.url());
    assert.equal((await promoted.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r')).rows[0]!.r, false);
    assert.equal(await count(promoted, 'kept'), 1000, 'LOGGED rows survive the failover');
    const { rows } = await promoted.query<{ relpersistence: string }>("SELECT relpersistence FROM pg_class WHERE relname = 'staged'");
    assert.equal(rows[0]?.relpersistence, 'u', 'the UNLOGGED table exists on the promoted standby');
    assert.equal(await count(promoted, 'staged'), 0, 'but it is empty: UNLOGGED contents are never replicated');

    await promoted.query('INSERT INTO kept VALUES (1001)');
    await promoted.query('INSERT INTO staged VALUES (1)');
    assert.equal(await count(promoted, 'kept'), 1001);
    assert.equal(await count(promoted, 'staged'), 1);
    assert.match(standby.log(), /selected new timeline ID/);
  });
});
