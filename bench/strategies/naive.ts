/**
 * (a) naive: one UPDATE per heartbeat, as the reference system wrote them
 * before batching (UpdateWorkspaceAgentConnectionByID: an unconditional
 * overwrite of the connection columns by primary key), from a pool of several
 * connections like an application. Heartbeats queue in memory while every
 * connection is busy; beyond 30 s of heartbeats the queue overflows and the
 * excess is counted as dropped (the strategy has fallen behind anyway).
 */
import pg from 'pg';
import { HeartbeatQueue, Signal, type Strategy } from './types.ts';

const UPDATE_SQL =
  'UPDATE public.workspace_agents SET first_connected_at = $2, last_connected_at = $3, ' +
  'last_connected_replica_id = $4, disconnected_at = NULL, updated_at = $3 WHERE id = $1';

export function naiveStrategy(connections = 8): Strategy {
  return {
    key: 'naive',
    label: `(a) naive: one UPDATE per heartbeat, ${connections} connections`,
    async start(ctx) {
      const rate = ctx.ids.length / 15;
      const queue = new HeartbeatQueue(Math.max(10_000, Math.ceil(rate * 30)));
      const signal = new Signal();
      let applied = 0;
      let dropped = 0;
      let failed = 0;
      let stopped = false;
      const clients: pg.Client[] = [];
      for (let i = 0; i < connections; i++) {
        const c = new pg.Client({ connectionString: ctx.url, application_name: 'bench naive' });
        c.on('error', () => {});
        await c.connect();
        clients.push(c);
      }
      const replica = ctx.replicaIds[0]!;
      const out = new Float64Array(1);
      const workers = clients.map(async (client) => {
        while (!stopped) {
          if (queue.size === 0) {
            await signal.wait(100);
            continue;
          }
          const index = queue.shift(out);
          const at = new Date(out[0]!);
          try {
            await client.query({ name: 'naive_update', text: UPDATE_SQL, values: [ctx.ids[index], ctx.firstConnectedAt, at, replica] });
            applied++;
          } catch {
            if (stopped) return;
            failed++;
          }
        }
      });
      return {
        offer(index, at) {
          if (queue.push(index, at.getTime())) signal.notify();
          else dropped++;
        },
        applied: () => applied,
        dropped: () => dropped + failed,
        extra: () => ({ queued: queue.size, failedUpdates: failed }),
        async stop() {
          stopped = true;
          signal.notify();
          await Promise.all(clients.map((c) => c.end().catch(() => {})));
          await Promise.allSettled(workers);
        },
      };
    },
  };
}
