/**
 * Loggers and hooks that throw: a logger whose every method throws, onError /
 * onFlush / onMerge hooks that throw, and hooks that return a rejected promise.
 * None of it may crash the process (no unhandled rejection, no uncaught
 * exception) or turn a success into a failure: flush() resolves after a
 * successful COPY, merges go on, failures are still retried. (node's test
 * runner also fails the running test on an unhandled rejection, on top of the
 * listeners registered here.)
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:net';
import { after, before, describe, test } from 'node:test';
import type { Logger } from '../../src/logger.ts';
import { startMerger } from '../../src/merger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { readStatus } from '../../src/status.ts';
import { createAgents, createTestDb, type TestDb } from '../support/db.ts';
import { waitFor } from '../support/wait.ts';

let db: TestDb;
let dead: Server | undefined;
let deadUrl = '';
const crashes: unknown[] = [];
const onCrash = (err: unknown): void => void crashes.push(err);
before(async () => {
  process.on('unhandledRejection', onCrash);
  process.on('uncaughtException', onCrash);
  db = await createTestDb('fault_hooks');
  // a port that accepts and immediately closes every connection: every operation on it fails
  dead = createServer((s) => s.destroy());
  await new Promise<void>((r) => dead!.listen(0, '127.0.0.1', () => r()));
  const u = new URL(db.url);
  u.port = String((dead.address() as { port: number }).port);
  deadUrl = u.toString();
});
after(async () => {
  process.off('unhandledRejection', onCrash);
  process.off('uncaughtException', onCrash);
  await new Promise((r) => dead?.close(r));
  await db?.drop();
});

/** A logger whose every method throws; counts the calls. */
function throwingLogger(): Logger & { calls: number } {
  const l = {
    calls: 0,
    debug(): void {
      l.calls++;
      throw new Error('logger.debug exploded');
    },
    info(): void {
      l.calls++;
      throw new Error('logger.info exploded');
    },
    warn(): void {
      l.calls++;
      throw new Error('logger.warn exploded');
    },
    error(): void {
      l.calls++;
      throw new Error('logger.error exploded');
    },
  };
  return l;
}

const at = (s: number): Date => new Date(Date.UTC(2026, 0, 1) + s * 1000);
const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 300)); // let rejected promises surface

describe('throwing loggers and hooks', () => {
  for (const style of ['throws', 'rejects'] as const) {
    const hook = (name: string) => (): unknown => {
      hookCalls.set(name, (hookCalls.get(name) ?? 0) + 1);
      if (style === 'throws') throw new Error(`${name} threw`);
      return Promise.reject(new Error(`${name} rejected`));
    };
    const hookCalls = new Map<string, number>();

    test(`stager: onFlush ${style}, logger throws: flush() still resolves and the rows are there`, async () => {
      const ids = await createAgents(db.pool, 200);
      const logger = throwingLogger();
      const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, {
        flushIntervalMs: 50, logger, onFlush: hook('onFlush'), onError: hook('onError'),
      });
      try {
        for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(1), updatedAt: at(1) });
        await stager.flush();
        assert.ok((hookCalls.get('onFlush') ?? 0) >= 1, 'onFlush was called');
        const { rows } = await db.pool.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging WHERE agent_id = ANY($1::uuid[])', [ids]);
        assert.equal(Number(rows[0]!.n), ids.length);
        // background flushes go on too
        for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(2), updatedAt: at(2) });
        await waitFor(() => stager.stats().pendingAgents === 0 && stager.stats().copies >= 2, 'a background COPY');
      } finally {
        await stager.close();
      }
      await settle();
      assert.deepEqual(crashes, []);
    });

    test(`stager: onError ${style}, logger throws: failures are retried, close() reports, nothing escapes`, async () => {
      const logger = throwingLogger();
      const stager = new HeartbeatStager({ connectionString: deadUrl, max: 1 }, {
        flushIntervalMs: 50, retryInitialDelayMs: 50, retryMaxDelayMs: 200, queryTimeoutMs: 2000, closeTimeoutMs: 1000,
        logger, onError: hook('onError'),
      });
      const before = hookCalls.get('onError') ?? 0;
      stager.stage({ agentId: '00000000-0000-4000-8000-000000000001', lastConnectedAt: at(1), updatedAt: at(1) });
      await waitFor(() => stager.stats().failedCopies >= 3, 'several failed COPYs, each retried', 15_000);
      assert.ok((hookCalls.get('onError') ?? 0) >= before + 3, 'onError was called for each');
      await assert.rejects(stager.flush()); // the caller's own flush() reports the failure to the caller
      await stager.close();
      assert.equal(stager.closeReport().lost, 1);
      assert.ok(logger.calls > 0, 'the logger was called (and threw)');
      await settle();
      assert.deepEqual(crashes, []);
    });

    test(`merger: onMerge ${style}, logger throws: merges go on`, async () => {
      const ids = await createAgents(db.pool, 100);
      const logger = throwingLogger();
      const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 50, logger: throwingLogger() });
      const merger = startMerger({ connectionString: db.url }, { intervalMs: 150, logger, onMerge: hook('onMerge'), onError: hook('onError') });
      try {
        for (let round = 1; round <= 3; round++) {
          for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: at(10 + round), updatedAt: at(10 + round) });
          await waitFor(async () => {
            const { rows } = await db.pool.query<{ n: string }>(
              'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2', [ids, at(10 + round)],
            );
            return Number(rows[0]!.n) === ids.length;
          }, `round ${round} merged`, 15_000);
        }
        assert.ok((hookCalls.get('onMerge') ?? 0) >= 3);
        assert.equal(merger.stats().failures, 0);
        assert.ok(logger.calls > 0);
      } finally {
        await stager.close();
        await merger.close();
      }
      await settle();
      assert.deepEqual(crashes, []);
    });

    test(`merger: onError ${style} on an unreachable database: every tick is retried, close() resolves`, async () => {
      const logger = throwingLogger();
      const before = hookCalls.get('onError') ?? 0;
      const merger = startMerger({ connectionString: deadUrl }, { intervalMs: 100, queryTimeoutMs: 2000, logger, onError: hook('onError') });
      try {
        await waitFor(() => merger.stats().failures >= 3, 'three failed ticks', 15_000);
        assert.ok((hookCalls.get('onError') ?? 0) >= before + 3);
      } finally {
        await merger.close();
      }
      await settle();
      assert.deepEqual(crashes, []);
    });
  }

  test('readStatus() with a throwing logger still answers', async () => {
    const status = await readStatus({ connectionString: db.url }, { logger: throwingLogger() });
    assert.equal(typeof status.stagedRows, 'number');
    assert.deepEqual(crashes, []);
  });
});
