import { join } from 'node:path';
import { runner } from 'node-pg-migrate';
import pg from 'pg';
import type { ConnectionOptions } from './connection.ts';
import { HeartbeatError, toHeartbeatError } from './errors.ts';
import { safeLogger } from './safe-logger.ts';
import { toLogger, type Logger } from './logger.ts';
import { setStagingDurability } from './durability.ts';
import { PACKAGE_ROOT } from './paths.ts';
import { assertSessionConnection } from './pooler.ts';

/** The folder of pg-heartbeat's node-pg-migrate migrations (each applies one file of sql/). */
export const MIGRATIONS_DIR = join(PACKAGE_ROOT, 'migrations');
/** node-pg-migrate's bookkeeping table, kept in the heartbeat schema. */
export const MIGRATIONS_TABLE = { schema: 'heartbeat', table: 'migrations' } as const;

export interface MigrateOptions {
  /** 'up' (default) applies everything pending; 'down' reverts `count` migrations. */
  direction?: 'up' | 'down';
  /** How many migrations to apply or revert (default: all up, one down). */
  count?: number;
  logger?: Logger;
  /**
   * true: make the staging table LOGGED, so staged rows survive a crash (costs WAL per COPY and merge);
   * false: make it UNLOGGED (the default layout); undefined: leave it as it is. Applied after an 'up' run.
   */
  durableStaging?: boolean;
}

/**
 * Applies pg-heartbeat's migrations. Safe to run from many replicas at once:
 * node-pg-migrate serialises runs with an advisory lock (the others wait) and
 * each run is one transaction. Needs a direct (session) connection, not a
 * transaction pooler such as pgbouncer in transaction mode.
 * Resolves to the names of the migrations it ran.
 */
export async function migrate(connection: ConnectionOptions, options: MigrateOptions = {}): Promise<string[]> {
  const logger = safeLogger(toLogger(options.logger));
  const client =
    'pool' in connection ? await connection.pool.connect() : new pg.Client({ connectionString: connection.connectionString });
  const owned = !('pool' in connection);
  const onError = (err: unknown): void => logger.warn('migration connection failed', { error: err });
  client.on('error', onError);
  try {
    if (owned) await (client as pg.Client).connect();
    // node-pg-migrate's session advisory lock needs a direct connection: refuse a transaction pooler (src/pooler.ts)
    await assertSessionConnection(client, 'pool' in connection ? connection.pool.options : { connectionString: connection.connectionString }, logger);
    const ran = await runner({
      dbClient: client,
      dir: MIGRATIONS_DIR,
      migrationsSchema: MIGRATIONS_TABLE.schema,
      migrationsTable: MIGRATIONS_TABLE.table,
      createMigrationsSchema: true,
      direction: options.direction ?? 'up',
      count: options.count ?? (options.direction === 'down' ? 1 : Infinity),
      singleTransaction: true,
      checkOrder: true,
      advisoryLockMode: 'wait',
      logger: { debug() {}, info: (m: string) => logger.debug(m), warn: (m: string) => logger.warn(m), error: (m: string) => logger.error(m) },
    });
    if (options.durableStaging !== undefined && (options.direction ?? 'up') === 'up') {
      await setStagingDurability(client, options.durableStaging);
    }
    if ((options.direction ?? 'up') === 'up') await checkPrivilegeModel(client);
    return ran.map((m) => m.name);
  } catch (err) {
    if (err instanceof HeartbeatError) throw err;
    throw toHeartbeatError(err, 'migrate');
  } finally {
    client.off('error', onError);
    if (owned) await (client as pg.Client).end().catch(() => {});
    else (client as pg.PoolClient).release();
  }
}

/**
 * Refuses an unsafe privilege model on every run, also when no migration was
 * pending: heartbeat.check_privilege_model() (sql/014) raises when a SECURITY
 * DEFINER function is not owned by heartbeat_definer, or heartbeat_definer has
 * rights the owner of public.workspace_agents lacks while that table runs other
 * roles' code. Skipped before migration 014, and for a role that may not run the
 * check (only the schema's owner may: an application that migrates at startup
 * with a role that has nothing left to migrate is not stopped by it).
 */
async function checkPrivilegeModel(client: pg.ClientBase): Promise<void> {
  const { rows } = await client.query<{ can: boolean | null }>(
    "SELECT has_function_privilege(to_regprocedure('heartbeat.check_privilege_model()'), 'EXECUTE') AS can",
  );
  if (rows[0]?.can) await client.query('SELECT heartbeat.check_privilege_model()');
}
