/**
 * One database per test file, on the cluster test/run.ts started
 * (TEST_DATABASE_URL) or on DATABASE_URL; migrated, and dropped afterwards.
 */
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { migrate } from '../../src/migrate.ts';
import { silentLogger } from '../../src/logger.ts';

export interface TestDb {
  name: string;
  url: string;
  /** A pool as the superuser. */
  pool: pg.Pool;
  /** Removes the database. */
  drop(): Promise<void>;
}

export function adminUrl(): string {
  const url = process.env.TEST_DATABASE_URL ?? process.env.DATABASE_URL;
  if (!url) throw new Error('no database: run the tests with `npm test` (it starts PostgreSQL) or set DATABASE_URL');
  return url;
}

export function withDatabase(url: string, database: string): string {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}

/** Creates a fresh database (migrated unless `migrated: false`) for one test file. */
export async function createTestDb(label: string, options: { migrated?: boolean; admin?: string } = {}): Promise<TestDb> {
  const admin = options.admin ?? adminUrl();
  const name = `hb_${label.replace(/[^a-z0-9]+/gi, '_').toLowerCase()}_${randomUUID().slice(0, 8)}`;
  const adminClient = new pg.Client({ connectionString: admin });
  await adminClient.connect();
  try {
    await adminClient.query(`CREATE DATABASE ${pg.escapeIdentifier(name)}`);
  } finally {
    await adminClient.end();
  }
  const url = withDatabase(admin, name);
  if (options.migrated !== false) await migrate({ connectionString: url }, { logger: silentLogger });
  const pool = new pg.Pool({ connectionString: url, max: 10 });
  pool.on('error', () => {});
  return {
    name,
    url,
    pool,
    drop: async () => {
      await pool.end();
      const c = new pg.Client({ connectionString: admin });
      await c.connect();
      try {
        await c.query(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`);
      } finally {
        await c.end();
      }
    },
  };
}

/** Inserts `n` agents (or the given ids) into workspace_agents with an old updated_at; returns their ids. */
export async function createAgents(pool: pg.Pool, n: number, updatedAt = new Date('2020-01-01T00:00:00Z')): Promise<string[]> {
  const ids = Array.from({ length: n }, () => randomUUID());
  await pool.query('INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), $2', [ids, updatedAt]);
  return ids;
}

/**
 * A backlog: `n` new agents (updated an hour ago), each with one connection staged now, in SQL (no COPY:
 * hundreds of thousands in a second or two).
 */
export async function stageBacklog(pool: pg.Pool, n: number): Promise<void> {
  await pool.query(
    `WITH agents AS (
       INSERT INTO public.workspace_agents (id, updated_at)
       SELECT gen_random_uuid(), now() - interval '1 hour' FROM generate_series(1, $1::int4)
       RETURNING id)
     INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
     SELECT id, now(), now() FROM agents`,
    [n],
  );
}

export interface AgentRow {
  id: string;
  first_connected_at: Date | null;
  last_connected_at: Date | null;
  disconnected_at: Date | null;
  last_connected_replica_id: string | null;
  updated_at: Date;
}

export async function agentRow(pool: pg.Pool, id: string): Promise<AgentRow> {
  const { rows } = await pool.query<AgentRow>(
    'SELECT id, first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id, updated_at FROM public.workspace_agents WHERE id = $1',
    [id],
  );
  if (!rows[0]) throw new Error(`agent ${id} not found`);
  return rows[0];
}

export async function stagedCount(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.agent_connection_staging');
  return Number(rows[0]!.n);
}

/** Runs one statement on the cluster's admin database (for cluster-wide objects such as roles). */
export async function adminQuery(sql: string, params: unknown[] = []): Promise<pg.QueryResult> {
  const c = new pg.Client({ connectionString: adminUrl() });
  await c.connect();
  try {
    return await c.query(sql, params);
  } finally {
    await c.end();
  }
}
