/**
 * Experimental variants of pg-heartbeat, measured side by side with the
 * defaults (`npm run bench -- --strategies pg-heartbeat,pg-heartbeat-ff100`).
 * Each applies SQL from this folder on top of the phase's migrated database;
 * nothing here changes sql/ or src/.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { pgHeartbeatStrategy } from '../strategies/pg-heartbeat.ts';
import type { Strategy } from '../strategies/types.ts';

const DIR = fileURLToPath(new URL('.', import.meta.url));
const sqlFile = (name: string): string => readFileSync(join(DIR, name), 'utf8');

function fillfactor(ff: number): Strategy {
  return pgHeartbeatStrategy({
    key: `pg-heartbeat-ff${ff}`,
    label: `pg-heartbeat, workspace_agents fillfactor ${ff}`,
    prepareSql: [`ALTER TABLE public.workspace_agents SET (fillfactor = ${ff})`, 'VACUUM FULL public.workspace_agents', 'ANALYZE public.workspace_agents'],
  });
}

export function experimentalStrategies(): Strategy[] {
  const list: Strategy[] = [
    fillfactor(100),
    fillfactor(90),
    fillfactor(70),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-v2',
      label: 'pg-heartbeat, merge v2 (work_mem 128MB, one-pass counts, lazy unknown count)',
      prepareSql: [sqlFile('merge-v2.sql')],
      mergeSql: 'SELECT * FROM heartbeat.merge_agent_connections_v2()',
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-part2',
      label: 'pg-heartbeat, staging in 2 hash partitions merged in parallel (v2 merge)',
      prepareSql: [sqlFile('staging-partitioned.sql')],
      mergeParallel: ['SELECT * FROM heartbeat.merge_agent_connections_p0()', 'SELECT * FROM heartbeat.merge_agent_connections_p1()'],
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-x3-lean',
      label: 'pg-heartbeat, 3 replicas, flush every 7.5 s, one merger',
      replicas: 3,
      stager: { flushIntervalMs: 7500 },
      mergeBy: 'first',
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-parts1',
      label: 'pg-heartbeat, staging in 1 part (heartbeat.set_staging_parts(1)), the bench loop',
      prepareSql: ['SELECT heartbeat.set_staging_parts(1)'],
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-startmerger',
      label: 'pg-heartbeat, one replica with startMerger({ connectionString }) (the library\'s merger and its own pool: grid ticks, parts fanned out in parallel on a backlog)',
      useStartMerger: true,
      mergerOwnPool: true,
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-x3-startmerger',
      label: 'pg-heartbeat, 3 replicas, each with startMerger() (defaults: flush and merge on the 5 s grid, LISTEN skip)',
      replicas: 3,
      useStartMerger: true,
    }),
    // what pg-heartbeat-x3-startmerger measured before 2026-11-28's change of defaults
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-x3-startmerger-before',
      label: 'pg-heartbeat, 3 replicas, startMerger() as before: flush every 2 s, merge 5 s ±10 % from the last start, no LISTEN',
      replicas: 3,
      stager: { flushIntervalMs: 2000, alignFlush: false },
      useStartMerger: true,
      merger: { align: false, listen: false },
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-x3-startmerger-aligned',
      label: 'pg-heartbeat, 3 replicas, startMerger(): flush and merge on the 5 s grid, no LISTEN skip',
      replicas: 3,
      useStartMerger: true,
      merger: { listen: false },
    }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-x3-startmerger-flush5',
      label: 'pg-heartbeat, 3 replicas, startMerger() as before but flush every 5 s, not aligned',
      replicas: 3,
      stager: { flushIntervalMs: 5000, alignFlush: false },
      useStartMerger: true,
      merger: { align: false, listen: false },
    }),
  ];
  return list;
}

export { sqlFile };
