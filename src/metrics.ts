/**
 * Prometheus metrics of stagers, a merger and the database's heartbeat.status,
 * registered on the caller's prom-client registry in one call:
 *
 *   await registerHeartbeatMetrics(registry, { stager, merger, database: { pool } });
 *
 * prom-client is an optional peer dependency, loaded here with a dynamic
 * import() on first use: nothing else of pg-heartbeat needs it, and without it
 * this call fails with a MetricsUnavailableError. Counters and gauges are read
 * from stats() when Prometheus scrapes (nothing changes on the hot path); the
 * two histograms record every COPY and every merge tick. The database gauges
 * read heartbeat.status and part_status() on scrape, one query at a time under
 * a deadline (statusTimeoutMs), shared by the gauges of one scrape: a database
 * that does not answer gives pg_heartbeat_status_up 0 and no backlog series,
 * never a scrape that hangs or an error that escapes.
 */
import type pg from 'pg';
import { endPool, resolvePool, type ConnectionOptions } from './connection.ts';
import { InvalidOptionError, MetricsUnavailableError } from './errors.ts';
import { silentLogger, toLogger, type Logger } from './logger.ts';
import type { Merger } from './merger.ts';
import { observe } from './observers.ts';
import { durationOption } from './options.ts';
import { safeLogger } from './safe-logger.ts';
import type { HeartbeatStager, StagerStats } from './stager.ts';
import { readStatus, type MergeStatus } from './status.ts';

/** What pg-heartbeat needs of a prom-client `Registry` (typed structurally: prom-client stays optional). */
export interface MetricsRegistry {
  registerMetric(metric: never): void;
  removeSingleMetric(name: string): void;
}

export interface HeartbeatMetricsOptions {
  /** The stager(s) to report (summed when several). */
  stager?: HeartbeatStager | HeartbeatStager[];
  /** The merger to report. */
  merger?: Merger;
  /**
   * The database whose heartbeat.status (staging backlog per part, merge age, dead letters) is read on
   * every scrape; without it those metrics are not registered. `{ pool }` uses your pool (keep a
   * connection free for it); `{ connectionString }` makes a pool of one connection, ended by unregister().
   */
  database?: ConnectionOptions;
  /** Deadline of the status read of a scrape, pool checkout included (default 5 000 ms). */
  statusTimeoutMs?: number;
  /** Scrapes within this many ms of a status read reuse it (default 1 000 ms). */
  statusCacheMs?: number;
  /** Where a failing status read is reported (once per streak of failures). Default: nowhere. */
  logger?: Logger;
}

export interface HeartbeatMetrics {
  /** The names registered on the registry. */
  readonly names: readonly string[];
  /** Removes them from the registry, stops observing, and ends the pool made for `database.connectionString`. */
  unregister(): Promise<void>;
}

/** One metric: name, type, HELP text, labels, and which source serves it. */
export interface MetricDefinition {
  name: string;
  type: 'counter' | 'gauge' | 'histogram';
  help: string;
  labels: readonly string[];
  source: 'stager' | 'merger' | 'database';
}

const c = (source: MetricDefinition['source'], name: string, help: string, labels: string[] = []): MetricDefinition =>
  ({ name, type: 'counter', help, labels, source });
const g = (source: MetricDefinition['source'], name: string, help: string, labels: string[] = []): MetricDefinition =>
  ({ name, type: 'gauge', help, labels, source });
const h = (source: MetricDefinition['source'], name: string, help: string): MetricDefinition =>
  ({ name, type: 'histogram', help, labels: [], source });

/** Every metric registerHeartbeatMetrics() can register (docs/operations.md lists them; a test checks it). */
export const HEARTBEAT_METRICS: readonly MetricDefinition[] = [
  c('stager', 'pg_heartbeat_stager_updates_staged_total', 'Updates accepted by stage().'),
  c('stager', 'pg_heartbeat_stager_updates_deduped_total', 'Accepted updates folded into a pending update of the same agent (no extra row).'),
  c('stager', 'pg_heartbeat_stager_updates_rejected_total', 'Updates stage() rejected as invalid.'),
  c('stager', 'pg_heartbeat_stager_rows_copied_total', 'Rows written to staging by successful COPYs.'),
  c('stager', 'pg_heartbeat_stager_copies_total', 'Successful COPYs into staging.'),
  c('stager', 'pg_heartbeat_stager_copy_failures_total', 'Failed COPYs into staging (their rows are kept and retried).'),
  h('stager', 'pg_heartbeat_stager_copy_duration_seconds', 'Duration of successful COPYs into staging, pool checkout included.'),
  g('stager', 'pg_heartbeat_stager_pending_agents', 'Agents whose newest update is not yet committed to staging.'),
  g('stager', 'pg_heartbeat_stager_retained_agents', 'Agents whose COPYed update is kept for a resend until a merge has consumed it.'),
  c('stager', 'pg_heartbeat_stager_staging_resets_total', 'Times staging was found reset (crash recovery, failover) and kept updates were resent.'),
  c('stager', 'pg_heartbeat_stager_resent_agents_total', 'Agents\' updates resent after staging resets.'),
  c('stager', 'pg_heartbeat_stager_dropped_by_disconnect_total', 'Pending updates dropped because a newer disconnect was written.'),
  c('merger', 'pg_heartbeat_merger_merges_total', 'Merge ticks that merged at least one part of staging.'),
  c('merger', 'pg_heartbeat_merger_skipped_ticks_total', 'Merge ticks that merged nothing: every part was being merged elsewhere (concurrent) or had just been (recent), or skipped without a statement because another merger\'s merge was heard (notified).', ['reason']),
  c('merger', 'pg_heartbeat_merger_failures_total', 'Failed merge ticks (retried on the next tick).'),
  g('merger', 'pg_heartbeat_merger_consecutive_failures', 'Failed merge ticks since the last successful one.'),
  c('merger', 'pg_heartbeat_merger_rows_consumed_total', 'Staged rows the merges consumed.'),
  c('merger', 'pg_heartbeat_merger_agents_updated_total', 'Agent rows the merges updated (heartbeats applied).'),
  c('merger', 'pg_heartbeat_merger_rows_skipped_total', 'Staged rows the merges skipped: older than the agent\'s row (stale), no such agent (unknown), invalid values.', ['reason']),
  c('merger', 'pg_heartbeat_merger_rows_deferred_total', 'Staged rows left for a later merge because the agent\'s row was locked.'),
  c('merger', 'pg_heartbeat_merger_rows_dead_lettered_total', 'Staged snapshots that could not be applied and were moved to heartbeat.dead_letters.'),
  c('merger', 'pg_heartbeat_merger_status_events_total', 'Status changes (heartbeat.status_events) recorded by this merger\'s merges and sweeps.'),
  c('merger', 'pg_heartbeat_merger_sweep_failures_total', 'Failed heartbeat.sweep_status() calls after a merge (the next tick sweeps again; time-based status events come later).'),
  h('merger', 'pg_heartbeat_merger_merge_duration_seconds', 'Duration of merge ticks that merged at least one part, round trips included.'),
  g('database', 'pg_heartbeat_status_up', 'Whether the last read of heartbeat.status succeeded within its deadline (1) or not (0).'),
  g('database', 'pg_heartbeat_staging_rows', 'Rows waiting in each part of staging.', ['part']),
  g('database', 'pg_heartbeat_staging_oldest_row_age_seconds', 'Age of the oldest staged row of each part (0 when the part is empty): the merge lag.', ['part']),
  g('database', 'pg_heartbeat_last_merge_age_seconds', 'Time since each part was last merged (no series until it has been, since the server started).', ['part']),
  c('database', 'pg_heartbeat_part_merges_total', 'Merges of each part since the server started (heartbeat.merge_state is UNLOGGED: a crash resets it).', ['part']),
  g('database', 'pg_heartbeat_dead_letters', 'Snapshots in heartbeat.dead_letters.'),
];

const COPY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
const MERGE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

type PromClient = typeof import('prom-client');
let promClient: Promise<PromClient> | undefined;

/** prom-client, imported on first use; a MetricsUnavailableError when it is not installed. */
function loadPromClient(): Promise<PromClient> {
  promClient ??= import('prom-client').then(
    (m) => ((m as { Counter?: unknown }).Counter ? m : (m as unknown as { default: PromClient }).default),
    (err: unknown) => {
      promClient = undefined;
      const code = (err as { code?: unknown } | null)?.code;
      if (code === 'ERR_MODULE_NOT_FOUND' || code === 'MODULE_NOT_FOUND') throw new MetricsUnavailableError(err);
      throw err;
    },
  );
  return promClient;
}

/** Reads heartbeat.status for the scrapes: one read at a time, reused for statusCacheMs, never rejecting. */
class StatusReader {
  #inflight: Promise<MergeStatus | null> | undefined;
  #at = -Infinity;
  #last: MergeStatus | null = null;
  #failing = false;

  constructor(
    private readonly pool: pg.Pool,
    private readonly timeoutMs: number,
    private readonly cacheMs: number,
    private readonly logger: Logger,
  ) {}

  read(): Promise<MergeStatus | null> {
    if (this.#inflight) return this.#inflight;
    if (performance.now() - this.#at < this.cacheMs) return Promise.resolve(this.#last);
    const started = performance.now();
    this.#inflight = readStatus({ pool: this.pool }, { timeoutMs: this.timeoutMs, lookUpCron: false, logger: silentLogger }).then(
      (status) => {
        if (this.#failing) this.logger.info('metrics: heartbeat.status is readable again');
        this.#failing = false;
        return status;
      },
      (err: unknown) => {
        if (!this.#failing) this.logger.warn('metrics: reading heartbeat.status failed; pg_heartbeat_status_up is 0 until it works', { error: err });
        this.#failing = true;
        return null;
      },
    ).then((status) => {
      this.#inflight = undefined;
      this.#at = started;
      this.#last = status;
      return status;
    });
    return this.#inflight;
  }
}

const sum = (stagers: HeartbeatStager[], key: keyof StagerStats): number =>
  stagers.reduce((total, s) => total + (s.stats()[key] ?? 0), 0);

/**
 * Registers pg-heartbeat's metrics on a prom-client registry (yours, or prom-client's default
 * `register`). Resolves to the names registered and an unregister(). Fails with
 * MetricsUnavailableError when prom-client is not installed, InvalidOptionError for a bad option,
 * and prom-client's own error when a name is already registered there.
 */
export async function registerHeartbeatMetrics(registry: MetricsRegistry, options: HeartbeatMetricsOptions = {}): Promise<HeartbeatMetrics> {
  if (!registry || typeof registry.registerMetric !== 'function' || typeof registry.removeSingleMetric !== 'function') {
    throw new InvalidOptionError('registry', 'must be a prom-client Registry (new Registry(), or prom-client\'s register)');
  }
  const stagers = options.stager === undefined ? [] : Array.isArray(options.stager) ? options.stager : [options.stager];
  for (const s of stagers) if (typeof s?.stats !== 'function') throw new InvalidOptionError('stager', 'must be a HeartbeatStager (or an array of them)');
  const merger = options.merger;
  if (merger !== undefined && typeof merger?.stats !== 'function') throw new InvalidOptionError('merger', 'must be the Merger startMerger() returned');
  const statusTimeoutMs = durationOption(options.statusTimeoutMs, 'statusTimeoutMs', 5_000);
  const statusCacheMs = durationOption(options.statusCacheMs, 'statusCacheMs', 1_000, 0);
  const logger = safeLogger(toLogger(options.logger ?? silentLogger));
  const prom = await loadPromClient();

  let pool: { pool: pg.Pool; owned: boolean } | undefined;
  if (options.database !== undefined) pool = resolvePool(options.database, logger, 'pg-heartbeat metrics', 1);
  const status = pool && new StatusReader(pool.pool, statusTimeoutMs, statusCacheMs, logger);

  const registers = [registry as unknown as InstanceType<PromClient['Registry']>];
  const registered: string[] = [];
  const unobserve: (() => void)[] = [];
  const def = (name: string): MetricDefinition => HEARTBEAT_METRICS.find((m) => m.name === name)!;

  /** A counter whose value(s) are read at scrape time. */
  const counter = (name: string, read: () => [Record<string, string | number>, number][] | Promise<[Record<string, string | number>, number][]>): void => {
    const d = def(name);
    new prom.Counter({
      name, help: d.help, labelNames: [...d.labels], registers,
      async collect() {
        const values = await read();
        this.reset();
        for (const [labels, value] of values) this.inc(labels, Math.max(0, value));
      },
    });
    registered.push(name);
  };
  const gauge = (name: string, read: () => [Record<string, string | number>, number][] | Promise<[Record<string, string | number>, number][]>): void => {
    const d = def(name);
    new prom.Gauge({
      name, help: d.help, labelNames: [...d.labels], registers,
      async collect() {
        const values = await read();
        this.reset();
        for (const [labels, value] of values) this.set(labels, value);
      },
    });
    registered.push(name);
  };
  const histogram = (name: string, buckets: number[]): InstanceType<PromClient['Histogram']> => {
    const metric = new prom.Histogram({ name, help: def(name).help, buckets, registers });
    registered.push(name);
    return metric;
  };
  const one = (value: number): [Record<string, string>, number][] => [[{}, value]];

  try {
    if (stagers.length > 0) {
      const stat = (key: keyof StagerStats) => () => one(sum(stagers, key));
      counter('pg_heartbeat_stager_updates_staged_total', stat('staged'));
      counter('pg_heartbeat_stager_updates_deduped_total', stat('deduped'));
      counter('pg_heartbeat_stager_updates_rejected_total', stat('rejected'));
      counter('pg_heartbeat_stager_rows_copied_total', stat('rowsCopied'));
      counter('pg_heartbeat_stager_copies_total', stat('copies'));
      counter('pg_heartbeat_stager_copy_failures_total', stat('failedCopies'));
      const copyDuration = histogram('pg_heartbeat_stager_copy_duration_seconds', COPY_BUCKETS);
      for (const s of stagers) {
        unobserve.push(observe(s, (o) => {
          if (o.kind === 'copy') copyDuration.observe(o.durationMs / 1000);
        }));
      }
      gauge('pg_heartbeat_stager_pending_agents', stat('pendingAgents'));
      gauge('pg_heartbeat_stager_retained_agents', stat('retainedAgents'));
      counter('pg_heartbeat_stager_staging_resets_total', stat('resets'));
      counter('pg_heartbeat_stager_resent_agents_total', stat('resentAgents'));
      counter('pg_heartbeat_stager_dropped_by_disconnect_total', stat('droppedByDisconnect'));
    }
    if (merger) {
      const m = () => merger.stats();
      counter('pg_heartbeat_merger_merges_total', () => one(m().merges));
      counter('pg_heartbeat_merger_skipped_ticks_total', () => {
        const s = m();
        return [[{ reason: 'concurrent' }, s.skippedConcurrent], [{ reason: 'recent' }, s.skippedRecent], [{ reason: 'notified' }, s.skippedNotified]];
      });
      counter('pg_heartbeat_merger_failures_total', () => one(m().failures));
      gauge('pg_heartbeat_merger_consecutive_failures', () => one(m().consecutiveFailures));
      counter('pg_heartbeat_merger_rows_consumed_total', () => one(m().rowsConsumed));
      counter('pg_heartbeat_merger_agents_updated_total', () => one(m().agentsUpdated));
      counter('pg_heartbeat_merger_rows_skipped_total', () => {
        const s = m();
        return [[{ reason: 'stale' }, s.skippedStale], [{ reason: 'unknown' }, s.skippedUnknown], [{ reason: 'invalid' }, s.skippedInvalid]];
      });
      counter('pg_heartbeat_merger_rows_deferred_total', () => one(m().deferredLocked));
      counter('pg_heartbeat_merger_rows_dead_lettered_total', () => one(m().deadLettered));
      counter('pg_heartbeat_merger_status_events_total', () => one(m().statusEvents));
      counter('pg_heartbeat_merger_sweep_failures_total', () => one(m().sweepFailures));
      const mergeDuration = histogram('pg_heartbeat_merger_merge_duration_seconds', MERGE_BUCKETS);
      unobserve.push(observe(merger, (o) => {
        if (o.kind === 'merge' && o.report.partsMerged > 0) mergeDuration.observe(o.report.durationMs / 1000);
      }));
    }
    if (status) {
      const parts = async <T>(f: (p: MergeStatus['parts'][number]) => T | undefined): Promise<[Record<string, number>, number][]> => {
        const s = await status.read();
        const out: [Record<string, number>, number][] = [];
        for (const p of s?.parts ?? []) {
          const v = f(p);
          if (typeof v === 'number') out.push([{ part: p.part }, v]);
        }
        return out;
      };
      gauge('pg_heartbeat_status_up', async () => one((await status.read()) === null ? 0 : 1));
      gauge('pg_heartbeat_staging_rows', () => parts((p) => p.stagedRows));
      gauge('pg_heartbeat_staging_oldest_row_age_seconds', () => parts((p) => (p.mergeLagMs ?? 0) / 1000));
      gauge('pg_heartbeat_last_merge_age_seconds', () => parts((p) => (p.lastMerge ? p.lastMerge.sinceMs / 1000 : undefined)));
      counter('pg_heartbeat_part_merges_total', () => parts((p) => p.mergesTotal));
      gauge('pg_heartbeat_dead_letters', async () => {
        const s = await status.read();
        return s === null ? [] : one(s.deadLetters);
      });
    }
  } catch (err) {
    // a name already registered there: leave the registry as it was
    for (const name of registered) registry.removeSingleMetric(name);
    for (const u of unobserve) u();
    if (pool?.owned) await endPool(pool.pool, 5000);
    throw err;
  }

  let unregistered: Promise<void> | undefined;
  return {
    names: [...registered],
    unregister() {
      unregistered ??= (async () => {
        for (const name of registered) registry.removeSingleMetric(name);
        for (const u of unobserve) u();
        if (pool?.owned) await endPool(pool.pool, 5000);
      })();
      return unregistered;
    },
  };
}
