export { HeartbeatStager, type StagerOptions, type StagerStats } from './stager.ts';
export { mergeNow, type MergeResult } from './merge.ts';
export { migrate, type MigrateOptions, MIGRATIONS_DIR, MIGRATIONS_TABLE } from './migrate.ts';
export type { ConnectionOptions } from './connection.ts';
export type { AgentDisconnect, AgentUpdate } from './update.ts';
export { consoleLogger, silentLogger, type Logger } from './logger.ts';
export {
  ClosedError,
  ConnectionError,
  DatabaseError,
  HeartbeatError,
  InvalidUpdateError,
  MigrationsMissingError,
  PermissionDeniedError,
  TimeoutError,
} from './errors.ts';
