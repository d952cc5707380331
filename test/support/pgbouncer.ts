/**
 * A throwaway pgbouncer (Debian package `pgbouncer`) in front of a test
 * cluster: generated ini and auth file in a temp dir, a free port, auth_type =
 * trust. pgbouncer refuses to run as root, so as root it runs as the `postgres`
 * OS user. Each entry of `databases` is an alias with its own pool_mode.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from './cluster.ts';

export const PGBOUNCER_BIN = process.env.PGBOUNCER_BIN ?? '/usr/sbin/pgbouncer';

export interface PgbouncerDatabase {
  /** The real database name on the server. */
  dbname: string;
  poolMode: 'session' | 'transaction' | 'statement';
  /** Server connections per user and database (default 4). */
  poolSize?: number;
}

export interface Pgbouncer {
  readonly port: number;
  /** Connection URL of an alias through pgbouncer, as `user` (default postgres). */
  url(alias: string, user?: string): string;
  log(): string;
  /** Stops pgbouncer and removes its files. Idempotent. */
  stop(): Promise<void>;
}

export function pgbouncerAvailable(): boolean {
  return existsSync(PGBOUNCER_BIN);
}

function osUser(): { uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  return {
    uid: Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim()),
    gid: Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim()),
  };
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port }, () => {
      socket.end();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}

/** Starts pgbouncer in front of PostgreSQL at 127.0.0.1:`serverPort`. */
export async function startPgbouncer(options: {
  serverPort: number;
  databases: Record<string, PgbouncerDatabase>;
  users?: string[];
}): Promise<Pgbouncer> {
  const user = osUser();
  const dir = mkdtempSync(join(tmpdir(), 'pg-heartbeat-pgbouncer-'));
  const port = await freePort();
  const users = ['postgres', ...(options.users ?? [])];
  const databases = Object.entries(options.databases).map(
    ([alias, d]) =>
      `${alias} = host=127.0.0.1 port=${options.serverPort} dbname=${d.dbname} pool_mode=${d.poolMode} pool_size=${d.poolSize ?? 4}`,
  );
  const ini = [
    '[databases]',
    ...databases,
    '',
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    'auth_type = trust',
    `auth_file = ${join(dir, 'userlist.txt')}`,
    `logfile = ${join(dir, 'pgbouncer.log')}`,
    `pidfile = ${join(dir, 'pgbouncer.pid')}`,
    'admin_users = postgres',
    'max_client_conn = 200',
    'default_pool_size = 4',
    'ignore_startup_parameters = extra_float_digits,options',
    'server_login_retry = 1',
    '',
  ].join('\n');
  writeFileSync(join(dir, 'pgbouncer.ini'), ini);
  writeFileSync(join(dir, 'userlist.txt'), users.map((u) => `"${u}" ""`).join('\n') + '\n');
  if (user) {
    for (const f of ['', 'pgbouncer.ini', 'userlist.txt']) chownSync(join(dir, f), user.uid, user.gid);
  }
  const child: ChildProcess = spawn(PGBOUNCER_BIN, [join(dir, 'pgbouncer.ini')], {
    ...(user ?? {}),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout?.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (output += d.toString()));
  let exited = false;
  const exit = new Promise<void>((resolve) => child.on('exit', () => {
    exited = true;
    resolve();
  }));
  const logFile = join(dir, 'pgbouncer.log');
  const log = (): string => output + (existsSync(logFile) ? readFileSync(logFile, 'utf8') : '');
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    if (!exited) {
      child.kill('SIGINT'); // immediate shutdown
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exit;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  for (let i = 0; ; i++) {
    if (exited || i > 200) {
      const text = log();
      await stop();
      throw new Error(`pgbouncer did not start: ${text}`);
    }
    if (await canConnect(port)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    url: (alias, as = 'postgres') => `postgresql://${as}@127.0.0.1:${port}/${alias}`,
    log,
    stop,
  };
}
