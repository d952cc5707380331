/**
 * The database's own count of the statements the demo caused, read from
 * pg_stat_statements when it is loaded and installed in the database (the
 * COPY, merge and disconnect statements executed there), else from
 * pg_stat_database (transactions committed or rolled back in the database,
 * minus the demo's own monitoring queries, which run through `pool` here, and
 * minus the start-up transaction every new connection makes; both are counted
 * exactly here).
 *
 * pg_stat_statements is updated when a statement ends. pg_stat_database is
 * fed by each backend at most about once a second (and at exit), so its
 * running figure lags a little; finish() ends every connection of this counter
 * and waits for the figures to settle before the last reading.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';

/** Time a backend may hold its statistics before reporting them, plus margin. */
const STATS_SETTLE_MS = 1_500;

export type CounterSource = 'pg_stat_statements' | 'pg_stat_database';

export class StatementCounter {
  /** The monitoring pool (one connection): its queries are excluded from the count. */
  readonly pool: pg.Pool;
  #source: CounterSource = 'pg_stat_database';
  #readSql = '';
  #baseline = 0;
  #ownQueries = 0;
  #connects = 0;
  readonly #url: string;

  constructor(url: string) {
    this.#url = url;
    this.pool = new pg.Pool({ connectionString: url, max: 1, application_name: 'pg-heartbeat demo monitor' });
    this.pool.on('error', () => {});
    // Every query of the monitoring pool is counted, so pg_stat_database's figure can exclude them.
    const query = this.pool.query.bind(this.pool) as (...args: unknown[]) => unknown;
    (this.pool as { query: unknown }).query = (...args: unknown[]) => {
      this.#ownQueries++;
      return query(...args);
    };
    this.watch(this.pool);
  }

  /** Counts the connections `pool` opens: each one's start-up is a transaction in pg_stat_database. */
  watch(pool: pg.Pool): void {
    pool.on('connect', () => this.#connects++);
  }

  get source(): CounterSource {
    return this.#source;
  }

  /** What the figure counts, for the output. */
  get description(): string {
    return this.#source === 'pg_stat_statements'
      ? 'pg_stat_statements: COPY, merge and disconnect statements executed in this database'
      : 'pg_stat_database: transactions in this database, minus the demo\'s monitoring queries and connection start-ups';
  }

  /**
   * Picks the source and takes the baseline. Call it once every setup
   * connection is closed: with pg_stat_database, their statements must have
   * been reported before the baseline is read.
   */
  async start(): Promise<void> {
    const { rows } = await this.pool.query<{ schema: string }>(
      "SELECT n.nspname AS schema FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_stat_statements'",
    );
    if (rows[0]) {
      const view = `${pg.escapeIdentifier(rows[0].schema)}.pg_stat_statements`;
      const sql = `SELECT coalesce(sum(calls), 0)::float8 AS n FROM ${view}
         WHERE dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
           AND query NOT LIKE '%pg_stat_statements%'
           AND (query LIKE 'COPY %agent_connection_staging%'
                OR query LIKE '%heartbeat.merge_agent_connections(%'
                OR query LIKE '%heartbeat.merge_staging_part(%'
                OR query LIKE '%heartbeat.sweep_status()%'
                OR query LIKE '%heartbeat.disconnect_agent(%')`;
      try {
        await this.pool.query(sql); // fails when the library is not in shared_preload_libraries
        this.#source = 'pg_stat_statements';
        this.#readSql = sql;
      } catch {
        // fall back to pg_stat_database
      }
    }
    if (this.#source === 'pg_stat_database') {
      this.#readSql = `SELECT (xact_commit + xact_rollback)::float8 AS n FROM pg_catalog.pg_stat_database
                        WHERE datname = pg_catalog.current_database()`;
      await sleep(STATS_SETTLE_MS);
    }
    this.#ownQueries = 0;
    this.#connects = 0;
    this.#baseline = await this.#raw(this.pool);
  }

  /** Statements since start(), as the database reports them now. */
  async read(): Promise<number> {
    const own = this.#ownQueries + this.#connects;
    const raw = await this.#raw(this.pool);
    return Math.max(0, raw - this.#baseline - (this.#source === 'pg_stat_database' ? own : 0));
  }

  /**
   * The final figure. Call it once every connection that ran the demo's
   * statements is closed; ends this counter's pool.
   */
  async finish(): Promise<number> {
    if (this.#source === 'pg_stat_statements') {
      const n = await this.read();
      await this.pool.end();
      return n;
    }
    await this.pool.end(); // its backend reports its statistics as it exits
    await sleep(STATS_SETTLE_MS);
    const client = new pg.Client({ connectionString: this.#url, application_name: 'pg-heartbeat demo monitor' });
    client.on('error', () => {});
    await client.connect();
    try {
      // this reading's own transaction is not in the figure it reads, but its connection's start-up is (- 1)
      return Math.max(0, (await this.#raw(client)) - this.#baseline - this.#ownQueries - this.#connects - 1);
    } finally {
      await client.end().catch(() => {});
    }
  }

  /** Ends the pool without a reading (error paths). */
  async close(): Promise<void> {
    if (!this.pool.ended) await this.pool.end().catch(() => {});
  }

  async #raw(db: pg.Pool | pg.Client): Promise<number> {
    const { rows } = await db.query<{ n: number }>(this.#readSql);
    return rows[0]?.n ?? 0;
  }
}
