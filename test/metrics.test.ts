/**
 * Prometheus metrics, for real: a `pg-heartbeat merger --metrics-port` child process scraped over HTTP
 * while a HeartbeatStager stages and COPYs into a real database; stager metrics on a user's registry;
 * scrapes that fail or a database that never answers; and pg-heartbeat with prom-client missing.
 */
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { Counter, Registry } from 'prom-client';
import {
  HeartbeatStager, HEARTBEAT_METRICS, InvalidUpdateError, mergeNow, registerHeartbeatMetrics, serveMetrics, silentLogger, startMerger,
} from '../src/index.ts';
import { startCli } from './support/cli-process.ts';
import { createAgents, createTestDb, stagedCount, type TestDb } from './support/db.ts';
import { parseExposition, scrape, value } from './support/prometheus.ts';
import { waitFor } from './support/wait.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const exec = promisify(execFile);

let db: TestDb;
before(async () => {
  db = await createTestDb('metrics');
});
after(async () => {
  await db.drop();
});

describe('pg-heartbeat merger --metrics-port, scraped over HTTP', () => {
  test('merges_total rises, the backlog falls after a merge, heartbeats applied are counted', async () => {
    const run = startCli(['merger', '--interval-ms', '3000', '--metrics-port', '0', '--database-url', db.url]);
    const stager = new HeartbeatStager({ connectionString: db.url }, { flushIntervalMs: 60_000, logger: silentLogger });
    try {
      const url = (await waitFor(() => /serving metrics on (http:\/\/127\.0\.0\.1:\d+\/metrics)/.exec(run.stdout())?.[1], 'the metrics URL', 60_000))!;
      const first = await scrape(url);
      assert.equal(value(first, 'pg_heartbeat_status_up'), 1);
      for (const d of HEARTBEAT_METRICS.filter((m) => m.source !== 'stager')) {
        assert.equal(first.types.get(d.name), d.type, `${d.name} is served as a ${d.type}`);
        assert.equal(first.help.get(d.name), d.help, `${d.name} has its HELP text`);
      }
      assert.ok((value(first, 'process_cpu_seconds_total') ?? -1) >= 0, 'the process\'s default metrics are there too');
      const parts = first.samples.filter((s) => s.name === 'pg_heartbeat_staging_rows').map((s) => s.labels.part).sort();
      assert.ok(parts.length >= 1, 'one staging_rows series per part');

      // heartbeats flow: stage and COPY a batch, see it as backlog, see a merge take it
      let sawBacklog = false;
      let applied = 0;
      for (let attempt = 0; attempt < 8 && !sawBacklog; attempt++) {
        const ids = await createAgents(db.pool, 200);
        for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: new Date(), updatedAt: new Date() });
        await stager.flush();
        applied += ids.length;
        // a scrape shows the backlog once its status read is newer than the COPY (reads are reused for 1 s);
        // if a merge tick took the rows first, try again with another batch
        const mergesAtCopy = value(await scrape(url), 'pg_heartbeat_merger_merges_total')!;
        const before = (await waitFor(async () => {
          const e = await scrape(url);
          return value(e, 'pg_heartbeat_staging_rows')! > 0 || value(e, 'pg_heartbeat_merger_merges_total')! > mergesAtCopy ? e : undefined;
        }, 'the backlog or a merge', 30_000))!;
        if (value(before, 'pg_heartbeat_staging_rows') === 0) continue;
        sawBacklog = true;
        assert.ok(value(before, 'pg_heartbeat_staging_oldest_row_age_seconds')! >= 0);
        const mergesBefore = value(before, 'pg_heartbeat_merger_merges_total')!;
        const after = (await waitFor(async () => {
          const e = await scrape(url);
          return value(e, 'pg_heartbeat_merger_merges_total')! > mergesBefore && value(e, 'pg_heartbeat_staging_rows') === 0 ? e : undefined;
        }, 'a merge that empties staging', 60_000))!;
        assert.equal(value(after, 'pg_heartbeat_staging_oldest_row_age_seconds'), 0);
        assert.ok(value(after, 'pg_heartbeat_merger_merge_duration_seconds_count')! >= 1, 'the merge was timed');
      }
      assert.ok(sawBacklog, 'a scrape saw staged rows before a merge took them');
      const last = (await waitFor(async () => {
        const e = await scrape(url);
        return value(e, 'pg_heartbeat_merger_rows_consumed_total')! >= 1 ? e : undefined;
      }, 'rows consumed', 30_000))!;
      // the first merge runs before the loop (not counted); everything later is: some of the batches at least
      assert.ok(value(last, 'pg_heartbeat_merger_agents_updated_total')! >= 200 && value(last, 'pg_heartbeat_merger_agents_updated_total')! <= applied);
      assert.ok(value(last, 'pg_heartbeat_last_merge_age_seconds')! >= 0, 'every part has been merged');
      assert.equal(value(last, 'pg_heartbeat_merger_failures_total'), 0);
      assert.equal(await stagedCount(db.pool), 0);
      const health = await fetch(url.replace('/metrics', '/healthz'));
      assert.equal(health.status, 200);
      assert.equal((await fetch(url.replace('/metrics', '/nothing'))).status, 404);
    } finally {
      await stager.close();
      run.child.kill('SIGTERM');
    }
    const result = await run.done;
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^stopped: \d+ merge\(s\)/m);
  });

  test('--metrics-host without --metrics-port, a bad port, a port in use: one line each', async () => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const port = (busy.address() as { port: number }).port;
    try {
      const [noPort, badPort, inUse] = await Promise.all([
        startCli(['merger', '--metrics-host', '0.0.0.0', '--database-url', db.url]).done,
        startCli(['merger', '--metrics-port', 'http', '--database-url', db.url]).done,
        startCli(['merger', '--metrics-port', String(port), '--database-url', db.url]).done,
      ]);
      assert.equal(noPort.code, 1);
      assert.match(noPort.stderr, /^pg-heartbeat merger: --metrics-host needs --metrics-port\n$/);
      assert.equal(badPort.code, 1);
      assert.match(badPort.stderr, /^pg-heartbeat merger: --metrics-port must be a TCP port from 0 to 65535, not "http"\n$/);
      assert.equal(inUse.code, 1);
      assert.match(inUse.stderr.trim().split('\n').at(-1)!, /^pg-heartbeat merger: .*EADDRINUSE/);
    } finally {
      busy.close();
    }
  });
});

describe('registerHeartbeatMetrics() on your own registry', () => {
  test('stager metrics move with stage(), rejects, dedupes and flush(); served by serveMetrics()', async () => {
    const registry = new Registry();
    const stager = new HeartbeatStager({ pool: db.pool }, { flushIntervalMs: 60_000, logger: silentLogger });
    const metrics = await registerHeartbeatMetrics(registry, { stager });
    const server = await serveMetrics(registry, { port: 0 });
    try {
      assert.equal(server.host, '127.0.0.1', 'localhost only unless told otherwise');
      const [a, b] = await createAgents(db.pool, 2);
      const zero = await scrape(server.url);
      assert.equal(value(zero, 'pg_heartbeat_stager_updates_staged_total'), 0);
      assert.equal(value(zero, 'pg_heartbeat_merger_merges_total'), undefined, 'no merger given: no merger metrics');
      assert.equal(value(zero, 'pg_heartbeat_status_up'), undefined, 'no database given: no status metrics');
      stager.stage({ agentId: a!, lastConnectedAt: new Date(), updatedAt: new Date(Date.now() - 1000) });
      stager.stage({ agentId: a!, lastConnectedAt: new Date(), updatedAt: new Date() });
      stager.stage({ agentId: b!, lastConnectedAt: new Date(), updatedAt: new Date() });
      assert.throws(() => stager.stage({ agentId: 'not a uuid', updatedAt: new Date() }), InvalidUpdateError);
      const pending = await scrape(server.url);
      assert.equal(value(pending, 'pg_heartbeat_stager_updates_staged_total'), 3);
      assert.equal(value(pending, 'pg_heartbeat_stager_updates_deduped_total'), 1);
      assert.equal(value(pending, 'pg_heartbeat_stager_updates_rejected_total'), 1);
      assert.equal(value(pending, 'pg_heartbeat_stager_pending_agents'), 2);
      assert.equal(value(pending, 'pg_heartbeat_stager_copy_duration_seconds_count'), 0);
      await stager.flush();
      const flushed = await scrape(server.url);
      assert.equal(value(flushed, 'pg_heartbeat_stager_rows_copied_total'), 2);
      assert.equal(value(flushed, 'pg_heartbeat_stager_copies_total'), 1);
      assert.equal(value(flushed, 'pg_heartbeat_stager_copy_failures_total'), 0);
      assert.equal(value(flushed, 'pg_heartbeat_stager_copy_duration_seconds_count'), 1);
      assert.ok(value(flushed, 'pg_heartbeat_stager_copy_duration_seconds_sum')! > 0);
      assert.equal(value(flushed, 'pg_heartbeat_stager_pending_agents'), 0);
      assert.equal(value(flushed, 'pg_heartbeat_stager_retained_agents'), 2, 'kept for a resend until merged');
      for (const d of HEARTBEAT_METRICS.filter((m) => m.source === 'stager')) assert.equal(flushed.types.get(d.name), d.type, d.name);

      // the same names again on this registry: prom-client refuses, and the registry is left as it was
      await assert.rejects(registerHeartbeatMetrics(registry, { stager }), /already been registered/);
      assert.equal(value(await scrape(server.url), 'pg_heartbeat_stager_rows_copied_total'), 2);
      await metrics.unregister();
      assert.equal(value(await scrape(server.url), 'pg_heartbeat_stager_rows_copied_total'), undefined, 'unregister() removed them');
      // ...and they can be registered again, e.g. summed over two stagers
      const other = new HeartbeatStager({ pool: db.pool }, { logger: silentLogger });
      const again = await registerHeartbeatMetrics(registry, { stager: [stager, other] });
      other.stage({ agentId: a!, lastConnectedAt: new Date(), updatedAt: new Date() });
      assert.equal(value(await scrape(server.url), 'pg_heartbeat_stager_updates_staged_total'), 4);
      await other.close();
      await again.unregister();
    } finally {
      await server.close();
      await stager.close();
    }
  });

  test('bad arguments are InvalidOptionErrors naming the option', async () => {
    await assert.rejects(registerHeartbeatMetrics({} as never), { name: 'InvalidOptionError', option: 'registry' });
    await assert.rejects(registerHeartbeatMetrics(new Registry(), { stager: {} as never }), { name: 'InvalidOptionError', option: 'stager' });
    await assert.rejects(registerHeartbeatMetrics(new Registry(), { statusTimeoutMs: -1 }), { name: 'InvalidOptionError', option: 'statusTimeoutMs' });
    await assert.rejects(serveMetrics(new Registry(), { port: 70_000 }), { name: 'InvalidOptionError', option: 'port' });
  });

  test('a failing scrape answers 500 and the merger goes on; a database that never answers gives status_up 0 within the deadline', async () => {
    // a "database" that accepts connections and never says a word
    const sockets = new Set<Socket>();
    const silent: Server = createServer((s) => {
      sockets.add(s);
      s.on('error', () => {});
    });
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const silentUrl = `postgresql://postgres@127.0.0.1:${(silent.address() as { port: number }).port}/nowhere`;
    const registry = new Registry();
    const merger = startMerger({ pool: db.pool }, { intervalMs: 100, logger: silentLogger });
    const hb = await registerHeartbeatMetrics(registry, { merger });
    let broken = true;
    new Counter({ name: 'app_broken_total', help: 'throws while collected', registers: [registry], collect() {
      if (broken) throw new Error('collector exploded');
    } });
    const logged: string[] = [];
    const server = await serveMetrics(registry, { port: 0, logger: { ...silentLogger, warn: (m: string) => void logged.push(m) } });
    try {
      const res = await fetch(server.url);
      assert.equal(res.status, 500);
      assert.match(await res.text(), /collector exploded/);
      assert.deepEqual(logged, ['metrics scrape failed']);
      const mergesBefore = merger.stats().merges;
      await waitFor(() => merger.stats().merges > mergesBefore + 2, 'merges after the failed scrape', 30_000);
      broken = false;
      const ok = await scrape(server.url);
      assert.ok(value(ok, 'pg_heartbeat_merger_merges_total')! >= mergesBefore + 3);

      const reg = new Registry();
      const viaSilent = await registerHeartbeatMetrics(reg, { database: { connectionString: silentUrl }, statusTimeoutMs: 300 });
      const t0 = performance.now();
      const text = await reg.metrics();
      const e = parseExposition(text);
      assert.equal(value(e, 'pg_heartbeat_status_up'), 0);
      assert.equal(value(e, 'pg_heartbeat_staging_rows'), undefined, 'no backlog series from a database that did not answer');
      assert.ok(performance.now() - t0 < 10_000, 'the scrape ended at the deadline, not hung');
      await viaSilent.unregister();
    } finally {
      await server.close();
      await hb.unregister();
      await merger.close();
      for (const s of sockets) s.destroy();
      silent.close();
    }
    assert.equal(merger.stats().failures, 0);
  });
});

describe('without prom-client', () => {
  test('pg-heartbeat imports and stages; metrics fail with MetricsUnavailableError; the CLI says npm install prom-client', async () => {
    // a resolve hook that makes `prom-client` not found, as in a project that did not install the optional peer
    // (test/package.test.ts checks the real thing: the packed package installed without it)
    const dir = mkdtempSync(join(ROOT, '.tmp-noprom-'));
    try {
      const hooks = join(dir, 'hooks.mjs');
      writeFileSync(hooks, `export async function resolve(specifier, context, next) {
  if (specifier === 'prom-client' || specifier.startsWith('prom-client/')) {
    throw Object.assign(new Error("Cannot find package 'prom-client'"), { code: 'ERR_MODULE_NOT_FOUND' });
  }
  return next(specifier, context);
}\n`);
      const register = join(dir, 'register.mjs');
      writeFileSync(register, `import { register } from 'node:module';\nregister(${JSON.stringify(pathToFileURL(hooks).href)});\n`);
      const script = join(dir, 'app.ts');
      writeFileSync(script, `
        import * as hb from ${JSON.stringify(join(ROOT, 'src/index.ts'))};
        const pool = { connectionString: process.env.DATABASE_URL };
        const stager = new hb.HeartbeatStager(pool, { logger: hb.silentLogger });
        stager.stage({ agentId: '0b4a2c3e-5f67-4d89-a1b2-c3d4e5f60718', updatedAt: new Date() });
        await stager.flush();
        await import('prom-client').then(() => console.log('prom-client loaded?!'), () => console.log('no prom-client'));
        try {
          await hb.registerHeartbeatMetrics({ registerMetric() {}, removeSingleMetric() {} }, { stager });
          console.log('registered?!');
        } catch (err) {
          console.log(err.name, err.code, err instanceof hb.MetricsUnavailableError, err.message);
        }
        await stager.close();
      `);
      const { stdout } = await exec(process.execPath, ['--import', 'tsx', '--import', register, script], { cwd: ROOT, env: { ...process.env, DATABASE_URL: db.url } });
      assert.equal(stdout, 'no prom-client\nMetricsUnavailableError METRICS_UNAVAILABLE true pg-heartbeat: metrics need the optional peer dependency prom-client, which is not installed: npm install prom-client\n');
      const cli = await startCli(['merger', '--metrics-port', '0', '--database-url', db.url], {}, ['--import', register]).done;
      assert.equal(cli.code, 1);
      assert.match(cli.stderr.trim().split('\n').at(-1)!, /^pg-heartbeat merger: pg-heartbeat: metrics need the optional peer dependency prom-client, which is not installed: npm install prom-client$/);
      const plain = await startCli(['merge', '--json', '--database-url', db.url], {}, ['--import', register]).done;
      assert.equal(plain.code, 0, `the rest of the CLI works without it: ${plain.stderr}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('mergeNow is not a merger: merges it runs are seen in the database metrics, not the merger counters', async () => {
  const registry = new Registry();
  const metrics = await registerHeartbeatMetrics(registry, { database: { pool: db.pool }, statusCacheMs: 0 });
  try {
    const before = value(parseExposition(await registry.metrics()), 'pg_heartbeat_part_merges_total')!;
    await mergeNow(db.pool);
    const after = parseExposition(await registry.metrics());
    assert.ok(value(after, 'pg_heartbeat_part_merges_total')! > before);
    assert.equal(value(after, 'pg_heartbeat_status_up'), 1);
    assert.equal(value(after, 'pg_heartbeat_dead_letters'), 0);
  } finally {
    await metrics.unregister();
  }
});
