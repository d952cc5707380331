/**
 * (c, d, e) pg-heartbeat: HeartbeatStager.stage() per heartbeat (in-memory
 * dedupe, binary COPY into the UNLOGGED staging table) and a merge loop calling
 * heartbeat.merge_agent_connections() every 5 s. With several replicas each
 * has its own stager and pool and its own merge loop; the loops tick on the
 * same wall-clock 5 s boundaries, so concurrent calls skip (advisory lock) and
 * the fleet does about one merge per interval.
 */
import pg from 'pg';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow, toMergeResult, type MergeResult } from '../../src/merge.ts';
import { type Merger, type MergerOptions, startMerger } from '../../src/merger.ts';
import { HeartbeatStager, type StagerOptions } from '../../src/stager.ts';
import type { Strategy } from './types.ts';

export interface PgHeartbeatVariant {
  key: string;
  label: string;
  replicas?: number;
  stager?: StagerOptions;
  mergeIntervalMs?: number;
  /** SQL to run instead of mergeNow (an experimental merge returning the same columns). */
  mergeSql?: string;
  /** Parallel merge calls per tick (for partitioned experiments), each its own connection. */
  mergeParallel?: string[];
  prepareSql?: string[];
  /** 'each' (default): every replica runs a merge loop; 'first': only replica 0 merges (an elected merger). */
  mergeBy?: 'each' | 'first';
  /** Use the library's startMerger() (src/merger.ts: its own interval and ±10% jitter per replica) instead of the bench loop. */
  useStartMerger?: boolean;
  /**
   * With useStartMerger: give it the connection string, so it makes its own pool as an application
   * calling startMerger({ connectionString }) does (4 connections: the parts fanned out in
   * parallel on a backlog), instead of a bench pool of one connection (parallelism 1).
   */
  mergerOwnPool?: boolean;
  /** With useStartMerger: more options of startMerger() (align, listen, jitter). */
  merger?: MergerOptions;
}

export function pgHeartbeatStrategy(v: PgHeartbeatVariant): Strategy {
  const replicas = v.replicas ?? 1;
  const interval = v.mergeIntervalMs ?? 5000;
  return {
    key: v.key,
    label: v.label,
    prepareSql: v.prepareSql,
    async start(ctx) {
      const stagers = Array.from({ length: replicas }, () =>
        new HeartbeatStager({ connectionString: ctx.url }, { logger: silentLogger, ...v.stager }),
      );
      const mergePools = Array.from({ length: v.mergeBy === 'first' ? 1 : replicas }, () => {
        const p = new pg.Pool({ connectionString: ctx.url, max: Math.max(1, v.mergeParallel?.length ?? 1), application_name: 'bench merger' });
        p.on('error', () => {});
        return p;
      });
      const m = { merges: 0, skippedConcurrent: 0, failedMerges: 0, rowsConsumed: 0, agentsUpdated: 0, skippedStale: 0, mergeMsTotal: 0, mergeMsMax: 0, deferredLocked: 0 };
      let stopped = false;
      const wakeups: Array<() => void> = [];
      const mergeOnce = async (pool: pg.Pool): Promise<MergeResult[]> => {
        if (v.mergeParallel) {
          return Promise.all(v.mergeParallel.map(async (sql) => toMergeResult((await pool.query(sql)).rows[0])));
        }
        if (v.mergeSql) return [toMergeResult((await pool.query(v.mergeSql)).rows[0])];
        return [await mergeNow(pool)];
      };
      const record = (results: MergeResult[], ms: number): void => {
        for (const r of results) {
          if (r.skippedConcurrent) {
            m.skippedConcurrent++;
            continue;
          }
          m.merges++;
          m.rowsConsumed += r.rowsConsumed;
          m.agentsUpdated += r.agentsUpdated;
          m.skippedStale += r.skippedStale;
          m.deferredLocked += r.deferredLocked;
        }
        if (results.some((r) => !r.skippedConcurrent)) {
          m.mergeMsTotal += ms;
          m.mergeMsMax = Math.max(m.mergeMsMax, ms);
        }
      };
      const mergers: Merger[] = v.useStartMerger
        ? mergePools.map((pool) =>
            startMerger(v.mergerOwnPool ? { connectionString: ctx.url } : { pool }, { intervalMs: interval, ...v.merger, logger: silentLogger, onMerge: (r) => record([r], r.durationMs), onError: () => m.failedMerges++ }),
          )
        : [];
      const loops = (v.useStartMerger ? [] : mergePools).map(async (pool) => {
        while (!stopped) {
          const next = Math.ceil((Date.now() + 1) / interval) * interval;
          await new Promise<void>((resolve) => {
            const t = setTimeout(resolve, next - Date.now());
            wakeups.push(() => {
              clearTimeout(t);
              resolve();
            });
          });
          if (stopped) break;
          const started = performance.now();
          try {
            const results = await mergeOnce(pool);
            record(results, performance.now() - started);
          } catch {
            if (!stopped) m.failedMerges++;
          }
        }
      });
      const replicaOf = (index: number): number => index % replicas;
      return {
        offer(index, at) {
          const r = replicaOf(index);
          stagers[r]!.stage({
            agentId: ctx.ids[index]!,
            firstConnectedAt: ctx.firstConnectedAt,
            lastConnectedAt: at,
            lastConnectedReplicaId: ctx.replicaIds[r]!,
            updatedAt: at,
          });
        },
        // staged rows are distinct heartbeats here (one per agent per 15 s), so rows merged = heartbeats applied
        applied: () => m.rowsConsumed,
        dropped: () => 0,
        extra: () => {
          const s = stagers.map((x) => x.stats());
          return {
            ...m,
            copies: s.reduce((a, x) => a + x.copies, 0),
            rowsCopied: s.reduce((a, x) => a + x.rowsCopied, 0),
            failedCopies: s.reduce((a, x) => a + x.failedCopies, 0),
            deduped: s.reduce((a, x) => a + x.deduped, 0),
            pendingAgents: s.reduce((a, x) => a + x.pendingAgents, 0),
            // startMerger(): ticks skipped by the SQL (recent) and without a statement (heard by NOTIFY)
            ...(mergers.length > 0 ? {
              tickSkippedRecent: mergers.reduce((a, x) => a + x.stats().skippedRecent, 0),
              tickSkippedNotified: mergers.reduce((a, x) => a + x.stats().skippedNotified, 0),
              listenConnections: mergers.reduce((a, x) => a + x.stats().listenConnections, 0),
            } : {}),
          };
        },
        async stop() {
          stopped = true;
          for (const w of wakeups) w();
          // close() flushes what is pending (one more COPY each); the merge loops finish their current merge
          await Promise.all(stagers.map((s) => s.close().catch(() => {})));
          await Promise.allSettled([...loops, ...mergers.map((x) => x.stop())]);
          await Promise.all(mergePools.map((p) => p.end().catch(() => {})));
        },
      };
    },
  };
}
