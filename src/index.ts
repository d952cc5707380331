export { HeartbeatStager, type CloseReport, type StagerOptions, type StagerStats } from './stager.ts';
export { mergeNow, type MergeOptions, type MergeResult } from './merge.ts';
export { migrate, type MigrateOptions, MIGRATIONS_DIR, MIGRATIONS_TABLE } from './migrate.ts';
export { startMerger, type Merger, type MergerOptions, type MergeReport, type MergerStats } from './merger.ts';
export { checkTimingInvariant, TIMING_DEFAULTS, type TimingCheck, type TimingOptions } from './invariant.ts';
export { scheduleMerge, unscheduleMerge, type MergeJob, type ScheduleOptions } from './schedule.ts';
export { readStatus, agentStatus, type MergeStatus, type PartStatus, type AgentStatus, type AgentConnectionStatus } from './status.ts';
export {
  registerHeartbeatMetrics,
  HEARTBEAT_METRICS,
  type HeartbeatMetrics,
  type HeartbeatMetricsOptions,
  type MetricDefinition,
  type MetricsRegistry,
} from './metrics.ts';
export { serveMetrics, type MetricsServer, type MetricsServerOptions, type MetricsSource } from './metrics-server.ts';
export {
  watchStatusChanges,
  type StatusChange,
  type StatusChangeReason,
  type StatusWatcher,
  type WatchOptions,
  type WatcherStats,
} from './status-events.ts';
export { assertSessionConnection, TransactionPoolerError } from './pooler.ts';
export type { ConnectionOptions } from './connection.ts';
export type { AgentDisconnect, AgentUpdate } from './update.ts';
export {
  consoleLogger,
  silentLogger,
  toLogger,
  pinoLogger,
  winstonLogger,
  serializeError,
  type Logger,
  type ObjectFirstLogger,
  type MessageFirstLogger,
} from './logger.ts';
export {
  ClosedError,
  ConnectionError,
  DatabaseError,
  EventsPurgedError,
  HeartbeatError,
  InvalidOptionError,
  InvalidUpdateError,
  MetricsUnavailableError,
  MigrationsMissingError,
  PermissionDeniedError,
  TimeoutError,
} from './errors.ts';
