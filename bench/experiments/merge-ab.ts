/**
 * A/B of the merge's fast-path statement between two versions of sql/004_merge.sql:
 * both statements run under EXPLAIN ANALYZE, alternately, each in a rolled-back
 * transaction over the same staged rows, and their execution times are printed.
 *   node --import tsx bench/experiments/merge-ab.ts <database-url> <old 004.sql> <new 004.sql> [runs]
 * The database must be migrated and hold staged rows, e.g. 100k agents with one staged row each:
 *   INSERT INTO workspace_agents (id, updated_at) SELECT gen_random_uuid(), now() - interval '1 day' FROM generate_series(1, 100000);
 *   INSERT INTO heartbeat.agent_connection_staging SELECT id, now(), now(), NULL, NULL, now() - interval '1 hour' FROM workspace_agents;
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';

const [url, oldFile, newFile, runs = '4'] = process.argv.slice(2);
if (!url || !oldFile || !newFile) throw new Error('usage: merge-ab.ts <database-url> <old 004.sql> <new 004.sql> [runs]');

/** The fast path's statement (WITH consumed ... up to its INTO), with the horizon made a literal expression. */
function fastPath(file: string): string {
  const s = readFileSync(file, 'utf8');
  const start = s.indexOf('        WITH consumed AS');
  const end = s.indexOf('          INTO rows_consumed, skipped_invalid, n_agents');
  if (start < 0 || end < 0) throw new Error(`${file}: fast path not found`);
  return s.slice(start, end).replaceAll('horizon', "(now() + interval '5 minutes')");
}

const client = new pg.Client({ connectionString: url });
await client.connect();
const versions = { old: fastPath(oldFile), new: fastPath(newFile) };
const times: Record<string, number[]> = { old: [], new: [] };
for (let i = 0; i < Number(runs); i++) {
  for (const name of ['old', 'new'] as const) {
    await client.query('BEGIN');
    const { rows } = await client.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) ${versions[name]}`);
    await client.query('ROLLBACK');
    times[name]!.push((rows[0]!['QUERY PLAN'] as [{ 'Execution Time': number }])[0]['Execution Time']);
  }
}
await client.end();
for (const [name, ms] of Object.entries(times)) console.log(`${name}: ${ms.map((m) => m.toFixed(0)).join(' / ')} ms`);
