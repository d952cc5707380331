/**
 * Issue 11: results never depend on session settings. The application's role
 * gets (ALTER ROLE ... SET) each DateStyle, IntervalStyle, TimeZone and
 * extra_float_digits below, one at a time and all at once; stage() + mergeNow(),
 * stager.disconnect(), agentStatus() and readStatus() through it must give
 * exactly (to the millisecond) what was written, and the same as with the
 * defaults. Then Node processes with TZ=America/St_Johns and TZ=Asia/Kathmandu
 * (half-hour offsets, where node-postgres renders a Date with a rounded offset)
 * disconnect, stage and read back: stored exactly.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { silentLogger } from '../src/logger.ts';
import { mergeNow } from '../src/merge.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { agentStatus, readStatus, type MergeStatus } from '../src/status.ts';
import { adminQuery, createTestDb, type TestDb } from './support/db.ts';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');

let db: TestDb;
const app = `hb_app_${randomUUID().slice(0, 8)}`;

before(async () => {
  db = await createTestDb('session_settings');
  await db.pool.query(`CREATE ROLE ${pg.escapeIdentifier(app)} LOGIN IN ROLE heartbeat_writer`);
});
after(async () => {
  await db?.drop();
  await adminQuery(`DROP ROLE IF EXISTS ${pg.escapeIdentifier(app)}`);
});

function appUrl(): string {
  const u = new URL(db.url);
  u.username = app;
  u.password = '';
  return u.toString();
}

const SETTINGS: Array<Record<string, string>> = [
  {},
  { DateStyle: 'SQL, DMY' },
  { DateStyle: 'German' },
  { DateStyle: 'Postgres, MDY' },
  { IntervalStyle: 'sql_standard' },
  { IntervalStyle: 'iso_8601' },
  { IntervalStyle: 'postgres_verbose' },
  { TimeZone: 'America/St_Johns' },
  { TimeZone: 'Pacific/Chatham' },
  { extra_float_digits: '-15' },
  { extra_float_digits: '3' },
  { DateStyle: 'German', IntervalStyle: 'postgres_verbose', TimeZone: 'Pacific/Chatham', extra_float_digits: '-15' },
];
const label = (s: Record<string, string>): string => (Object.keys(s).length ? Object.entries(s).map(([k, v]) => `${k} '${v}'`).join(', ') : 'the defaults');

/** A time read back in the superuser's default session, as epoch ms (µs precision kept as a fraction). */
async function epochMs(sql: string, params: unknown[] = []): Promise<number | null> {
  const { rows } = await db.pool.query<{ v: string | null }>(`SELECT (extract(epoch FROM (${sql})) * 1000)::text AS v`, params);
  return rows[0]!.v === null ? null : Number(rows[0]!.v);
}

async function rowOf(id: string): Promise<Record<string, number | string | null>> {
  const { rows } = await db.pool.query(
    `SELECT (extract(epoch FROM first_connected_at) * 1000)::text AS first, (extract(epoch FROM last_connected_at) * 1000)::text AS last,
            (extract(epoch FROM disconnected_at) * 1000)::text AS disconnected, last_connected_replica_id::text AS replica,
            (extract(epoch FROM updated_at) * 1000)::text AS updated
       FROM public.workspace_agents WHERE id = $1`,
    [id],
  );
  const r = rows[0];
  assert.ok(r, `row ${id}`);
  const n = (v: string | null): number | null => (v === null ? null : Number(v));
  return { first: n(r.first), last: n(r.last), disconnected: n(r.disconnected), replica: r.replica, updated: n(r.updated) };
}

/** The parts of a status reading that do not depend on when it was taken. */
function stable(s: MergeStatus): unknown {
  const { checkedAt: _c, mergeLagMs: _l, lastMerge, parts, ...rest } = s;
  const merge = (m: MergeStatus['lastMerge']): unknown => (m === null ? null : { ...m, sinceMs: undefined });
  return { ...rest, lastMerge: merge(lastMerge), parts: parts.map(({ mergeLagMs: _m, lastMerge: lm, ...p }) => ({ ...p, lastMerge: merge(lm) })) };
}

describe('session settings of the application role', () => {
  const T = (iso: string): Date => new Date(iso);

  for (const settings of SETTINGS) {
    test(`${label(settings)}: stage + mergeNow, disconnect, agentStatus, readStatus are exact`, async () => {
      await db.pool.query(`ALTER ROLE ${pg.escapeIdentifier(app)} RESET ALL`);
      for (const [name, value] of Object.entries(settings)) {
        await db.pool.query(`ALTER ROLE ${pg.escapeIdentifier(app)} SET ${pg.escapeIdentifier(name.toLowerCase())} = ${pg.escapeLiteral(value)}`);
      }
      const pool = new pg.Pool({ connectionString: appUrl(), max: 2 });
      pool.on('error', () => {});
      const stager = new HeartbeatStager({ pool }, { flushIntervalMs: 3_600_000, logger: silentLogger });
      try {
        for (const [name, value] of Object.entries(settings)) {
          const { rows } = await pool.query(`SELECT current_setting(${pg.escapeLiteral(name)}) AS v`);
          assert.ok(String(rows[0].v).startsWith(value), `the session really runs with ${name} ${value}: ${rows[0].v}`);
        }
        // a: long gone; b: connected now; c: disconnected below; d: never connected, past its connection timeout
        const [a, b, c, d] = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
        const replica = randomUUID();
        await db.pool.query(
          `INSERT INTO public.workspace_agents (id, created_at, updated_at, connection_timeout_seconds)
           SELECT unnest($1::uuid[]), '2020-01-01T00:00:00Z', '1970-01-01T00:00:00Z', 90`,
          [[a, b, c, d]],
        );
        const recent = new Date(Date.now() - 1500);
        stager.stage({ agentId: a, firstConnectedAt: T('1970-06-01T12:00:00.123Z'), lastConnectedAt: T('1970-06-01T12:00:00.456Z'), lastConnectedReplicaId: replica, updatedAt: T('1970-06-01T12:00:00.789Z') });
        stager.stage({ agentId: b, firstConnectedAt: T('2001-02-03T04:05:06.007Z'), lastConnectedAt: recent, updatedAt: recent });
        stager.stage({ agentId: c, firstConnectedAt: T('1999-12-31T23:59:59.999Z'), lastConnectedAt: T('2000-01-01T00:00:00.001Z'), updatedAt: T('2000-01-01T00:00:00.001Z') });
        await stager.flush();
        const merged = await mergeNow(pool);
        const { statements: _s, statusEvents, swept: _w, ...counts } = merged;
        // a: connecting -> disconnected (its heartbeat is from 1970), b: -> connected, c: -> disconnected; the sweep
        // after the merge may add the inactivity of agents of earlier cases
        assert.ok(statusEvents >= 3, `status events: ${statusEvents}`);
        assert.deepEqual(counts, {
          rowsConsumed: 3, agentsUpdated: 3, skippedStale: 0, skippedUnknown: 0, skippedInvalid: 0, deferredLocked: 0, deadLettered: 0,
          skippedConcurrent: false, parts: 4, partsMerged: 4, partsSkippedConcurrent: 0, partsSkippedRecent: 0, partsWithMore: [], more: false,
          lockHolderPid: null, lockBusySince: null,
        });
        assert.equal(await stager.disconnect({ agentId: c, disconnectedAt: T('2024-02-29T23:59:59.999Z'), updatedAt: T('2024-02-29T23:59:59.999Z') }), true);

        assert.deepEqual(await rowOf(a), { first: Date.parse('1970-06-01T12:00:00.123Z'), last: Date.parse('1970-06-01T12:00:00.456Z'), disconnected: null, replica, updated: Date.parse('1970-06-01T12:00:00.789Z') });
        assert.deepEqual(await rowOf(b), { first: Date.parse('2001-02-03T04:05:06.007Z'), last: recent.getTime(), disconnected: null, replica: null, updated: recent.getTime() });
        assert.deepEqual(await rowOf(c), { first: Date.parse('1999-12-31T23:59:59.999Z'), last: Date.parse('2000-01-01T00:00:00.001Z'), disconnected: Date.parse('2024-02-29T23:59:59.999Z'), replica: null, updated: Date.parse('2024-02-29T23:59:59.999Z') });

        const statuses = await agentStatus(pool, { agentIds: [a, b, c, d], inactiveTimeoutMs: 30_000 });
        const byId = new Map(statuses.map((s) => [s.agentId, s]));
        assert.deepEqual(byId.get(a), { agentId: a, status: 'disconnected', firstConnectedAt: T('1970-06-01T12:00:00.123Z'), lastConnectedAt: T('1970-06-01T12:00:00.456Z'), disconnectedAt: null, lastConnectedReplicaId: replica, updatedAt: T('1970-06-01T12:00:00.789Z') });
        assert.deepEqual(byId.get(b), { agentId: b, status: 'connected', firstConnectedAt: T('2001-02-03T04:05:06.007Z'), lastConnectedAt: recent, disconnectedAt: null, lastConnectedReplicaId: null, updatedAt: recent });
        assert.deepEqual(byId.get(c), { agentId: c, status: 'disconnected', firstConnectedAt: T('1999-12-31T23:59:59.999Z'), lastConnectedAt: T('2000-01-01T00:00:00.001Z'), disconnectedAt: T('2024-02-29T23:59:59.999Z'), lastConnectedReplicaId: null, updatedAt: T('2024-02-29T23:59:59.999Z') });
        assert.deepEqual(byId.get(d), { agentId: d, status: 'timeout', firstConnectedAt: null, lastConnectedAt: null, disconnectedAt: null, lastConnectedReplicaId: null, updatedAt: T('1970-01-01T00:00:00.000Z') });
        // a fractional inactive timeout crosses as a number of ms, never as interval text
        const [bShort] = await agentStatus(pool, { agentIds: [b], inactiveTimeoutMs: 1.5 });
        assert.equal(bShort!.status, 'disconnected');

        // readStatus: one row staged (not merged), the merge above as the last one
        const staged = T('2010-10-10T10:10:10.101Z');
        stager.stage({ agentId: d, updatedAt: staged });
        await stager.flush();
        const viaApp = await readStatus({ pool });
        const viaDefaults = await readStatus({ pool: db.pool });
        assert.deepEqual(stable(viaApp), stable(viaDefaults), 'the same reading as a session with the default settings');
        assert.equal(viaApp.stagedRows, 1);
        assert.deepEqual(viaApp.oldestStagedAt, staged);
        assert.ok(viaApp.lastMerge, 'the merge shows');
        assert.equal(viaApp.lastMerge.rowsConsumed, 3);
        const lastMergeAt = await epochMs('SELECT min(last_merge_at) FROM heartbeat.merge_state');
        assert.equal(viaApp.lastMerge.at.getTime(), Math.trunc(lastMergeAt!), 'lastMerge.at, to the ms');
        const duration = await epochMs("SELECT max(last_duration) + '1970-01-01Z'::timestamptz FROM heartbeat.merge_state");
        assert.equal(viaApp.lastMerge.durationMs, duration, 'durationMs, to the µs');
        assert.ok(Math.abs(viaApp.checkedAt.getTime() - Date.now()) < 5_000, 'checkedAt is now');
        assert.ok(Math.abs(viaApp.mergeLagMs! - (viaApp.checkedAt.getTime() - staged.getTime())) < 1, 'mergeLagMs = checkedAt - oldestStagedAt');
        assert.ok(Math.abs(viaApp.lastMerge.sinceMs - (viaApp.checkedAt.getTime() - viaApp.lastMerge.at.getTime())) < 1, 'sinceMs = checkedAt - lastMerge.at');
        assert.deepEqual(viaApp.stagingEpochBeganAt?.getTime(), Math.trunc((await epochMs('SELECT began_at FROM heartbeat.staging_epoch'))!));
        await mergeNow(pool); // leave staging empty for the next settings
      } finally {
        await stager.close();
        await pool.end();
        await db.pool.query(`ALTER ROLE ${pg.escapeIdentifier(app)} RESET ALL`);
      }
    });
  }
});

describe('the Node process\'s TZ', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'hb-tz-'));
    const src = (f: string): string => JSON.stringify(join(ROOT, 'src', f));
    writeFileSync(join(dir, 'child.mts'), `
      import { HeartbeatStager } from ${src('stager.ts')};
      import { mergeNow } from ${src('merge.ts')};
      import { agentStatus } from ${src('status.ts')};
      import { silentLogger } from ${src('logger.ts')};
      const [url, a, b, c, nowIso] = process.argv.slice(2);
      const stager = new HeartbeatStager({ connectionString: url, max: 1 }, { flushIntervalMs: 3_600_000, logger: silentLogger });
      const old = new Date('1970-06-01T12:00:00.123Z');
      const now = new Date(nowIso);
      const out = { offsetMinutes: [old.getTimezoneOffset(), now.getTimezoneOffset()], local: old.toString() };
      out.disconnectOld = await stager.disconnect({ agentId: a, disconnectedAt: old, updatedAt: old, firstConnectedAt: old, lastConnectedAt: old });
      out.disconnectNow = await stager.disconnect({ agentId: b, disconnectedAt: now, updatedAt: now });
      stager.stage({ agentId: c, firstConnectedAt: old, lastConnectedAt: now, updatedAt: now });
      await stager.close();
      out.merged = (await mergeNow({ connectionString: url })).agentsUpdated;
      out.status = (await agentStatus({ connectionString: url }, { agentIds: [a, b, c] }))
        .map((s) => ({ id: s.agentId, first: s.firstConnectedAt?.toISOString() ?? null, last: s.lastConnectedAt?.toISOString() ?? null,
                       disconnected: s.disconnectedAt?.toISOString() ?? null, updated: s.updatedAt.toISOString() }))
        .sort((x, y) => [a, b, c].indexOf(x.id) - [a, b, c].indexOf(y.id));
      console.log(JSON.stringify(out));
    `);
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const tz of ['America/St_Johns', 'Asia/Kathmandu']) {
    test(`TZ=${tz}: disconnect() of 1970-06-01T12:00:00.123Z and of now, stage() and agentStatus() are exact`, async () => {
      const [a, b, c] = [randomUUID(), randomUUID(), randomUUID()];
      await db.pool.query("INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), '1970-01-01T00:00:00Z'", [[a, b, c]]);
      const now = new Date(Date.now() - 1000);
      const out = await new Promise<string>((resolve, reject) => {
        const child = spawn(process.execPath, ['--import', 'tsx', join(dir, 'child.mts'), db.url, a, b, c, now.toISOString()], {
          cwd: ROOT, env: { ...process.env, TZ: tz }, stdio: ['ignore', 'pipe', 'pipe'],
        });
        let stdout = '';
        let stderr = '';
        child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('error', reject);
        child.on('close', (code) => (code === 0 ? resolve(stdout) : reject(new Error(`child exited ${code}: ${stderr}`))));
      });
      const r = JSON.parse(out.trim().split('\n').pop()!);
      const expectedOffset = tz === 'Asia/Kathmandu' ? [-330, -345] : [150, null];
      assert.equal(r.offsetMinutes[0], expectedOffset[0], `the child really runs in ${tz}: ${r.local}`);
      if (expectedOffset[1] !== null) assert.equal(r.offsetMinutes[1], expectedOffset[1]);
      assert.equal(r.disconnectOld, true);
      assert.equal(r.disconnectNow, true);
      assert.equal(r.merged, 1);
      const old = Date.parse('1970-06-01T12:00:00.123Z');
      assert.deepEqual(await rowOf(a), { first: old, last: old, disconnected: old, replica: null, updated: old });
      assert.deepEqual(await rowOf(b), { first: null, last: null, disconnected: now.getTime(), replica: null, updated: now.getTime() });
      assert.deepEqual(await rowOf(c), { first: old, last: now.getTime(), disconnected: null, replica: null, updated: now.getTime() });
      const iso = (ms: number | null): string | null => (ms === null ? null : new Date(ms).toISOString());
      assert.deepEqual(r.status, [
        { id: a, first: iso(old), last: iso(old), disconnected: iso(old), updated: iso(old) },
        { id: b, first: null, last: null, disconnected: iso(now.getTime()), updated: iso(now.getTime()) },
        { id: c, first: iso(old), last: iso(now.getTime()), disconnected: null, updated: iso(now.getTime()) },
      ]);
    });
  }
});
