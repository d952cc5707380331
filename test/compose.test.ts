/**
 * docker-compose.yml, checked without a Docker engine: the file is parsed and
 * the services, ports, preload settings and commands users rely on are
 * asserted; then the postgres service's own `-c` settings and init script start
 * a real PostgreSQL with pg_cron (Debian postgresql-15-cron), which the
 * migrations and `heartbeat.schedule_merge()` are run against.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import pg from 'pg';
import { parse } from 'yaml';
import { silentLogger } from '../src/logger.ts';
import { migrate } from '../src/migrate.ts';
import { startCli } from './support/cli-process.ts';
import { type Cluster, startCluster } from './support/cluster.ts';
import { createTestDb } from './support/db.ts';
import { scrape, value } from './support/prometheus.ts';

interface Service {
  build?: { context: string; dockerfile: string };
  image?: string;
  command?: string[];
  environment?: Record<string, string>;
  ports?: string[];
  volumes?: string[];
  healthcheck?: { test: string[]; timeout?: string };
  depends_on?: Record<string, { condition: string }>;
  restart?: string;
  profiles?: string[];
}

const compose = parse(readFileSync('docker-compose.yml', 'utf8'), { merge: true }) as {
  services: Record<string, Service>;
  volumes?: Record<string, unknown>;
};
const { postgres, migrate: migrateService, demo, merger } = compose.services as Record<string, Service | undefined>;

/** `-c name=value` pairs of a postgres command line. */
function settingsOf(command: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  command.forEach((arg, i) => {
    if (arg === '-c') {
      const [name, ...value] = command[i + 1]!.split('=');
      out[name!] = value.join('=');
    }
  });
  return out;
}

describe('docker-compose.yml', () => {
  test('has the postgres, migrate, merger and demo services', () => {
    assert.ok(postgres && migrateService && merger && demo, `services: ${Object.keys(compose.services).join(', ')}`);
  });

  test('postgres: pg_cron preloaded in the database it creates, port 5432 published, healthcheck, data volume', () => {
    const pgc = postgres!;
    assert.equal(pgc.command?.[0], 'postgres');
    const settings = settingsOf(pgc.command!);
    assert.match(settings.shared_preload_libraries ?? '', /(^|,)\s*pg_cron\s*(,|$)/);
    assert.equal(settings['cron.database_name'], pgc.environment?.POSTGRES_DB, 'pg_cron lives in the database the image creates');
    assert.ok(pgc.ports?.some((p) => /(^|:)5432:5432$/.test(p)), `ports ${pgc.ports}`);
    assert.match(pgc.healthcheck?.test.join(' ') ?? '', /pg_isready/);
    assert.ok(pgc.volumes?.some((v) => v.endsWith(':/var/lib/postgresql/data')));
    const dockerfile = join(pgc.build!.context, pgc.build!.dockerfile);
    const text = readFileSync(dockerfile, 'utf8');
    assert.match(text, /^FROM postgres:1[4-8]\b/m, 'an official image of a supported major');
    assert.match(text, /apt-get install[^\n]*postgresql-\$\{PG_MAJOR\}-cron/, 'installs the distribution\'s pg_cron package');
    assert.match(text, /COPY initdb\/ \/docker-entrypoint-initdb\.d\//);
    assert.match(readFileSync(join(pgc.build!.context, 'initdb', '010_pg_cron.sql'), 'utf8'), /CREATE EXTENSION IF NOT EXISTS pg_cron;/);
  });

  test('migrate: a one-shot `pg-heartbeat migrate` against the postgres service directly, once it is healthy', () => {
    const m = migrateService!;
    assert.deepEqual(m.command, ['migrate']);
    assert.equal(m.restart, 'no');
    assert.deepEqual(m.depends_on?.postgres, { condition: 'service_healthy' });
    const url = new URL(m.environment!.DATABASE_URL!);
    assert.equal(url.hostname, 'postgres', 'migrations need a direct connection, not a pooler');
    assert.equal(url.port, '5432');
    assert.equal(url.pathname, `/${postgres!.environment!.POSTGRES_DB}`);
    assert.equal(decodeURIComponent(url.password), postgres!.environment!.POSTGRES_PASSWORD);
    assert.equal(decodeURIComponent(url.username), postgres!.environment!.POSTGRES_USER);
  });

  test('demo: `docker compose run --rm demo` runs after the migrations, with the same image and database', () => {
    const d = demo!;
    assert.equal(d.command?.[0], 'demo');
    assert.deepEqual(d.depends_on?.migrate, { condition: 'service_completed_successfully' });
    assert.equal(d.image, migrateService!.image);
    assert.equal(d.environment?.DATABASE_URL, migrateService!.environment?.DATABASE_URL);
    assert.match(readFileSync('docs/docker.md', 'utf8'), /docker compose run --rm demo/);
  });

  test('the app image runs the package\'s CLI (the `pg-heartbeat` bin) compiled from this checkout', () => {
    const b = migrateService!.build!;
    const text = readFileSync(join(b.context, b.dockerfile), 'utf8');
    const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { bin: Record<string, string>; engines: { node: string } };
    const bin = pkg.bin['pg-heartbeat']!.replace(/^\.\//, '');
    assert.match(text, new RegExp(`ENTRYPOINT \\["node", "${bin.replace(/\./g, '\\.')}"\\]`));
    assert.match(text, /^FROM node:20\b/m);
    for (const dir of ['src', 'sql', 'migrations']) assert.match(text, new RegExp(`COPY ${dir} \\./${dir}`));
    assert.ok(existsSync(`${b.dockerfile}.dockerignore`), 'a Dockerfile-specific .dockerignore keeps node_modules out of the context');
  });
});

describe('the merger service', () => {
  /** The healthcheck's CLI arguments (after `node <bin>`). */
  const healthArgs = (): string[] => {
    const t = merger!.healthcheck!.test;
    const pkg = JSON.parse(readFileSync('package.json', 'utf8')) as { bin: Record<string, string> };
    assert.deepEqual(t.slice(0, 3), ['CMD', 'node', pkg.bin['pg-heartbeat']!.replace(/^\.\//, '')], 'runs the image\'s CLI');
    return t.slice(3);
  };

  test('a long-running `pg-heartbeat merger` with /metrics on 0.0.0.0 inside, published on the host\'s 127.0.0.1 only', () => {
    const m = merger!;
    assert.ok(m, 'a merger service');
    assert.equal(m.command?.[0], 'merger');
    const cmd = m.command!;
    const port = cmd[cmd.indexOf('--metrics-port') + 1];
    assert.equal(port, '9187');
    assert.equal(cmd[cmd.indexOf('--metrics-host') + 1], '0.0.0.0', 'in a container 127.0.0.1 is the container itself');
    assert.deepEqual(m.ports, [`127.0.0.1:${port}:${port}`]);
    assert.equal(m.restart, 'unless-stopped');
    assert.deepEqual(m.depends_on?.migrate, { condition: 'service_completed_successfully' });
    assert.equal(m.image, migrateService!.image);
    assert.equal(m.environment?.DATABASE_URL, migrateService!.environment?.DATABASE_URL);
    const args = healthArgs();
    assert.deepEqual(args.slice(0, 2), ['status', '--check']);
    const timeout = args[args.indexOf('--timeout') + 1]!;
    assert.ok(parseFloat(timeout) < parseFloat(m.healthcheck!.timeout!), `--timeout ${timeout} is inside the healthcheck's timeout ${m.healthcheck!.timeout}`);
    assert.match(readFileSync('docs/docker.md', 'utf8'), /docker compose up -d merger/);
  });

  test('the image has prom-client and everything it needs (copied from the build stage)', () => {
    const text = readFileSync(join(migrateService!.build!.context, migrateService!.build!.dockerfile), 'utf8');
    const needed = new Set<string>();
    const visit = (name: string): void => {
      if (needed.has(name)) return;
      needed.add(name);
      const pkg = JSON.parse(readFileSync(`node_modules/${name}/package.json`, 'utf8')) as { dependencies?: Record<string, string> };
      for (const dep of Object.keys(pkg.dependencies ?? {})) visit(dep);
    };
    visit('prom-client');
    for (const name of needed) assert.match(text, new RegExp(`COPY --from=build /app/node_modules/${name} \\./node_modules/${name}\\n`), `${name} is copied`);
  });

  test('its command serves /metrics and its healthcheck says healthy, against a real database', async () => {
    const db = await createTestDb('compose_merger');
    const cmd = merger!.command!.map((a, i, all) => (all[i - 1] === '--metrics-port' ? '0' : a)); // any free port here
    const run = startCli(cmd, { DATABASE_URL: db.url });
    try {
      const url = await (async () => {
        for (const deadline = Date.now() + 60_000; Date.now() < deadline; await new Promise((r) => setTimeout(r, 50))) {
          const m = /serving metrics on http:\/\/0\.0\.0\.0:(\d+)\/metrics/.exec(run.stdout());
          if (m) return `http://127.0.0.1:${m[1]}/metrics`;
          if (run.child.exitCode !== null) break;
        }
        throw new Error(`no metrics URL: ${run.stdout()} ${run.stderr()}`);
      })();
      assert.equal(value(await scrape(url), 'pg_heartbeat_status_up'), 1);
      const health = await startCli(healthArgs(), { DATABASE_URL: db.url }).done;
      assert.equal(health.code, 0, health.stderr);
      assert.match(health.stdout, /^healthy: /);
    } finally {
      run.child.kill('SIGTERM');
      await run.done;
      await db.drop();
    }
  });
});

describe('the postgres service settings on a real server', () => {
  let cluster: Cluster | undefined;
  after(async () => {
    await cluster?.destroy();
  });

  test('preload pg_cron so the init script, the migrations and heartbeat.schedule_merge() work', async (t) => {
    const hasCron = existsSync('/usr/lib/postgresql/15/lib/pg_cron.so');
    if (!hasCron) {
      if (process.env.CI === 'true') throw new Error('CI: pg_cron (postgresql-15-cron) is missing');
      console.log('# skipping: pg_cron is not installed (Debian package postgresql-15-cron)');
      t.skip('pg_cron is not installed');
      return;
    }
    const settings = settingsOf(postgres!.command!);
    cluster = await startCluster({ binDir: '/usr/lib/postgresql/15/bin', settings });
    const dbName = postgres!.environment!.POSTGRES_DB!;
    const admin = new pg.Client({ connectionString: cluster.url() });
    await admin.connect();
    await admin.query(`CREATE DATABASE ${pg.escapeIdentifier(dbName)}`);
    await admin.end();
    const url = cluster.url(dbName);
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    try {
      await client.query(readFileSync('docker/initdb/010_pg_cron.sql', 'utf8'));
      assert.ok((await migrate({ connectionString: url }, { logger: silentLogger })).length >= 5);
      const job = await client.query<{ job_name: string }>("SELECT job_name FROM heartbeat.schedule_merge('5 seconds')");
      assert.equal(job.rows[0]!.job_name, 'pg-heartbeat-merge');
      const { rows } = await client.query<{ n: string }>("SELECT count(*) AS n FROM cron.job WHERE jobname = 'pg-heartbeat-merge'");
      assert.equal(Number(rows[0]!.n), 1);
    } finally {
      await client.end();
    }
  });
});
