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
import { countOption } from './options.ts';

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
  /**
   * How many hash parts staging has (1 to 64; default: leave it, 4 on a new install). Changing it is safe while
   * stagers COPY and mergers merge: heartbeat.set_staging_parts() moves every staged row, losing none. Applied
   * after an 'up' run; see docs/running-the-merge.md for choosing it.
   */
  stagingParts?: number;
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
  const stagingParts = options.stagingParts === undefined ? undefined : countOption(options.stagingParts, 'stagingParts', 4, 1, 64);
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
    if (stagingParts !== undefined && (options.direction ?? 'up') === 'up') {
      const { rows } = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM heartbeat.staging_parts()');
      if (rows[0]?.n !== stagingParts) {
        const moved = await client.query<{ n: string }>('SELECT heartbeat.set_staging_parts($1) AS n', [stagingParts]);
        logger.info(`staging now has ${stagingParts} part(s) (${moved.rows[0]?.n ?? 0} staged row(s) moved)`);
      }
    }
    if (options.durableStaging !== undefined && (options.direction ?? 'up') === 'up') {
      await setStagingDurability(client, options.durableStaging);
    }
    if ((options.direction ?? 'up') === 'up') {
      await checkPrivilegeModel(client);
      await warnMergeHazards(client, logger);
    }
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

/** The columns the merge (and disconnect_agent / disconnect_replica) write. */
const MERGE_COLUMNS = ['first_connected_at', 'last_connected_at', 'last_connected_replica_id', 'disconnected_at', 'updated_at'];

/**
 * What on public.workspace_agents (or, when it is a view, on the tables under it)
 * can make the merge's UPDATE fail for some rows: CHECK constraints, FOREIGN KEYs
 * over the columns it writes, and user triggers that fire on such an UPDATE.
 * One row per object: its kind, the table, its name and definition.
 */
const HAZARDS_SQL = `
WITH RECURSIVE rel AS (
    SELECT c.oid, c.relkind, 0 AS depth
      FROM pg_catalog.pg_class c
     WHERE c.oid = pg_catalog.to_regclass('public.workspace_agents')
    UNION
    -- a view: the tables (and views) its rule reads
    SELECT d.refobjid, c2.relkind, rel.depth + 1
      FROM rel
      JOIN pg_catalog.pg_rewrite rw ON rw.ev_class = rel.oid
      JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = rw.oid
                                 AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> rel.oid
      JOIN pg_catalog.pg_class c2 ON c2.oid = d.refobjid AND c2.relkind IN ('r', 'p', 'v')
     WHERE rel.relkind = 'v' AND rel.depth < 5
), cols AS (
    SELECT a.attrelid, a.attnum
      FROM pg_catalog.pg_attribute a JOIN rel ON rel.oid = a.attrelid
     WHERE a.attname = ANY ($1::text[]) OR rel.relkind <> 'r' OR rel.depth > 0
)
SELECT 'CHECK constraint' AS kind, co.conrelid::pg_catalog.regclass::text AS rel, co.conname::text AS name,
       pg_catalog.pg_get_constraintdef(co.oid) AS def
  FROM pg_catalog.pg_constraint co JOIN rel ON rel.oid = co.conrelid
 WHERE co.contype = 'c'
UNION ALL
SELECT 'FOREIGN KEY', co.conrelid::pg_catalog.regclass::text, co.conname::text, pg_catalog.pg_get_constraintdef(co.oid)
  FROM pg_catalog.pg_constraint co JOIN rel ON rel.oid = co.conrelid
 WHERE co.contype = 'f'
   AND (rel.depth > 0 OR EXISTS (SELECT 1 FROM cols WHERE cols.attrelid = co.conrelid AND cols.attnum = ANY (co.conkey)))
UNION ALL
SELECT 'trigger', t.tgrelid::pg_catalog.regclass::text, t.tgname::text, pg_catalog.pg_get_triggerdef(t.oid)
  FROM pg_catalog.pg_trigger t JOIN rel ON rel.oid = t.tgrelid
 WHERE NOT t.tgisinternal
   AND t.tgenabled <> 'D'
   AND (t.tgtype::integer & 16) <> 0       -- fires on UPDATE
   AND (pg_catalog.cardinality(t.tgattr::smallint[]) = 0 OR rel.depth > 0
        OR EXISTS (SELECT 1 FROM cols WHERE cols.attrelid = t.tgrelid AND cols.attnum = ANY (t.tgattr::smallint[])))
 ORDER BY 1, 2, 3`;

/**
 * Warns (one line per object) about what on workspace_agents can make the merge
 * fail for some rows: their snapshots go to heartbeat.dead_letters instead of
 * being applied. Never fails the migration.
 */
async function warnMergeHazards(client: pg.ClientBase, logger: Logger): Promise<void> {
  let rows: { kind: string; rel: string; name: string; def: string }[];
  try {
    ({ rows } = await client.query<{ kind: string; rel: string; name: string; def: string }>(HAZARDS_SQL, [MERGE_COLUMNS]));
  } catch (err) {
    logger.debug('could not inspect workspace_agents for constraints and triggers', { error: err });
    return;
  }
  for (const r of rows) {
    logger.warn(
      `${r.rel} has ${r.kind} ${JSON.stringify(r.name)} (${r.def}): a staged heartbeat it rejects is not applied but moved to ` +
        'heartbeat.dead_letters (see heartbeat.status.dead_letters; SELECT heartbeat.retry_dead_letters() after fixing the cause)',
      { kind: r.kind, table: r.rel, name: r.name },
    );
  }
}

/**
 * Refuses an unsafe privilege model on every run, also when no migration was
 * pending: heartbeat.check_privilege_model() (sql/015) raises when a SECURITY
 * DEFINER function is not owned by heartbeat_definer, or heartbeat_definer has
 * rights the owner of public.workspace_agents lacks while that table runs other
 * roles' code. Skipped before migration 015, and for a role that may not run the
 * check (only the schema's owner may: an application that migrates at startup
 * with a role that has nothing left to migrate is not stopped by it).
 */
async function checkPrivilegeModel(client: pg.ClientBase): Promise<void> {
  const { rows } = await client.query<{ can: boolean | null }>(
    "SELECT has_function_privilege(to_regprocedure('heartbeat.check_privilege_model()'), 'EXECUTE') AS can",
  );
  if (rows[0]?.can) await client.query('SELECT heartbeat.check_privilege_model()');
}
