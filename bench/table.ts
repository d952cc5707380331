/** The terminal table of phase results. */
import type { PhaseResult } from './phase.ts';

const COLUMNS: Array<[string, (r: PhaseResult) => string]> = [
  ['strategy', (r) => r.strategy],
  ['agents', (r) => r.agents.toLocaleString('en-US')],
  ['offered/s', (r) => num(r.offeredPerS)],
  ['applied/s', (r) => num(r.appliedPerS)],
  ['stmts/s', (r) => num(r.statementsPerS)],
  ['commits/s', (r) => num(r.commitsPerS)],
  ['WAL B/hb', (r) => num(r.walBytesPerHeartbeat)],
  ['FPI', (r) => num(r.walFpi)],
  ['DB cpu s/100k', (r) => num(r.dbCpuSecondsPer100k)],
  ['DB cpu %', (r) => num(r.dbCpuPercentOfOneCore)],
  ['client cpu s/100k', (r) => num(r.clientCpuSecondsPer100k)],
  ['stale p50/p99/max s', (r) => `${sec(r.staleness.p50Ms)}/${sec(r.staleness.p99Ms)}/${sec(r.staleness.maxMs)}`],
  ['HOT %', (r) => (Number.isFinite(r.hotRatio) ? (r.hotRatio * 100).toFixed(0) : 'n/a')],
  ['backlog +/s', (r) => num(r.backlogGrowthPerS)],
  ['ok', (r) => (r.sustained ? 'yes' : 'NO')],
];

function num(v: number): string {
  if (!Number.isFinite(v)) return 'n/a';
  if (Math.abs(v) >= 100) return Math.round(v).toLocaleString('en-US');
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function sec(ms: number): string {
  return Number.isFinite(ms) ? (ms / 1000).toFixed(1) : 'n/a';
}

export function formatTable(rows: PhaseResult[], header: boolean): string {
  const cells = rows.map((r) => COLUMNS.map(([, f]) => f(r)));
  const widths = COLUMNS.map(([h], i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]): string => c.map((x, i) => (i === 0 ? x.padEnd(widths[i]!) : x.padStart(widths[i]!))).join('  ');
  const out: string[] = [];
  if (header) out.push(line(COLUMNS.map(([h]) => h)), widths.map((w) => '-'.repeat(w)).join('  '));
  for (const c of cells) out.push(line(c));
  return out.join('\n');
}
