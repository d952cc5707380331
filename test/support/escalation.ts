/**
 * Privilege escalation through public.workspace_agents, for any install path
 * (the migrations, the extension): the application's LOGIN role owns the table
 * and is a member of heartbeat_writer; a superuser installs pg-heartbeat. As
 * the application, each attack puts code on the table that pg-heartbeat's
 * SECURITY DEFINER functions run (a BEFORE UPDATE trigger, a CHECK constraint,
 * a DO ALSO rule, an index expression, a row-level security policy, a CHECK of
 * a column's domain), code that tries `ALTER ROLE <app> SUPERUSER` and a list of
 * other privileged actions and records as whom it ran and what each attempt
 * got. Then it is set off through disconnect_agent, disconnect_replica, a merge
 * (by the application's mergeNow and by a superuser's startMerger) and
 * agent_status. The application never becomes a superuser: the code runs as
 * heartbeat_definer, which may do only what the merge needs.
 *
 * Then the refusals: with such code on the table, a privileged heartbeat_definer
 * (CREATEROLE, an inherited pg_write_server_files) or a SECURITY DEFINER
 * function owned by the superuser makes heartbeat.check_privilege_model(),
 * heartbeat.apply_privileges() and the install path's own re-run refuse, and
 * every SECURITY DEFINER function refuse to run (heartbeat.assert_definer()),
 * so the planted code never runs with those rights; installing into such a
 * setup is refused too.
 *
 * The suite runs on a cluster of its own: it changes heartbeat_definer, a
 * cluster-wide role, for moments (restored in finally blocks), which would make
 * merges of other test files fail meanwhile. Its binaries are the test
 * server's (test/support/cluster.ts findBinDir()), so an extension installed
 * into their share directory (make -C extension install) is available.
 *
 * Usage, at the top level of a test file:
 *
 *   escalationSuite({ name: 'migrations', install: (url) => migrate({ connectionString: url }) });
 *
 * For the extension (after `make -C extension install datadir=<the server's SHAREDIR>`, as
 * test/extension.test.ts does), `install` runs sql/roles.sql then `CREATE EXTENSION pg_heartbeat`
 * on one connection; no `reapply` is needed (ALTER EXTENSION ... UPDATE at the latest version is a
 * no-op).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { existsSync, rmSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { startMerger } from '../../src/merger.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { agentStatus } from '../../src/status.ts';
import { sqlFile } from '../../sql/load.js';
import { startCluster, type Cluster } from './cluster.ts';
import { waitFor } from './wait.ts';

export interface InstallPath {
  /** Shown in the test names: 'migrations', 'extension'. */
  name: string;
  /**
   * Installs pg-heartbeat into the database at `url` (a superuser connection)
   * in which the application role has already created public.workspace_agents.
   * Must create the roles when missing (the migrations apply sql/roles.sql; for
   * the extension, run sql/roles.sql before CREATE EXTENSION). Must fail (and
   * leave nothing behind) when the privilege model does not hold.
   */
  install(url: string): Promise<unknown>;
  /**
   * Further ways of re-running the install path on an installed database, each
   * of which must refuse an unsafe setup (`url` is a superuser connection), e.g.
   * migrate() again. They must not repair it: one that ends in
   * heartbeat.apply_privileges() hands a re-owned function back to
   * heartbeat_definer, which the re-owned-function test counts as not refusing.
   * `SELECT heartbeat.apply_privileges()` (where it must refuse) and
   * `SELECT heartbeat.check_privilege_model()` are always tried.
   */
  reapply?: Record<string, (url: string) => Promise<unknown>>;
}

/** The code an attack puts on the table, as the application, and how to take it off again. */
interface Attack {
  kind: string;
  plant: string;
  /** The function heartbeat.check_privilege_model() must find on the table. */
  fn: string;
  remove: string;
  /** Entry points through which the planted code runs (as heartbeat_definer). */
  runsOn: ReadonlySet<Entry>;
  /**
   * When PostgreSQL refuses the merge's statement because of what is on the table (a DO ALSO
   * rule: 0A000): every merge fails loudly with this SQLSTATE and the snapshots stay staged
   * (nothing dead-lettered: it is not one bad row, it is the table).
   */
  mergeFails?: string;
  /** Entry points that fail (with this SQLSTATE) because of what the application did to its table. */
  fails?: Partial<Record<Entry, string>>;
}

type Entry = 'disconnect_agent' | 'disconnect_replica' | 'merge (app, mergeNow)' | 'merge (superuser, startMerger)' | 'agent_status'
  | 'sweep_status';
const ENTRIES: Entry[] = ['disconnect_agent', 'disconnect_replica', 'merge (app, mergeNow)', 'merge (superuser, startMerger)', 'agent_status',
  'sweep_status'];
const WRITES = new Set<Entry>(['disconnect_agent', 'disconnect_replica', 'merge (app, mergeNow)', 'merge (superuser, startMerger)']);

const ATTACKS: Attack[] = [
  {
    kind: 'BEFORE UPDATE trigger',
    fn: 'public.pwn_trigger()',
    plant: `CREATE FUNCTION public.pwn_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM public.pwn('trigger'); RETURN NEW; END $$;
            CREATE TRIGGER pwn BEFORE UPDATE ON public.workspace_agents FOR EACH ROW EXECUTE FUNCTION public.pwn_trigger();`,
    remove: 'DROP TRIGGER pwn ON public.workspace_agents; DROP FUNCTION public.pwn_trigger();',
    runsOn: WRITES,
  },
  {
    kind: 'CHECK constraint calling a function',
    fn: 'public.pwn_check(timestamp with time zone)',
    plant: `CREATE FUNCTION public.pwn_check(t timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RETURN public.pwn('check'); END $$;
            ALTER TABLE public.workspace_agents ADD CONSTRAINT pwn CHECK (public.pwn_check(updated_at));`,
    remove: 'ALTER TABLE public.workspace_agents DROP CONSTRAINT pwn; DROP FUNCTION public.pwn_check(timestamptz);',
    runsOn: WRITES,
  },
  {
    kind: 'DO ALSO rule',
    fn: 'public.pwn(text)',
    plant: "CREATE RULE pwn AS ON UPDATE TO public.workspace_agents DO ALSO SELECT public.pwn('rule');",
    remove: 'DROP RULE pwn ON public.workspace_agents;',
    // PostgreSQL refuses DO ALSO rules on a statement with WITH: disconnect_replica and the merge (an
    // UPDATE inside WITH) fail (0A000), the merge keeping its snapshots staged; only disconnect_agent's
    // plain UPDATE runs it
    runsOn: new Set<Entry>(['disconnect_agent']),
    mergeFails: '0A000',
    fails: { disconnect_replica: '0A000', 'merge (app, mergeNow)': '0A000', 'merge (superuser, startMerger)': '0A000' },
  },
  {
    kind: 'index expression (a falsely IMMUTABLE function)',
    fn: 'public.pwn_index(timestamp with time zone)',
    plant: `CREATE FUNCTION public.pwn_index(t timestamptz) RETURNS timestamptz LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN PERFORM public.pwn('index'); RETURN t; END $$;
            CREATE INDEX pwn ON public.workspace_agents ((public.pwn_index(updated_at)));`,
    remove: 'DROP INDEX public.pwn; DROP FUNCTION public.pwn_index(timestamptz);',
    runsOn: WRITES,
  },
  {
    kind: 'row-level security policy',
    fn: 'public.pwn(text)',
    plant: `ALTER TABLE public.workspace_agents ENABLE ROW LEVEL SECURITY;
            CREATE POLICY pwn ON public.workspace_agents USING (public.pwn('policy'));`,
    remove: 'DROP POLICY pwn ON public.workspace_agents; ALTER TABLE public.workspace_agents DISABLE ROW LEVEL SECURITY;',
    runsOn: new Set(ENTRIES),
  },
  {
    kind: 'CHECK of a domain given to updated_at',
    fn: 'public.pwn(text)',
    plant: `CREATE DOMAIN public.pwn_ts AS timestamptz CHECK (public.pwn('domain'));
            ALTER TABLE public.workspace_agents ALTER COLUMN updated_at TYPE public.pwn_ts;`,
    remove: 'ALTER TABLE public.workspace_agents ALTER COLUMN updated_at TYPE timestamptz; DROP DOMAIN public.pwn_ts;',
    runsOn: WRITES,
    // agent_status() returns updated_at as timestamptz: a column of another type no longer matches (42804)
    fails: { agent_status: '42804' },
  },
];

/** What the planted code tries, and what heartbeat_definer gets: 'ok', or the SQLSTATE. */
function probes(app: string, file: string): Array<{ name: string; sql: string; expect: string }> {
  const lit = (s: string): string => pg.escapeLiteral(s);
  return [
    { name: 'ALTER ROLE app SUPERUSER', sql: `ALTER ROLE ${pg.escapeIdentifier(app)} SUPERUSER`, expect: '42501' },
    { name: 'CREATE ROLE', sql: 'CREATE ROLE hb_pwn_role LOGIN SUPERUSER', expect: '42501' },
    { name: 'GRANT a predefined role to app', sql: `GRANT pg_write_server_files TO ${pg.escapeIdentifier(app)}`, expect: '42501' },
    { name: 'COPY TO a server file', sql: `COPY (SELECT 'pwned') TO ${lit(file)}`, expect: '42501' },
    { name: 'COPY FROM PROGRAM', sql: "COPY public.pwned (via) FROM PROGRAM 'echo pwned'", expect: '42501' },
    { name: 'pg_read_file', sql: "SELECT pg_catalog.pg_read_file('postgresql.conf')", expect: '42501' },
    { name: 'lo_export to a server file', sql: `SELECT pg_catalog.lo_export(pg_catalog.lo_from_bytea(0, 'pwned'), ${lit(file)})`, expect: '42501' },
    { name: 'read pg_authid', sql: 'SELECT count(*) FROM pg_catalog.pg_authid', expect: '42501' },
    { name: 'SET ROLE', sql: 'SET ROLE postgres', expect: '42501' },
    { name: 'SET SESSION AUTHORIZATION', sql: 'SET SESSION AUTHORIZATION postgres', expect: '42501' },
    { name: 'read another schema', sql: 'SELECT count(*) FROM hb_secret.data', expect: '42501' },
    { name: 'write another schema', sql: 'INSERT INTO hb_secret.data VALUES (1)', expect: '42501' },
    { name: 'read a public table without a grant', sql: 'SELECT count(*) FROM public.admin_only', expect: '42501' },
    { name: 'create in schema heartbeat', sql: 'CREATE TABLE heartbeat.pwn (x int)', expect: '42501' },
    { name: 'create in schema public', sql: 'CREATE TABLE public.pwn (x int)', expect: '42501' },
    { name: 'write heartbeat.settings', sql: 'UPDATE heartbeat.settings SET max_rows_per_merge = 1', expect: '42501' },
    { name: 'heartbeat.apply_privileges()', sql: 'SELECT heartbeat.apply_privileges()', expect: '42501' },
    { name: 'heartbeat.set_staging_parts()', sql: 'SELECT heartbeat.set_staging_parts(1)', expect: '42501' },
    { name: 'ALTER a staging part', sql: 'ALTER TABLE heartbeat.agent_connection_staging_p0 SET LOGGED', expect: '42501' },
    { name: 'DELETE FROM workspace_agents', sql: 'DELETE FROM public.workspace_agents', expect: '42501' },
    { name: 'UPDATE a column pg-heartbeat does not write', sql: 'UPDATE public.workspace_agents SET connection_timeout_seconds = 1', expect: '42501' },
    // what it can do: what the merge needs
    { name: 'UPDATE the connection columns', sql: 'UPDATE public.workspace_agents SET disconnected_at = disconnected_at WHERE false', expect: 'ok' },
    { name: 'read staging', sql: 'SELECT count(*) FROM heartbeat.agent_connection_staging', expect: 'ok' },
    { name: 'write heartbeat.merge_state', sql: 'UPDATE heartbeat.merge_state SET merges_total = merges_total WHERE false', expect: 'ok' },
    { name: 'write heartbeat.dead_letters', sql: 'DELETE FROM heartbeat.dead_letters WHERE false', expect: 'ok' },
  ];
}

/**
 * The application's logging function: runs every probe in a subtransaction that
 * is always rolled back (SQLSTATE HBOK0 marks success), records who it ran as
 * and what each probe got. Owned by the application, executable by anyone.
 */
function pwnFunctionSql(app: string, file: string): string {
  const list = probes(app, file).map((p) => `(${pg.escapeLiteral(p.name)}, ${pg.escapeLiteral(p.sql)})`).join(',\n      ');
  return `
    CREATE TABLE public.pwned (n bigserial, via text, who text, sess text, probes jsonb, at timestamptz DEFAULT clock_timestamp());
    GRANT SELECT, INSERT ON public.pwned TO PUBLIC;
    GRANT USAGE ON SEQUENCE public.pwned_n_seq TO PUBLIC;
    CREATE FUNCTION public.pwn(via text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $pwn$
    DECLARE
      got jsonb := '{}';
      p record;
    BEGIN
      -- as the application itself (ALTER TABLE validating rows, its own UPDATEs) there is nothing to learn;
      -- and never recursively (a probe's UPDATE firing the planted code again)
      IF current_user = ${pg.escapeLiteral(app)} OR current_setting('hb_test.pwn_active', true) = 'on' THEN
        RETURN true;
      END IF;
      PERFORM set_config('hb_test.pwn_active', 'on', true);
      FOR p IN SELECT * FROM (VALUES ${list}) AS v(name, sql) LOOP
        BEGIN
          EXECUTE p.sql;
          RAISE SQLSTATE 'HBOK0';
        EXCEPTION
          WHEN SQLSTATE 'HBOK0' THEN got := got || jsonb_build_object(p.name, 'ok');
          WHEN OTHERS THEN got := got || jsonb_build_object(p.name, SQLSTATE);
        END;
      END LOOP;
      PERFORM set_config('hb_test.pwn_active', 'off', true);
      INSERT INTO public.pwned (via, who, sess, probes) VALUES (via, current_user, session_user, got);
      RETURN true;
    END
    $pwn$;`;
}

interface Env {
  cluster: Cluster;
  url: string;
  su: pg.Pool;
  app: string;
  appPool: pg.Pool;
  file: string;
}

export function escalationSuite(path: InstallPath): void {
  describe(`privilege escalation through public.workspace_agents (${path.name})`, () => {
    let env: Env | undefined;
    const e = (): Env => {
      if (!env) throw new Error('escalationSuite: before() did not run');
      return env;
    };

    before(async () => {
      const cluster = await startCluster({ settings: { shared_buffers: '32MB', max_connections: 40 } });
      try {
        const app = `hb_app_${randomUUID().slice(0, 8)}`;
        const dbName = 'hb_escalation';
        const admin = new pg.Client({ connectionString: cluster.url() });
        await admin.connect();
        try {
          await admin.query(`CREATE DATABASE ${dbName}`);
          await admin.query(`CREATE ROLE ${pg.escapeIdentifier(app)} LOGIN`);
        } finally {
          await admin.end();
        }
        const url = cluster.url(dbName);
        const su = new pg.Pool({ connectionString: url, max: 4 });
        su.on('error', () => {});
        // the application may create its table in public (PostgreSQL 15 no longer lets everyone);
        // a schema and a table of the DBA's that the application's code must not reach
        // (PostgreSQL 14 still lets PUBLIC create in public: revoked here as 15 does, and as docs/security.md advises)
        await su.query(`REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT CREATE ON SCHEMA public TO ${pg.escapeIdentifier(app)};
          CREATE SCHEMA hb_secret; CREATE TABLE hb_secret.data (x int); INSERT INTO hb_secret.data VALUES (42);
          CREATE TABLE public.admin_only (x int);`);
        const appUrl = asRole(url, app);
        const appClient = new pg.Client({ connectionString: appUrl });
        await appClient.connect();
        try {
          // the application creates and owns public.workspace_agents before pg-heartbeat is installed
          await appClient.query(`BEGIN; ${sqlFile('001_workspace_agents.sql')}; COMMIT;`);
        } finally {
          await appClient.end();
        }
        await path.install(url);
        await su.query(`GRANT heartbeat_writer TO ${pg.escapeIdentifier(app)}`);
        const file = `/tmp/hb-escalation-${randomUUID()}.txt`;
        const appPool = new pg.Pool({ connectionString: appUrl, max: 3 });
        appPool.on('error', () => {});
        await appPool.query(pwnFunctionSql(app, file));
        env = { cluster, url, su, app, appPool, file };
      } catch (err) {
        await cluster.destroy();
        throw err;
      }
    });

    after(async () => {
      if (!env) return;
      await env.appPool.end().catch(() => {});
      await env.su.end().catch(() => {});
      rmSync(env.file, { force: true });
      await env.cluster.destroy();
    });

    /** The application's role attributes and memberships, and heartbeat_definer's: unchanged by any attack. */
    async function assertNobodyEscalated(where: string): Promise<void> {
      const { su, app, file } = e();
      const { rows } = await su.query<{ rolname: string; rolsuper: boolean; rolcreaterole: boolean; rolcreatedb: boolean; rolbypassrls: boolean; rolreplication: boolean; member_of: string[] }>(
        `SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, r.rolreplication,
                ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                       WHERE m.member = r.oid ORDER BY 1) AS member_of
           FROM pg_roles r WHERE r.rolname IN ($1, 'heartbeat_definer') ORDER BY r.rolname = 'heartbeat_definer'`,
        [app],
      );
      const plain = { rolsuper: false, rolcreaterole: false, rolcreatedb: false, rolbypassrls: false, rolreplication: false };
      assert.deepEqual(rows, [
        { rolname: app, ...plain, member_of: ['heartbeat_writer'] },
        { rolname: 'heartbeat_definer', ...plain, member_of: [] },
      ], `${where}: rolsuper stays false, no role gained anything`);
      const { rows: created } = await su.query("SELECT rolname FROM pg_roles WHERE rolname = 'hb_pwn_role'");
      assert.deepEqual(created, [], `${where}: no role was created`);
      assert.equal(existsSync(file), false, `${where}: no server file was written`);
    }

    /** What the planted code logged since `since` (it logs nothing while running as the application itself). */
    /** Where the log of planted code stands now (a serial: a JavaScript Date has no microseconds). */
    async function pwnedMark(): Promise<string> {
      const { rows } = await e().su.query<{ n: string }>('SELECT COALESCE(max(n), 0) AS n FROM public.pwned');
      return rows[0]!.n;
    }
    async function pwnedSince(mark: string): Promise<Array<{ via: string; who: string; sess: string; probes: Record<string, string>; at: Date }>> {
      const { su } = e();
      const { rows } = await su.query('SELECT via, who, sess, probes, at FROM public.pwned WHERE n > $1 ORDER BY n', [mark]);
      return rows;
    }

    test('after the install the model holds: every SECURITY DEFINER function is owned by heartbeat_definer, an unprivileged NOLOGIN role', async () => {
      const { su } = e();
      await su.query('SELECT heartbeat.check_privilege_model()');
      const { rows } = await su.query<{ owner: string; n: number }>(
        `SELECT pg_get_userbyid(p.proowner) AS owner, count(*)::int AS n FROM pg_proc p
          WHERE p.pronamespace = 'heartbeat'::regnamespace AND p.prosecdef GROUP BY 1`,
      );
      assert.deepEqual(rows, [{ owner: 'heartbeat_definer', n: 7 }]);
      const { rows: definer } = await su.query("SELECT rolcanlogin, rolinherit FROM pg_roles WHERE rolname = 'heartbeat_definer'");
      assert.deepEqual(definer, [{ rolcanlogin: false, rolinherit: false }]);
      const { rows: owner } = await su.query("SELECT pg_get_userbyid(relowner) AS owner FROM pg_class WHERE oid = 'public.workspace_agents'::regclass");
      assert.deepEqual(owner, [{ owner: e().app }], 'the application owns the table');
      await assertNobodyEscalated('after install');
    });

    for (const attack of ATTACKS) {
      test(`${attack.kind}: runs as heartbeat_definer, never as the caller; the application stays unprivileged`, async () => {
        const { su, app, appPool, url } = e();
        const t0 = Date.now() - 60_000;
        const at = (s: number): Date => new Date(t0 + s * 1000);
        const [a, b, c, d] = [randomUUID(), randomUUID(), randomUUID(), randomUUID()];
        const replica = randomUUID();
        // the application's own rows, before the attack
        await appPool.query(
          `INSERT INTO public.workspace_agents (id, updated_at, first_connected_at, last_connected_at, last_connected_replica_id)
           SELECT unnest($1::uuid[]), $2, $2, $2, $3`,
          [[a, b, c, d], at(0), replica],
        );
        await appPool.query(attack.plant);
        const stager = new HeartbeatStager({ pool: appPool }, { logger: silentLogger, flushIntervalMs: 3_600_000 });
        const seen = new Map<Entry, string[]>();
        const trail: string[] = [];   // what each entry found, for the failure message
        try {
          const run: Record<Entry, () => Promise<void>> = {
            disconnect_agent: async () => {
              assert.equal(await stager.disconnect({ agentId: a, disconnectedAt: at(1), updatedAt: at(1) }), true);
            },
            disconnect_replica: async () => {
              assert.equal(await stager.disconnectReplica(replica, { disconnectedAt: at(2), updatedAt: at(2) }), 3, 'disconnects b, c and d');
            },
            'merge (app, mergeNow)': async () => {
              stager.stage({ agentId: c, lastConnectedAt: at(3), updatedAt: at(3) });
              await stager.flush();
              const r = await mergeNow(appPool);
              assert.equal(r.rowsConsumed, 1);
              assert.equal(r.agentsUpdated, 1);
            },
            'merge (superuser, startMerger)': async () => {
              stager.stage({ agentId: d, lastConnectedAt: at(4), updatedAt: at(4) });
              await stager.flush();
              let consumed = 0;
              const errors: Error[] = [];
              const merger = startMerger({ connectionString: url }, {
                intervalMs: 100, jitter: 0, logger: silentLogger, onMerge: (r) => void (consumed += r.rowsConsumed),
                onError: (err) => void errors.push(err),
              });
              try {
                await waitFor(() => consumed >= 1 || errors.length > 0, 'the superuser\'s merger to consume the staged row');
              } finally {
                await merger.close();
              }
              if (consumed === 0) throw errors[0];
            },
            agent_status: async () => {
              const asApp = await agentStatus(appPool, { agentIds: [a, b, c, d] });
              const asSu = await agentStatus(su, { agentIds: [a, b, c, d] });
              assert.equal(asApp.length, 4);
              assert.deepEqual(asSu, asApp);
            },
            // the status sweep reads the whole table, as the application and as the superuser (its merger)
            sweep_status: async () => {
              for (const [who, timeout] of [[appPool, '31 seconds'], [su, '30 seconds']] as const) {
                // a changed inactive timeout makes the sweep evaluate every row (not only the cheap window)
                await su.query('UPDATE heartbeat.settings SET inactive_timeout = $1', [timeout]);
                await su.query('UPDATE heartbeat.event_state SET last_sweep_at = NULL');
                const { rows } = await who.query('SELECT heartbeat.sweep_status() AS n');
                assert.notEqual(rows[0].n, null, 'the sweep ran');
              }
            },
          };
          for (const entry of ENTRIES) {
            const since = await pwnedMark();
            const fails = attack.fails?.[entry];
            if (fails) {
              await assert.rejects(run[entry](), (err: { sqlState?: string }) => err.sqlState === fails, `${entry} fails with ${fails}`);
            } else {
              await run[entry]();
            }
            const rows = await pwnedSince(since);
            trail.push(`${entry} after #${since}: ${JSON.stringify(rows.map((r) => [r.via, r.who, r.sess, r.at]))}`);
            seen.set(entry, [...new Set(rows.map((r) => r.who))]);
            for (const r of rows) {
              const expected = Object.fromEntries(probes(app, e().file).map((p) => [p.name, p.expect]));
              assert.deepEqual(r.probes, expected, `${attack.kind} via ${entry}: what the planted code could do as ${r.who}`);
              // called by the application or by the superuser (its merger, its agent_status)
              assert.ok([app, 'postgres'].includes(r.sess), r.sess);
            }
            await assertNobodyEscalated(`${attack.kind} via ${entry}`);
          }
        } finally {
          await stager.close();
          await appPool.query(attack.remove);
        }
        assert.deepEqual(
          Object.fromEntries(seen),
          Object.fromEntries(ENTRIES.map((entry) => [entry, attack.runsOn.has(entry) ? ['heartbeat_definer'] : []])),
          `where the planted code ran, and as whom\n${trail.join('\n')}`,
        );
        const row = (await su.query('SELECT updated_at, disconnected_at FROM public.workspace_agents WHERE id = $1', [c])).rows[0];
        const replicaDisconnected = !attack.fails?.disconnect_replica;
        assert.deepEqual(row.updated_at, attack.mergeFails ? (replicaDisconnected ? at(2) : at(0)) : at(3),
          'the merge applied the heartbeat (or failed and kept it staged)');
        if (attack.mergeFails) {
          const { rows: staged } = await su.query('SELECT agent_id::text FROM heartbeat.agent_connection_staging ORDER BY 1');
          assert.deepEqual(staged.map((r) => r.agent_id), [c, d].sort(), 'the snapshots wait in staging; nothing lost');
          await su.query('DELETE FROM heartbeat.agent_connection_staging');
        }
      });
    }

    test('heartbeat.check_privilege_model() finds every kind of planted code when heartbeat_definer has rights the table\'s owner lacks', async () => {
      const { su, appPool } = e();
      const found: Record<string, string> = {};
      for (const attack of ATTACKS) {
        await appPool.query(attack.plant);
        try {
          await su.query('ALTER ROLE heartbeat_definer CREATEDB');
          try {
            const err = await su.query('SELECT heartbeat.check_privilege_model()').then(() => null, (x: Error & { code?: string }) => x);
            assert.equal(err?.code, '42501', `${attack.kind}: refused`);
            found[attack.kind] = /inside the merge: (.*)$/.exec(err!.message)?.[1] ?? err!.message;
          } finally {
            await su.query('ALTER ROLE heartbeat_definer NOCREATEDB');
          }
        } finally {
          await appPool.query(attack.remove);
        }
      }
      assert.deepEqual(found, Object.fromEntries(ATTACKS.map((a) => [a.kind, `${a.fn} (owner ${e().app})`])));
      await su.query('SELECT heartbeat.check_privilege_model()');
      await assertNobodyEscalated('after the check');
    });

    /** Runs `fn` with the planted trigger on the table and heartbeat_definer made unsafe by `unsafe`; `restore` always runs. */
    async function withUnsafeModel(unsafe: string, restore: string, fn: () => Promise<void>): Promise<void> {
      const { su, appPool } = e();
      await appPool.query(ATTACKS[0]!.plant);
      try {
        await su.query(unsafe);
        try {
          await fn();
        } finally {
          await su.query(restore);
        }
      } finally {
        await appPool.query(ATTACKS[0]!.remove);
      }
      await su.query('SELECT heartbeat.check_privilege_model()');
      await assertNobodyEscalated('after restoring the model');
    }

    /** Every way of (re)applying the model refuses, with `message`. */
    async function assertModelRefused(message: RegExp): Promise<void> {
      const { su, url } = e();
      const ways: Record<string, () => Promise<unknown>> = {
        'SELECT heartbeat.check_privilege_model()': () => su.query('SELECT heartbeat.check_privilege_model()'),
        'SELECT heartbeat.apply_privileges()': () => su.query('SELECT heartbeat.apply_privileges()'),
        ...Object.fromEntries(Object.entries(path.reapply ?? {}).map(([name, fn]) => [name, () => fn(url)])),
      };
      for (const [name, way] of Object.entries(ways)) {
        await assert.rejects(way(), (err: { code?: string; sqlState?: string; message?: string }) => {
          assert.equal(err.sqlState ?? err.code, '42501', `${name}: ${err.message}`);
          assert.match(String(err.message), message, name);
          return true;
        }, `${name} refuses`);
      }
    }

    /** Every SECURITY DEFINER entry point refuses to run, as the application and as the superuser; the planted code never runs. */
    async function assertDefinerFunctionsRefuse(message: RegExp, only?: string[]): Promise<void> {
      const { su, appPool } = e();
      const agent = randomUUID();
      await appPool.query('INSERT INTO public.workspace_agents (id, updated_at) VALUES ($1, $2)', [agent, new Date(Date.now() - 60_000)]);
      const since = await pwnedMark();
      const now = new Date();
      const calls: Record<string, (pool: pg.Pool) => Promise<unknown>> = {
        disconnect_agent: (p) => p.query('SELECT heartbeat.disconnect_agent($1, $2, $2)', [agent, now]),
        disconnect_replica: (p) => p.query('SELECT heartbeat.disconnect_replica($1, $2, $2)', [randomUUID(), now]),
        'merge_agent_connections (mergeNow)': (p) => mergeNow(p),
        merge_staging_part: (p) => p.query('SELECT * FROM heartbeat.merge_staging_part(0)'),
        'agent_status (agentStatus)': (p) => agentStatus(p, { agentIds: [agent] }),
        staging_epoch: (p) => p.query('SELECT * FROM heartbeat.staging_epoch()'),
      };
      for (const [name, call] of Object.entries(calls)) {
        if (only && !only.includes(name)) continue;
        for (const [who, pool] of [['app', appPool], ['superuser', su]] as const) {
          await assert.rejects(call(pool), (err: { code?: string; sqlState?: string; message?: string }) => {
            assert.equal(err.sqlState ?? err.code, '42501', `${name} as ${who}: ${err.message}`);
            assert.match(String(err.message), message, `${name} as ${who}`);
            return true;
          }, `${name} as ${who} refuses`);
        }
      }
      assert.deepEqual(await pwnedSince(since), [], 'the planted trigger never ran');
    }

    test('a privileged heartbeat_definer (CREATEROLE) with a foreign trigger on the table: the model check, every re-apply and every definer function refuse', async () => {
      await withUnsafeModel('ALTER ROLE heartbeat_definer CREATEROLE', 'ALTER ROLE heartbeat_definer NOCREATEROLE', async () => {
        await assertModelRefused(/refuses this setup: heartbeat_definer has rights the owner of public\.workspace_agents \(hb_app_\w+\) lacks \(CREATEROLE\), and the table runs functions owned by others inside the merge: public\.pwn_trigger\(\) \(owner hb_app_\w+\)/);
        await assertDefinerFunctionsRefuse(/refuses to run with the rights of heartbeat_definer, a privileged role \(CREATEROLE\)/);
      });
    });

    test('pg_write_server_files granted to heartbeat_definer, NOINHERIT or inherited: everything refuses, no file is written', async () => {
      // NOINHERIT (as sql/roles.sql creates it) is not enough: up to PostgreSQL 15 code running inside a
      // SECURITY DEFINER function may still SET ROLE to a role it is a member of. So any membership is refused.
      for (const [grant, undo] of [
        ['GRANT pg_write_server_files TO heartbeat_definer', 'REVOKE pg_write_server_files FROM heartbeat_definer'],
        // inherited (the role made INHERIT before the grant: on PostgreSQL 16+ the grant takes its inherit option from it)
        ['ALTER ROLE heartbeat_definer INHERIT; GRANT pg_write_server_files TO heartbeat_definer',
          'REVOKE pg_write_server_files FROM heartbeat_definer; ALTER ROLE heartbeat_definer NOINHERIT'],
      ] as const) {
        await withUnsafeModel(grant, undo, async () => {
          await assertModelRefused(/heartbeat_definer has rights the owner of public\.workspace_agents \(hb_app_\w+\) lacks \(member of pg_write_server_files\)/);
          await assertDefinerFunctionsRefuse(/refuses to run with the rights of heartbeat_definer, a privileged role \(member of pg_write_server_files\)/);
          assert.equal(existsSync(e().file), false);
        });
      }
    });

    test('a SECURITY DEFINER function re-owned by the superuser: the model check and every re-apply refuse, the function refuses to run; apply_privileges() repairs it', async () => {
      const { su, appPool } = e();
      const fn = 'heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz)';
      await appPool.query(ATTACKS[0]!.plant);
      try {
        await su.query(`ALTER FUNCTION ${fn} OWNER TO CURRENT_USER`);
        try {
          // apply_privileges() is the repair here, not a refusal: the check and the install path's re-runs refuse
          const ways: Record<string, () => Promise<unknown>> = {
            'SELECT heartbeat.check_privilege_model()': () => su.query('SELECT heartbeat.check_privilege_model()'),
            ...Object.fromEntries(Object.entries(path.reapply ?? {}).map(([name, f]) => [name, () => f(e().url)])),
          };
          for (const [name, way] of Object.entries(ways)) {
            await assert.rejects(way(), (err: { message?: string }) => {
              assert.match(String(err.message), /SECURITY DEFINER functions not owned by heartbeat_definer: heartbeat\.disconnect_agent\(uuid,timestamp with time zone,timestamp with time zone,uuid,timestamp with time zone,timestamp with time zone\) \(owner postgres\)/, name);
              return true;
            }, `${name} refuses`);
          }
          await assertDefinerFunctionsRefuse(/refuses to run with the rights of postgres, a privileged role \(SUPERUSER/, ['disconnect_agent']);
        } finally {
          await su.query('SELECT heartbeat.apply_privileges()');
        }
        const { rows } = await su.query(`SELECT pg_get_userbyid(proowner) AS owner FROM pg_proc WHERE oid = '${fn}'::regprocedure`);
        assert.deepEqual(rows, [{ owner: 'heartbeat_definer' }], 'apply_privileges() handed it back');
      } finally {
        await appPool.query(ATTACKS[0]!.remove);
      }
      await assertNobodyEscalated('after the repair');
    });

    test('installing into an unsafe setup is refused and leaves nothing behind', async () => {
      const { cluster, app } = e();
      const dbName = 'hb_escalation_install';
      const admin = new pg.Client({ connectionString: cluster.url() });
      await admin.connect();
      try {
        await admin.query(`CREATE DATABASE ${dbName}`);
      } finally {
        await admin.end();
      }
      const url = cluster.url(dbName);
      const su = new pg.Pool({ connectionString: url, max: 2 });
      su.on('error', () => {});
      try {
        await su.query(`GRANT CREATE ON SCHEMA public TO ${pg.escapeIdentifier(app)}`);
        const appClient = new pg.Client({ connectionString: asRole(url, app) });
        await appClient.connect();
        try {
          await appClient.query(`BEGIN; ${sqlFile('001_workspace_agents.sql')}; COMMIT;`);
          await appClient.query(pwnFunctionSql(app, e().file));
          await appClient.query(ATTACKS[0]!.plant);
        } finally {
          await appClient.end();
        }
        await su.query('ALTER ROLE heartbeat_definer CREATEROLE');
        try {
          await assert.rejects(path.install(url), (err: { message?: string }) => {
            assert.match(String(err.message), /refuses this setup: heartbeat_definer has rights the owner of public\.workspace_agents \(hb_app_\w+\) lacks \(CREATEROLE\)/);
            return true;
          });
        } finally {
          await su.query('ALTER ROLE heartbeat_definer NOCREATEROLE');
        }
        const { rows } = await su.query("SELECT count(*)::int AS n FROM pg_proc WHERE pronamespace = to_regnamespace('heartbeat')");
        assert.deepEqual(rows, [{ n: 0 }], 'the install was rolled back: no pg-heartbeat function exists');
      } finally {
        await su.end();
      }
      await assertNobodyEscalated('after the refused install');
    });
  });
}

function asRole(url: string, role: string): string {
  const u = new URL(url);
  u.username = role;
  u.password = '';
  return u.toString();
}
