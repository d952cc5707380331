/** (b) the reference batcher (bench/reference-batcher.ts) with its defaults, one per app replica. */
import pg from 'pg';
import { ReferenceBatcher } from '../reference-batcher.ts';
import type { Strategy } from './types.ts';

export function referenceStrategy(options: { replicas?: number; poolSize?: number; ownFlushConnection?: boolean } = {}): Strategy {
  const replicas = options.replicas ?? 1;
  const poolSize = options.poolSize ?? 8;
  const own = options.ownFlushConnection ?? false;
  return {
    key: (replicas === 1 ? 'reference' : `reference-x${replicas}`) + (own ? '-own-conn' : ''),
    label:
      `(b) reference batcher: 500 agents / 5 s, UPDATE ... FROM unnest${replicas > 1 ? `, ${replicas} replicas` : ''}` +
      (own ? ', flush on its own connection (not in the original)' : ''),
    async start(ctx) {
      const pools = Array.from({ length: replicas }, () => {
        const pool = new pg.Pool({ connectionString: ctx.url, max: poolSize, application_name: 'bench reference' });
        pool.on('error', () => {});
        return pool;
      });
      const flushPools = own
        ? pools.map(() => {
            const p = new pg.Pool({ connectionString: ctx.url, max: 1, application_name: 'bench reference flush' });
            p.on('error', () => {});
            return p;
          })
        : [];
      const batchers = pools.map((p, i) => new ReferenceBatcher(p, own ? { flushPool: flushPools[i] } : {}));
      const sum = (f: (b: ReferenceBatcher) => number): number => batchers.reduce((s, b) => s + f(b), 0);
      return {
        offer(index, at) {
          batchers[index % replicas]!.add({
            id: ctx.ids[index]!,
            firstConnectedAt: ctx.firstConnectedAt,
            lastConnectedAt: at,
            lastConnectedReplicaId: ctx.replicaIds[index % replicas]!,
            disconnectedAt: null,
            updatedAt: at,
            weight: 1,
          });
        },
        applied: () => sum((b) => b.counters.applied),
        dropped: () => sum((b) => b.counters.droppedHeartbeats),
        extra: () => ({
          flushes: sum((b) => b.counters.flushes),
          flushedRows: sum((b) => b.counters.flushedRows),
          failedFlushes: sum((b) => b.counters.failedFlushes),
          directWrites: sum((b) => b.counters.directWrites),
          directBlocked: sum((b) => b.counters.directBlocked),
          backlog: sum((b) => b.backlog),
        }),
        async stop() {
          // no final flush: the phase is over; what is pending is backlog
          for (const b of batchers) void b.close();
          await Promise.all([...pools, ...flushPools].map((p) => p.end().catch(() => {})));
        },
      };
    },
  };
}
