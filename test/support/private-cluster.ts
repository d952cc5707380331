/**
 * For test files that stop, crash or restart PostgreSQL: a cluster of their own
 * (so other files are not disturbed) with one migrated database, and a record
 * of every unhandled rejection or uncaught exception while the file runs.
 * Call at the top level of a test file; the hooks start and destroy it.
 */
import { after, before } from 'node:test';
import { startCluster, type Cluster } from './cluster.ts';
import { createTestDb, type TestDb } from './db.ts';

export interface PrivateCluster {
  readonly cluster: Cluster;
  readonly db: TestDb;
  /** Unhandled rejections and uncaught exceptions seen since before(). */
  readonly crashes: unknown[];
}

export function privateCluster(label: string, settings: Record<string, string | number> = {}): PrivateCluster {
  let cluster: Cluster | undefined;
  let db: TestDb | undefined;
  const crashes: unknown[] = [];
  const onUnhandled = (err: unknown): void => void crashes.push(err);
  before(async () => {
    process.on('unhandledRejection', onUnhandled);
    process.on('uncaughtException', onUnhandled);
    cluster = await startCluster({ settings: { shared_buffers: '32MB', max_connections: 40, ...settings } });
    db = await createTestDb(label, { admin: cluster.url() });
  });
  after(async () => {
    process.off('unhandledRejection', onUnhandled);
    process.off('uncaughtException', onUnhandled);
    await db?.drop().catch(() => {});
    await cluster?.destroy();
  });
  return {
    get cluster() {
      if (!cluster) throw new Error('privateCluster: used before its before() hook ran');
      return cluster;
    },
    get db() {
      if (!db) throw new Error('privateCluster: used before its before() hook ran');
      return db;
    },
    crashes,
  };
}
