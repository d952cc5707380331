/**
 * A merge over every part (heartbeat.merge_agent_connections(), mergeNow()) is one statement over the
 * partitioned staging table when no more rows are staged than its budget (sql/022), and falls back to
 * merging part by part when a part is busy, the backlog is larger, or a row lock or a bad row gets in
 * the way. Each part keeps its own bookkeeping in heartbeat.merge_state either way.
 */
import assert from 'node:assert/strict';
import { after, before, beforeEach, test } from 'node:test';
import pg from 'pg';
import { mergeNow } from '../src/merge.ts';
import { readStatus, type PartStatus } from '../src/status.ts';
import { createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('merge_all_parts');
});
after(async () => {
  await db?.drop();
});
beforeEach(async () => {
  await db.pool.query('TRUNCATE heartbeat.agent_connection_staging, heartbeat.dead_letters');
});

/** heartbeat.part_status() through the public reader: staged rows and the last merge's counts, per part. */
const parts = async (): Promise<PartStatus[]> => (await readStatus({ pool: db.pool }, { lookUpCron: false })).parts;

/** Staged rows per part, by part number. */
const stagedByPart = async (): Promise<Map<number, number>> => new Map((await parts()).map((p) => [p.part, p.stagedRows]));

/** The part a staged agent's rows are in (before the merge consumes them). */
async function stagedPartOf(agentId: string): Promise<number> {
  const { rows } = await db.pool.query<{ part: number }>(
    `SELECT p.part FROM heartbeat.agent_connection_staging s JOIN heartbeat.staging_parts() p ON p.relid = s.tableoid
      WHERE s.agent_id = $1 LIMIT 1`,
    [agentId],
  );
  return rows[0]!.part;
}

async function stageNow(ids: string[], at: Date): Promise<void> {
  await db.pool.query(
    `INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
     SELECT unnest($1::uuid[]), $2, $2, $2`,
    [ids, at],
  );
}

test('a small backlog over every part is merged by one statement, with each part counted on its own', async () => {
  const ids = await createAgents(db.pool, 400);
  await stageNow(ids, new Date(Date.UTC(2026, 0, 1)));
  const staged = await stagedByPart();
  assert.equal(staged.size, 4);
  for (const [part, n] of staged) assert.ok(n > 0, `part ${part} has rows (the test needs every part)`);

  const result = await mergeNow(db.pool);
  assert.equal(result.rowsConsumed, 400);
  assert.equal(result.agentsUpdated, 400);
  assert.equal(result.partsMerged, 4);
  assert.equal(result.partsSkippedConcurrent, 0);
  assert.equal(result.more, false);
  assert.equal(await stagedCount(db.pool), 0);

  const state = await parts();
  assert.equal(state.length, 4);
  // one statement: every part was merged by the same call at the same instant (the part-by-part
  // merge stamps each part when it starts it)
  assert.equal(new Set(state.map((p) => p.lastMerge!.at.getTime())).size, 1, 'one merge instant for every part');
  for (const p of state) {
    assert.equal(p.lastMerge!.rowsConsumed, staged.get(p.part), `part ${p.part}: its own rows`);
    assert.equal(p.lastMerge!.agentsUpdated, staged.get(p.part), `part ${p.part}: its own agents`);
  }
});

test('each part gets its own stale, unknown and invalid counts, and status changes are applied', async () => {
  const at = new Date(Date.UTC(2026, 0, 2));
  const [known, stale, invalid] = [await createAgents(db.pool, 50), await createAgents(db.pool, 1, at), await createAgents(db.pool, 1)];
  const unknown = '00000000-0000-4000-a000-00000000beef';
  await stageNow(known, at); // never connected before: every one changes status (the statement's second step)
  await stageNow([stale[0]!, unknown], new Date(at.getTime() - 1000)); // stale: the row is newer
  await db.pool.query(
    `INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, 'infinity', $2)`,
    [invalid[0], at],
  );
  const [staleAt, unknownAt, invalidAt] = [await stagedPartOf(stale[0]!), await stagedPartOf(unknown), await stagedPartOf(invalid[0]!)];
  const result = await mergeNow(db.pool);
  assert.equal(result.rowsConsumed, 53);
  assert.equal(result.agentsUpdated, 50);
  assert.equal(result.skippedStale, 1);
  assert.equal(result.skippedUnknown, 1);
  assert.equal(result.skippedInvalid, 1);
  assert.ok(result.statusEvents >= 50, `every known agent connected (${result.statusEvents} events)`);

  const last = (await parts()).map((p) => ({ part: p.part, ...p.lastMerge! }));
  const sum = (k: 'rowsConsumed' | 'agentsUpdated' | 'skippedStale' | 'skippedUnknown' | 'skippedInvalid'): number =>
    last.reduce((a, p) => a + p[k], 0);
  assert.deepEqual(
    [sum('rowsConsumed'), sum('agentsUpdated'), sum('skippedStale'), sum('skippedUnknown'), sum('skippedInvalid')],
    [53, 50, 1, 1, 1],
  );
  const byPart = new Map(last.map((p) => [p.part, p]));
  assert.equal(byPart.get(staleAt)!.skippedStale, 1, 'the stale row counted in its part');
  assert.equal(byPart.get(unknownAt)!.skippedUnknown, 1, 'the unknown agent counted in its part');
  assert.equal(byPart.get(invalidAt)!.skippedInvalid, 1, 'the invalid row counted in its part');
  const { rows } = await db.pool.query<{ n: string }>(
    'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND last_connected_at = $2', [known, at],
  );
  assert.equal(Number(rows[0]!.n), 50);
});

test('a part busy in another merge: the call merges the others part by part, and that part later', async () => {
  const ids = await createAgents(db.pool, 200);
  await stageNow(ids, new Date(Date.UTC(2026, 0, 3)));
  const staged = await stagedByPart();
  const holder = new pg.Client({ connectionString: db.url });
  await holder.connect();
  try {
    await holder.query('BEGIN');
    await holder.query('SELECT pg_advisory_xact_lock(1751474803, 2)'); // what a merge of part 2 holds
    const result = await mergeNow(db.pool);
    assert.equal(result.partsSkippedConcurrent, 1);
    assert.equal(result.partsMerged, 3);
    assert.equal(result.rowsConsumed, 200 - staged.get(2)!);
    assert.equal(await stagedCount(db.pool), staged.get(2));
  } finally {
    await holder.query('ROLLBACK');
    await holder.end();
  }
  const rest = await mergeNow(db.pool);
  assert.equal(rest.rowsConsumed, staged.get(2));
  assert.equal(await stagedCount(db.pool), 0);
});

test('more rows than the budget: each part merges its share, and `more` says call again', async () => {
  const ids = await createAgents(db.pool, 100);
  await stageNow(ids, new Date(Date.UTC(2026, 0, 4)));
  const first = await db.pool.query<{ rows_consumed: string; more: boolean; parts_more: number[] }>(
    'SELECT rows_consumed, more, parts_more FROM heartbeat.merge_agent_connections(max_rows => 40)',
  );
  assert.ok(Number(first.rows[0]!.rows_consumed) <= 40, `at most the budget (${first.rows[0]!.rows_consumed})`);
  assert.equal(first.rows[0]!.more, true);
  assert.ok(first.rows[0]!.parts_more.length > 0);
  assert.ok(new Set((await parts()).map((p) => p.lastMerge!.at.getTime())).size > 1, 'merged part by part');
  let calls = 1;
  for (let more = true; more; calls++) {
    const r = await db.pool.query<{ more: boolean }>('SELECT more FROM heartbeat.merge_agent_connections(max_rows => 40)');
    more = r.rows[0]!.more;
    assert.ok(calls < 10, 'drained in a few calls');
  }
  assert.equal(await stagedCount(db.pool), 0);
});

test('a locked row: the call waits lock_timeout once, not once more per part, and defers it', async () => {
  const ids = await createAgents(db.pool, 40);
  await stageNow(ids, new Date(Date.now() - 2000));
  await mergeNow(db.pool); // connected: the next heartbeats take the steady path, which waits for row locks
  await stageNow(ids, new Date(Date.now() - 1000));
  const holder = new pg.Client({ connectionString: db.url });
  await holder.connect();
  try {
    await holder.query('BEGIN');
    await holder.query('SELECT 1 FROM public.workspace_agents WHERE id = $1 FOR UPDATE', [ids[7]]);
    const started = performance.now();
    const result = await mergeNow(db.pool);
    const ms = performance.now() - started;
    assert.equal(result.deferredLocked, 1);
    assert.equal(result.agentsUpdated, 39);
    // the function's lock_timeout is 2 s: one statement waited it out; waiting it again in the
    // part's own merge would take 4 s or more
    assert.ok(ms >= 1900 && ms < 3900, `one lock_timeout, not two (${ms.toFixed(0)} ms)`);
  } finally {
    await holder.query('ROLLBACK');
    await holder.end();
  }
  const released = await mergeNow(db.pool);
  assert.equal(released.agentsUpdated, 1);
});
