/**
 * The database is stopped for 30 s while heartbeats keep coming, then comes
 * back. stage() never waits; memory stays bounded by the number of distinct
 * agents; after recovery every agent's newest update lands; the logger hears
 * about the outage once per backoff step, not once per heartbeat.
 * HEARTBEAT_OUTAGE_MS shortens the outage for local runs (default 30000).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { HeartbeatStager } from '../../src/stager.ts';
import { privateCluster } from '../support/private-cluster.ts';
import { createAgents } from '../support/db.ts';
import { mergeUntilDrained } from '../support/drain.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

const env = privateCluster('fault_outage', { max_connections: 30 });

test('a 30 s outage: stage() never waits, memory bounded by agents, one log line per backoff step, all lands after', async (t) => {
  const OUTAGE_MS = Number(process.env.HEARTBEAT_OUTAGE_MS ?? 30_000);
  const AGENTS = 2000;
  const RETRY_INITIAL = 250;
  const RETRY_MAX = 4000;
  const ids = await createAgents(env.db.pool, AGENTS);
  const log = recordingLogger();
  const stager = new HeartbeatStager(
    { connectionString: env.db.url, max: 2 },
    { flushIntervalMs: 200, retryInitialDelayMs: RETRY_INITIAL, retryMaxDelayMs: RETRY_MAX, logger: log },
  );
  const newest = new Map<string, number>();
  const T0 = Date.UTC(2026, 0, 1);
  let tick = 0;
  let stagedDuringOutage = 0;
  let down = false;
  let maxPending = 0;
  let maxStageMs = 0;
  const beat = setInterval(() => {
    tick++;
    for (let k = 0; k < 200; k++) {
      const agentId = ids[Math.floor(Math.random() * AGENTS)]!;
      const updated = T0 + tick * 1000 + k;
      const started = performance.now();
      const returned: unknown = stager.stage({ agentId, lastConnectedAt: new Date(updated), updatedAt: new Date(updated) });
      maxStageMs = Math.max(maxStageMs, performance.now() - started);
      assert.equal(returned, undefined, 'stage() is synchronous: nothing to await');
      newest.set(agentId, Math.max(newest.get(agentId) ?? 0, updated));
      if (down) stagedDuringOutage++;
    }
    maxPending = Math.max(maxPending, stager.stats().pendingAgents);
  }, 100);
  try {
    await waitFor(() => stager.stats().copies >= 2, 'COPYs before the outage');
    await env.cluster.stopServer('fast');
    down = true;
    const failuresBefore = stager.stats().failedCopies;
    const ticksBefore = tick;
    await new Promise((r) => setTimeout(r, OUTAGE_MS));
    const ticksDuringOutage = tick - ticksBefore;
    await env.cluster.start();
    down = false;
    await new Promise((r) => setTimeout(r, 500));
    clearInterval(beat);
    await waitFor(() => stager.stats().pendingAgents === 0 && log.calls.some((c) => /recovered/.test(c.message)), 'recovery', 30_000);
    await stager.flush();

    const stats = stager.stats();
    const copyFailures = log.calls.filter((c) => c.level === 'warn' && /COPY into staging failed/.test(c.message));
    const steps = stats.failedCopies - failuresBefore;
    t.diagnostic(`outage ${OUTAGE_MS} ms: ${stagedDuringOutage} heartbeats staged, ${steps} failed COPYs, ${log.calls.length} log calls, max pending ${maxPending}, slowest stage() ${maxStageMs.toFixed(2)} ms`);
    // the event loop kept running and stage() kept accepting during the outage
    assert.ok(ticksDuringOutage >= OUTAGE_MS / 100 / 4, `staging loop ran during the outage (${ticksDuringOutage} ticks)`);
    assert.ok(stagedDuringOutage > 0);
    // memory bounded by distinct agents: one entry per agent pending, plus at most one per agent in the
    // COPY in flight (stats().pendingAgents counts an agent in both when it has a newer update pending)
    assert.ok(maxPending <= 2 * AGENTS, `pendingAgents ${maxPending} <= 2 x ${AGENTS}`);
    // one warning per failed COPY (= per backoff step), and few of them
    assert.ok(steps >= 1, 'the outage was noticed');
    assert.equal(copyFailures.length, stats.failedCopies, 'one warning per failed COPY attempt');
    const maxSteps = Math.ceil(Math.log2(RETRY_MAX / RETRY_INITIAL)) + 1 + Math.ceil(OUTAGE_MS / (RETRY_MAX / 2)) + 2;
    assert.ok(steps <= maxSteps, `${steps} backoff steps <= ${maxSteps}`);
    assert.ok(stagedDuringOutage >= 20 * steps, 'far fewer log lines than heartbeats');
    const other = log.calls.filter((c) => (c.level === 'warn' || c.level === 'error') && !copyFailures.includes(c));
    assert.ok(other.length <= 4, `other warnings are per connection, not per heartbeat: ${other.map((c) => c.message).join('; ')}`);
    assert.equal(log.calls.filter((c) => /recovered/.test(c.message)).length, 1, 'recovery reported once');

    // every agent's newest update lands
    const mergePool = new pg.Pool({ connectionString: env.db.url, max: 1 });
    mergePool.on('error', () => {});
    await mergeUntilDrained(mergePool, { timeoutMs: 30_000, callTimeoutMs: 30_000 });
    await mergePool.end();
    const { rows } = await env.db.pool.query<{ id: string; updated_at: Date }>(
      'SELECT id, updated_at FROM public.workspace_agents WHERE id = ANY($1::uuid[])', [ids],
    );
    const wrong = rows.filter((r) => newest.has(r.id) && r.updated_at.getTime() !== newest.get(r.id));
    assert.equal(wrong.length, 0, `${wrong.length} agents lack their newest update`);
    assert.equal(env.crashes.length, 0, `no unhandled rejection or exception: ${env.crashes.map(String).join('; ')}`);
  } finally {
    clearInterval(beat);
    await stager.close();
  }
});
