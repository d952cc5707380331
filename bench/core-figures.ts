/**
 * The core's two figures: COPY rows/s into staging (HeartbeatStager.flush of
 * N pending agents: encode + binary COPY) and merge time for N staged agents.
 * `node --import tsx bench/core-figures.ts [--sizes 10000,100000] [--repeat 3]`
 * Starts a throwaway cluster (system PostgreSQL 15) unless DATABASE_URL is set.
 */
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { migrate } from '../src/migrate.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { startCluster } from '../test/support/cluster.ts';

const { values } = parseArgs({ options: { sizes: { type: 'string', default: '10000,100000' }, repeat: { type: 'string', default: '3' } } });
const sizes = values.sizes.split(',').map(Number);
const repeat = Number(values.repeat);
const cluster = process.env.DATABASE_URL ? undefined : await startCluster({ settings: { shared_buffers: '512MB', max_wal_size: '4GB', full_page_writes: 'on', fsync: 'on', synchronous_commit: 'on' } });
const url = process.env.DATABASE_URL ?? cluster!.url();
const pool = new pg.Pool({ connectionString: url, max: 4 });
try {
  await migrate({ pool }, { logger: silentLogger });
  const version = (await pool.query('SHOW server_version')).rows[0].server_version;
  console.log(`PostgreSQL ${version}; median of ${repeat} runs per size`);
  console.log('agents    COPY ms   COPY rows/s   merge ms   merged agents/s');
  for (const n of sizes) {
    const ids = Array.from({ length: n }, () => randomUUID());
    await pool.query('TRUNCATE public.workspace_agents');
    await pool.query('INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), now() - interval \'1 day\'', [ids]);
    await pool.query('VACUUM ANALYZE public.workspace_agents');
    const copyMs: number[] = [];
    const mergeMs: number[] = [];
    for (let r = 0; r < repeat; r++) {
      const stager = new HeartbeatStager({ pool }, { logger: silentLogger, flushIntervalMs: 3_600_000, maxBatchSize: 10_000_000 });
      const now = new Date(Date.now() - (repeat - r) * 1000);
      for (const agentId of ids) stager.stage({ agentId, firstConnectedAt: now, lastConnectedAt: now, lastConnectedReplicaId: ids[0]!, updatedAt: now });
      let t = performance.now();
      await stager.flush();
      copyMs.push(performance.now() - t);
      await stager.close();
      t = performance.now();
      const result = await mergeNow(pool);
      mergeMs.push(performance.now() - t);
      if (result.agentsUpdated !== n) throw new Error(`merge updated ${result.agentsUpdated} of ${n}`);
    }
    const med = (xs: number[]): number => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const c = med(copyMs);
    const m = med(mergeMs);
    console.log(`${String(n).padStart(7)} ${c.toFixed(1).padStart(9)} ${Math.round((n / c) * 1000).toLocaleString('en-US').padStart(13)} ${m.toFixed(1).padStart(10)} ${Math.round((n / m) * 1000).toLocaleString('en-US').padStart(17)}`);
  }
} finally {
  await pool.end();
  await cluster?.destroy();
}
