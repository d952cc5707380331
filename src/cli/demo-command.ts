import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { startEmbeddedPostgres, type EmbeddedDatabase } from '../embedded.ts';
import { silentLogger } from '../logger.ts';
import { mergeNow } from '../merge.ts';
import { migrate } from '../migrate.ts';
import { HeartbeatStager } from '../stager.ts';
import { checkDatabaseUrl, type Command, redact } from './command.ts';

export const demoCommand: Command = {
  name: 'demo',
  summary: 'stage heartbeats for simulated agents, merge them, disconnect some, print what landed (embedded PostgreSQL unless a database is given)',
  usage: '[--agents N] [--seconds S]',
  help: { agents: 'simulated agents (default 1000)', seconds: 'how long to heartbeat (default 5)' },
  options: { agents: { type: 'string' }, seconds: { type: 'string' } },
  async run(ctx) {
    const agents = Number(ctx.values.agents ?? 1000);
    const seconds = Number(ctx.values.seconds ?? 5);
    if (!Number.isInteger(agents) || agents < 1) throw new Error('--agents must be a positive integer');
    if (!(seconds > 0)) throw new Error('--seconds must be positive');
    const given = (ctx.values['database-url'] as string | undefined) ?? process.env.DATABASE_URL;
    let embedded: EmbeddedDatabase | undefined;
    let url: string;
    if (given) {
      url = checkDatabaseUrl(given);
      ctx.out(`using ${redact(url)}`);
    } else {
      ctx.out('no DATABASE_URL: starting an embedded PostgreSQL ...');
      embedded = await startEmbeddedPostgres();
      url = embedded.url;
    }
    const pool = new pg.Pool({ connectionString: url, max: 4 });
    pool.on('error', () => {});
    const ids = Array.from({ length: agents }, () => randomUUID());
    try {
      const ran = await migrate({ pool }, { logger: silentLogger });
      ctx.out(`migrations: ${ran.length ? `applied ${ran.length}` : 'up to date'}`);
      await pool.query('INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), now() - interval \'1 hour\'', [ids]);
      const stager = new HeartbeatStager({ pool }, { flushIntervalMs: 1000 });
      const replica = randomUUID();
      const firstSeen = new Date();
      // every agent heartbeats several times a second here, to show the dedupe
      const ticks = Math.max(1, Math.round(seconds * 4));
      for (let tick = 0; tick < ticks; tick++) {
        const now = new Date();
        for (const agentId of ids) stager.stage({ agentId, firstConnectedAt: firstSeen, lastConnectedAt: now, lastConnectedReplicaId: replica, updatedAt: now });
        await new Promise((r) => setTimeout(r, (seconds * 1000) / ticks));
      }
      await stager.flush();
      const merged = await mergeNow(pool);
      const gone = ids.slice(0, Math.ceil(agents / 10));
      const at = new Date();
      await Promise.all(gone.map((agentId) => stager.disconnect({ agentId, disconnectedAt: at, updatedAt: at })));
      const stats = stager.stats();
      await stager.close();
      const { rows } = await pool.query<{ connected: string; disconnected: string }>(
        `SELECT count(*) FILTER (WHERE disconnected_at IS NULL AND last_connected_at IS NOT NULL) AS connected,
                count(*) FILTER (WHERE disconnected_at >= last_connected_at) AS disconnected
           FROM public.workspace_agents WHERE id = ANY($1)`,
        [ids],
      );
      ctx.out(`staged ${stats.staged} heartbeats for ${agents} agents over ${seconds} s (${stats.deduped} deduped in memory)`);
      ctx.out(`COPY: ${stats.copies} statement(s), ${stats.rowsCopied} rows; merge: ${merged.agentsUpdated} agents updated from ${merged.rowsConsumed} staged rows`);
      ctx.out(`disconnected ${gone.length} agents directly; now ${rows[0]!.connected} connected, ${rows[0]!.disconnected} disconnected`);
      const writes = stats.copies + 1 + gone.length;
      ctx.out(`write statements: ${writes} (${stats.copies} COPY + 1 merge + ${gone.length} disconnects); one UPDATE per heartbeat would have been ${stats.staged + gone.length}`);
    } finally {
      await pool.query('DELETE FROM public.workspace_agents WHERE id = ANY($1)', [ids]).catch(() => {});
      await pool.end();
      await embedded?.stop();
    }
  },
};
