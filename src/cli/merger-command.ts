import pg from 'pg';
import { consoleLogger } from '../logger.ts';
import { mergeNow } from '../merge.ts';
import { OWN_POOL_PARALLELISM, startMerger, type MergeReport } from '../merger.ts';
import { requirePromClient, startMetrics, type RunningMetrics } from './metrics-option.ts';
import { type Command, UsageError } from './command.ts';

/** A non-negative integer option, or `fallback` when absent. */
export function msOption(value: string | boolean | undefined, name: string, fallback: number | undefined): number | undefined {
  if (value === undefined || typeof value === 'boolean') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`--${name} must be a positive whole number of milliseconds, not ${JSON.stringify(value)}`);
  return n;
}

/** A TCP port option (0 to 65535), or undefined when absent. */
export function portOption(value: string | boolean | undefined): number | undefined {
  if (value === undefined || typeof value === 'boolean') return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isInteger(n) || n < 0 || n > 65535) throw new UsageError(`--metrics-port must be a TCP port from 0 to 65535, not ${JSON.stringify(value)}`);
  return n;
}

export function mergeLine(r: Omit<MergeReport, 'parallel'> & { parallel?: boolean }): string {
  const at = r.startedAt.toISOString();
  if (r.partsMerged === 0) {
    return r.partsSkippedConcurrent > 0 ? `${at} skipped: another merge is running` : `${at} skipped: another merger merged just now`;
  }
  const skipped = r.partsSkippedConcurrent + r.partsSkippedRecent;
  return (
    `${at} merged ${r.rowsConsumed} staged row(s) in ${r.durationMs} ms: ${r.agentsUpdated} agent(s) updated, ` +
    `${r.skippedStale} stale, ${r.skippedUnknown} unknown, ${r.skippedInvalid} invalid, ${r.deferredLocked} deferred (row locked)` +
    (r.deadLettered ? `, ${r.deadLettered} dead-lettered` : '') +
    (r.statusEvents ? `; ${r.statusEvents} status change(s)` : '') +
    (skipped ? `; ${skipped} of ${r.parts} part(s) merged elsewhere` : '') +
    (r.parallel ? '; parts merged in parallel' : '') +
    (r.more ? '; rows left, merging again' : '')
  );
}

export const mergerCommand: Command = {
  name: 'merger',
  summary: 'run the merge every few seconds in the foreground (safe in every replica) until Ctrl-C or SIGTERM',
  usage: '[--interval-ms 5000] [--heartbeat-interval-ms 15000] [--flush-interval-ms 2000] [--inactive-timeout-ms 30000] [--no-listen] [--metrics-port 9187 [--metrics-host 127.0.0.1]]',
  help: {
    'interval-ms': 'time between merges, on the wall-clock grid of its multiples (default 5000)',
    'heartbeat-interval-ms': 'the agents\' heartbeat interval, for the timing check (default 15000)',
    'flush-interval-ms': 'the stager\'s flush interval, for the timing check (default 5000)',
    'inactive-timeout-ms': 'agent_status()\'s inactive timeout, for the timing check (default 30000)',
    'no-listen': 'do not LISTEN for other mergers\' merges (needed behind pgbouncer in transaction mode): every tick asks the database',
    'metrics-port': 'serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port; needs prom-client installed)',
    'metrics-host': 'the address /metrics listens on (default 127.0.0.1; 0.0.0.0 in a container)',
  },
  options: {
    'interval-ms': { type: 'string' },
    'heartbeat-interval-ms': { type: 'string' },
    'flush-interval-ms': { type: 'string' },
    'inactive-timeout-ms': { type: 'string' },
    'no-listen': { type: 'boolean' },
    'metrics-port': { type: 'string' },
    'metrics-host': { type: 'string' },
  },
  async run(ctx) {
    const intervalMs = msOption(ctx.values['interval-ms'], 'interval-ms', 5000)!;
    const timing = {
      heartbeatIntervalMs: msOption(ctx.values['heartbeat-interval-ms'], 'heartbeat-interval-ms', undefined),
      flushIntervalMs: msOption(ctx.values['flush-interval-ms'], 'flush-interval-ms', undefined),
      inactiveTimeoutMs: msOption(ctx.values['inactive-timeout-ms'], 'inactive-timeout-ms', undefined),
    };
    const metricsPort = portOption(ctx.values['metrics-port']);
    const metricsHost = ctx.values['metrics-host'];
    if (metricsHost !== undefined && metricsPort === undefined) throw new UsageError('--metrics-host needs --metrics-port');
    if (metricsPort !== undefined) await requirePromClient(); // before the first merge: a missing prom-client is one line at once
    // a connection per part merged at once (a backlog drains in parallel, as startMerger's own pool does), and
    // with metrics one more: a scrape's status read never waits behind a merge
    const parallelism = OWN_POOL_PARALLELISM;
    const pool = new pg.Pool({
      ...ctx.database().config, max: parallelism + (metricsPort === undefined ? 0 : 1), application_name: 'pg-heartbeat merger',
      connectionTimeoutMillis: 10_000,
    });
    pool.on('error', () => {});
    let metrics: RunningMetrics | undefined;
    // Ctrl-C or SIGTERM from now on stops it cleanly, also during the first merge
    const keepAlive = setInterval(() => {}, 1 << 30);
    let onSignal: (signal: NodeJS.Signals) => void = () => {};
    const stopSignal = new Promise<string>((resolve) => {
      onSignal = resolve;
    });
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    try {
      // the first merge runs now, so a bad database fails here with one line; one statement: a backlog is
      // left to the merger's ticks, which merge its parts in parallel
      const t0 = performance.now();
      const startedAt = new Date();
      const first = await mergeNow(pool, { drain: false });
      ctx.out(mergeLine({ ...first, startedAt, durationMs: Math.round(performance.now() - t0) }));
      // startMerger warns on stderr when the timing invariant is broken, and logs failed merges there
      const merger = startMerger({ pool }, { intervalMs, parallelism, ...timing, listen: ctx.values['no-listen'] !== true, logger: consoleLogger, onMerge: (r) => ctx.out(mergeLine(r)) });
      if (metricsPort !== undefined) {
        try {
          metrics = await startMetrics({ merger, pool, port: metricsPort, host: typeof metricsHost === 'string' ? metricsHost : undefined });
        } catch (err) {
          await merger.close();
          throw err;
        }
        ctx.out(`serving metrics on ${metrics.url}`);
      }
      const signal = await stopSignal;
      ctx.out(`${signal}: stopping after the merge in progress`);
      await metrics?.close();
      await merger.stop();
      const s = merger.stats();
      ctx.out(`stopped: ${s.merges} merge(s), ${s.skippedConcurrent} skipped (another merge running), ${s.failures} failed`);
    } finally {
      clearInterval(keepAlive);
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      await pool.end().catch(() => {});
    }
  },
};
