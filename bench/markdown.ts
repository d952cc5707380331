/**
 * `node --import tsx bench/markdown.ts bench/results/<date>-*.json`: the
 * results as a Markdown table (for docs/benchmark.md).
 */
import { readFileSync } from 'node:fs';
import type { PhaseResult } from './phase.ts';

const rows: PhaseResult[] = [];
for (const file of process.argv.slice(2)) {
  const report = JSON.parse(readFileSync(file, 'utf8')) as { results?: PhaseResult[]; ceiling?: Array<{ probes: PhaseResult[] }> };
  rows.push(...(report.results ?? []));
}
const n = (v: number, d = 1): string => (Number.isFinite(v) ? (Math.abs(v) >= 100 ? Math.round(v).toLocaleString('en-US') : v.toFixed(d)) : 'n/a');
const s = (ms: number): string => (Number.isFinite(ms) ? (ms / 1000).toFixed(1) : 'n/a');
console.log('| strategy | agents | offered/s | applied/s | statements/s | commits/s | WAL B/heartbeat | DB CPU s/100k hb | DB CPU % of a core | client CPU s/100k | staleness p50 / p99 / max (s) | HOT % | sustained |');
console.log('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|');
for (const r of rows) {
  console.log(
    `| ${r.strategy} | ${r.agents.toLocaleString('en-US')} | ${n(r.offeredPerS)} | ${n(r.appliedPerS)} | ${n(r.statementsPerS, 2)} | ${n(r.commitsPerS, 2)} | ` +
      `${n(r.walBytesPerHeartbeat)} | ${n(r.dbCpuSecondsPer100k, 2)} | ${n(r.dbCpuPercentOfOneCore)} | ${n(r.clientCpuSecondsPer100k, 2)} | ` +
      `${s(r.staleness.p50Ms)} / ${s(r.staleness.p99Ms)} / ${s(r.staleness.maxMs)} | ${Number.isFinite(r.hotRatio) ? (r.hotRatio * 100).toFixed(0) : 'n/a'} | ${r.sustained ? 'yes' : 'no'} |`,
  );
}
