/**
 * `node --import tsx bench/chart-cli.ts out.svg results/<date>-*.json`: one
 * chart from several result files (e.g. sizes run separately).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { renderChart } from './chart.ts';
import type { PhaseResult } from './phase.ts';

const [out, ...files] = process.argv.slice(2);
if (!out || files.length === 0) throw new Error('usage: chart-cli.ts out.svg results.json...');
const results: PhaseResult[] = [];
let title = 'pg-heartbeat benchmark';
for (const f of files) {
  const r = JSON.parse(readFileSync(f, 'utf8')) as { results: PhaseResult[]; date: string; machine: { cores: number } };
  results.push(...r.results);
  title = `pg-heartbeat benchmark ${r.date.slice(0, 10)}: ${r.machine.cores} cores, PostgreSQL 15, shared machine`;
}
writeFileSync(out, renderChart(results, title));
