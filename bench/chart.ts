/**
 * A hand-written SVG of the results: four panels (statements/s, DB CPU per
 * 100k heartbeats, WAL bytes per heartbeat, staleness p99), each with one group
 * of bars per fleet size and one bar per strategy, on a log scale (the naive
 * strategy is orders of magnitude off the others), values printed on the bars.
 */
import type { PhaseResult } from './phase.ts';

const COLORS = ['#d62728', '#ff7f0e', '#1f77b4', '#2ca02c', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f'];

interface Panel {
  title: string;
  value: (r: PhaseResult) => number;
  format: (v: number) => string;
}

const PANELS: Panel[] = [
  { title: 'Statements per second (database, whole fleet)', value: (r) => r.statementsPerS, format: (v) => fmt(v) },
  { title: 'Database CPU seconds per 100k heartbeats', value: (r) => r.dbCpuSecondsPer100k, format: (v) => fmt(v) },
  { title: 'WAL bytes per heartbeat', value: (r) => r.walBytesPerHeartbeat, format: (v) => fmt(v) },
  { title: 'Staleness p99 (s): heartbeat to visible', value: (r) => r.staleness.p99Ms / 1000, format: (v) => fmt(v) },
];

function fmt(v: number): string {
  if (!Number.isFinite(v)) return 'n/a';
  if (v >= 1000) return `${(v / 1000).toFixed(v >= 10_000 ? 0 : 1)}k`;
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

export function renderChart(results: PhaseResult[], title: string): string {
  const sizes = [...new Set(results.map((r) => r.agents))].sort((a, b) => a - b);
  const strategies = [...new Set(results.map((r) => r.strategy))];
  const labels = new Map(results.map((r) => [r.strategy, r.label]));
  const panelW = 560;
  const panelH = 260;
  const margin = { top: 40, left: 60, right: 10, bottom: 40 };
  const cols = 2;
  const legendH = 20 * strategies.length + 20;
  const width = cols * panelW;
  const height = 50 + Math.ceil(PANELS.length / cols) * panelH + legendH;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  out.push(`<text x="${width / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">${esc(title)}</text>`);
  PANELS.forEach((panel, p) => {
    const ox = (p % cols) * panelW;
    const oy = 40 + Math.floor(p / cols) * panelH;
    const w = panelW - margin.left - margin.right;
    const h = panelH - margin.top - margin.bottom;
    const values = results.map(panel.value).filter((v) => Number.isFinite(v) && v > 0);
    const lo = Math.floor(Math.log10(Math.min(...values, 1)));
    const hi = Math.ceil(Math.log10(Math.max(...values, 10)));
    const y = (v: number): number => oy + margin.top + h - ((Math.log10(v) - lo) / (hi - lo)) * h;
    out.push(`<text x="${ox + panelW / 2}" y="${oy + 22}" text-anchor="middle" font-size="13" font-weight="bold">${esc(panel.title)}</text>`);
    for (let e = lo; e <= hi; e++) {
      const yy = y(10 ** e);
      out.push(`<line x1="${ox + margin.left}" x2="${ox + margin.left + w}" y1="${yy}" y2="${yy}" stroke="#ddd"/>`);
      out.push(`<text x="${ox + margin.left - 4}" y="${yy + 4}" text-anchor="end" fill="#555">${fmt(10 ** e)}</text>`);
    }
    const groupW = w / sizes.length;
    const barW = Math.min(28, (groupW - 10) / strategies.length);
    sizes.forEach((size, g) => {
      const gx = ox + margin.left + g * groupW + (groupW - barW * strategies.length) / 2;
      out.push(`<text x="${ox + margin.left + g * groupW + groupW / 2}" y="${oy + margin.top + h + 16}" text-anchor="middle">${size.toLocaleString('en-US')} agents</text>`);
      strategies.forEach((s, i) => {
        const r = results.find((x) => x.agents === size && x.strategy === s);
        if (!r) return;
        const v = panel.value(r);
        const x = gx + i * barW;
        if (!Number.isFinite(v) || v <= 0) {
          out.push(`<text x="${x + barW / 2}" y="${oy + margin.top + h - 4}" text-anchor="middle" fill="#999" font-size="9">n/a</text>`);
          return;
        }
        const top = y(Math.max(v, 10 ** lo));
        const base = oy + margin.top + h;
        out.push(`<rect x="${x + 1}" y="${top}" width="${barW - 2}" height="${Math.max(1, base - top)}" fill="${COLORS[i % COLORS.length]}"><title>${esc(`${s} @ ${size}: ${panel.format(v)}`)}</title></rect>`);
        out.push(`<text x="${x + barW / 2}" y="${top - 3}" text-anchor="middle" font-size="9">${esc(panel.format(v))}</text>`);
      });
    });
    out.push(`<line x1="${ox + margin.left}" x2="${ox + margin.left}" y1="${oy + margin.top}" y2="${oy + margin.top + h}" stroke="#333"/>`);
    out.push(`<line x1="${ox + margin.left}" x2="${ox + margin.left + w}" y1="${oy + margin.top + h}" y2="${oy + margin.top + h}" stroke="#333"/>`);
  });
  const ly = 50 + Math.ceil(PANELS.length / cols) * panelH;
  strategies.forEach((s, i) => {
    out.push(`<rect x="20" y="${ly + i * 20}" width="14" height="14" fill="${COLORS[i % COLORS.length]}"/>`);
    out.push(`<text x="40" y="${ly + i * 20 + 11}">${esc(labels.get(s) ?? s)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n');
}
