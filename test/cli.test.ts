/**
 * The `pg-heartbeat` command line, run as a user would: one process per call
 * (`node --import tsx src/cli/main.ts ...`), against real databases.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { freePort } from './support/cluster.ts';
import { createTestDb, stageBacklog, type TestDb } from './support/db.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface Run { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }

function start(args: string[], env: Record<string, string> = {}): { child: ChildProcess; done: Promise<Run>; stdout(): string; stderr(): string } {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  if (!('DATABASE_URL' in env)) delete childEnv.DATABASE_URL;
  for (const v of ['PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE']) if (!(v in env)) delete childEnv[v];
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { cwd: ROOT, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<Run>((resolve) => child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })));
  return { child, done, stdout: () => stdout, stderr: () => stderr };
}

const cli = (args: string[], env: Record<string, string> = {}): Promise<Run> => start(args, env).done;

async function waitFor(what: string, cond: () => boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Asserts a failed run: non-zero exit, exactly one line on stderr matching `pattern`, no stack. */
function assertOneLineFailure(run: Run, pattern: RegExp, what: string): void {
  assert.notEqual(run.code, 0, `${what}: exit code`);
  const lines = run.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `${what}: one line on stderr, got ${JSON.stringify(run.stderr)}`);
  assert.match(lines[0]!, pattern, what);
  assert.doesNotMatch(run.stderr, /\n\s+at /, `${what}: no stack trace`);
}

let migrated: TestDb;
let bare: TestDb;
let unreachable: string;
before(async () => {
  [migrated, bare] = await Promise.all([createTestDb('cli'), createTestDb('cli_bare', { migrated: false })]);
  unreachable = `postgresql://postgres@127.0.0.1:${await freePort()}/nowhere`;
});
after(async () => {
  await Promise.all([migrated.drop(), bare.drop()]);
});

const DB_COMMANDS = ['merge', 'merger', 'schedule', 'unschedule', 'status', 'watch'];

describe('every database subcommand fails with one clear line', () => {
  for (const name of ['migrate', ...DB_COMMANDS]) {
    test(`${name}: --help, bad URL, unreachable database${name === 'migrate' ? '' : ', migrations missing'}`, async () => {
      const [help, badUrl, down, missing] = await Promise.all([
        cli([name, '--help']),
        cli([name, '--database-url', 'not a url']),
        cli([name, '--database-url', unreachable]),
        name === 'migrate' ? undefined : cli([name], { DATABASE_URL: bare.url }),
      ]);
      assert.equal(help.code, 0);
      assert.match(help.stdout, new RegExp(`^usage: pg-heartbeat ${name} \\[--database-url URL\\]`));
      assertOneLineFailure(badUrl, new RegExp(`^pg-heartbeat ${name}: bad database URL`), `${name} with a bad URL`);
      assertOneLineFailure(down, new RegExp(`^pg-heartbeat ${name}: .*ECONNREFUSED`), `${name} with the database down`);
      if (missing) assertOneLineFailure(missing, new RegExp(`^pg-heartbeat ${name}: .*run the migrations: pg-heartbeat migrate`), `${name} before migrating`);
    });
  }

  test('no database at all', async () => {
    assertOneLineFailure(await cli(['status']), /no database: pass --database-url, set DATABASE_URL, or set node-postgres's variables \(PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE\)/, 'status without a URL');
  });

  test('migrate applies everything to a bare database, then is up to date', async () => {
    const scratch = await createTestDb('cli_migrate', { migrated: false });
    try {
      const first = await cli(['migrate', '--database-url', scratch.url]);
      assert.equal(first.code, 0, first.stderr);
      assert.match(first.stdout, /applied \d+ migration\(s\): .*1764000000006_status, 1764000000007_cron/);
      const again = await cli(['migrate'], { DATABASE_URL: scratch.url });
      assert.equal(again.code, 0);
      assert.match(again.stdout, /already up to date/);
    } finally {
      await scratch.drop();
    }
  });
});

describe('status', () => {
  test('prints a readable table, or JSON with --json', async () => {
    await migrated.pool.query("INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES (gen_random_uuid(), now() - interval '2 seconds')");
    const [table, json] = await Promise.all([
      cli(['status', '--database-url', migrated.url]),
      cli(['status', '--json'], { DATABASE_URL: migrated.url }),
    ]);
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /^staged rows\s+1$/m);
    assert.match(table.stdout, /^merge lag\s+\d+\.\d s \(oldest staged /m);
    assert.match(table.stdout, /^pg_cron\s+not loaded$/m);
    assert.equal(json.code, 0, json.stderr);
    const parsed = JSON.parse(json.stdout) as { stagedRows: number; mergeLagMs: number; cron: { database: null } };
    assert.equal(parsed.stagedRows, 1);
    assert.ok(parsed.mergeLagMs >= 2000);
    assert.equal(parsed.cron.database, null);
  });
});

describe('schedule / unschedule without pg_cron', () => {
  test('schedule names the postgresql.conf lines; unschedule has nothing to do', async () => {
    const [schedule, unschedule] = await Promise.all([
      cli(['schedule', '--every', '5 seconds', '--database-url', migrated.url]),
      cli(['unschedule', '--database-url', migrated.url]),
    ]);
    assertOneLineFailure(schedule, /pg_cron is not loaded: add to postgresql.conf shared_preload_libraries = 'pg_cron' and cron.database_name = /, 'schedule');
    assert.equal(unschedule.code, 0, unschedule.stderr);
    assert.match(unschedule.stdout, /no pg_cron merge job was scheduled/);
  });
});

describe('merger', () => {
  test('merges in the foreground, one line per merge, until SIGTERM; then stops cleanly', async () => {
    const id = crypto.randomUUID();
    await migrated.pool.query("INSERT INTO public.workspace_agents (id, updated_at) VALUES ($1, now() - interval '1 hour')", [id]);
    await migrated.pool.query('INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at) VALUES ($1, now(), now())', [id]);
    const run = start(['merger', '--interval-ms', '100', '--database-url', migrated.url]);
    await waitFor('three merge lines', () => run.stdout().split('\n').filter((l) => / merged \d+ staged row/.test(l)).length >= 3);
    run.child.kill('SIGTERM');
    const result = await run.done;
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stderr, '');
    const lines = result.stdout.trim().split('\n');
    assert.match(lines[0]!, /^\d{4}-\d\d-\d\dT\S+ merged \d+ staged row\(s\) in \d+(\.\d+)? ms: 1 agent\(s\) updated/);
    assert.match(lines.at(-2)!, /^SIGTERM: stopping after the merge in progress$/);
    assert.match(lines.at(-1)!, /^stopped: \d+ merge\(s\), 0 skipped \(another merge running\), 0 failed$/);
    const { rows } = await migrated.pool.query('SELECT last_connected_at FROM public.workspace_agents WHERE id = $1', [id]);
    assert.notEqual(rows[0].last_connected_at, null);
  });

  test('warns on stderr when the timing invariant is broken; Ctrl-C stops it', async () => {
    const run = start(['merger', '--interval-ms', '20000', '--database-url', migrated.url]);
    await waitFor('the warning and the first merge', () => /inactive timeout/.test(run.stderr()) && / merged /.test(run.stdout()));
    run.child.kill('SIGINT');
    const result = await run.done;
    assert.equal(result.code, 0);
    assert.match(result.stderr, /merge interval 22000 ms .*is not below the inactive timeout 30000 ms/);
    assert.match(result.stdout, /SIGINT: stopping/);
  });

  test('a backlog is merged part by part in parallel, each part on its own connection', async () => {
    // its own database: a statement trigger that makes every merge statement take 0.3 s, so merges in
    // parallel overlap long enough to be seen in pg_stat_activity
    const own = await createTestDb('cli_merger_parallel');
    try {
      await stageBacklog(own.pool, 2000);
      await own.pool.query('UPDATE heartbeat.settings SET max_rows_per_merge = 200');
      await own.pool.query(`CREATE FUNCTION public.slow_statement() RETURNS trigger LANGUAGE plpgsql
                              AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$`);
      await own.pool.query(`CREATE TRIGGER slow AFTER UPDATE ON public.workspace_agents
                              FOR EACH STATEMENT EXECUTE FUNCTION public.slow_statement()`);
      const run = start(['merger', '--interval-ms', '1000', '--database-url', own.url]);
      let most = 0;
      let left = -1;
      const deadline = Date.now() + 60_000;
      while (Date.now() < deadline) {
        const { rows } = await own.pool.query<{ n: number; staged: number }>(
          `SELECT (SELECT count(*)::int FROM pg_stat_activity WHERE application_name = 'pg-heartbeat merger'
                     AND state = 'active' AND query LIKE '%merge_staging_part%') AS n,
                  (SELECT count(*)::int FROM heartbeat.agent_connection_staging) AS staged`);
        most = Math.max(most, rows[0]!.n);
        left = rows[0]!.staged;
        if (left === 0 && most > 1) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      run.child.kill('SIGTERM');
      const result = await run.done;
      assert.equal(result.code, 0, result.stderr);
      assert.equal(left, 0, `staging drained: ${result.stdout}`);
      assert.ok(most >= 2, `merges of several parts at once (most seen: ${most}): ${result.stdout}`);
      assert.match(result.stdout, /; parts merged in parallel$/m);
    } finally {
      await own.drop();
    }
  });

  test('rejects a bad --interval-ms with one line', async () => {
    assertOneLineFailure(await cli(['merger', '--interval-ms', 'soon', '--database-url', migrated.url]), /--interval-ms must be a positive whole number/, 'bad interval');
  });
});

describe('watch', () => {
  /** An agent connected a second ago (so that a disconnect is a status change). */
  async function connectedAgent(): Promise<string> {
    const id = crypto.randomUUID();
    await migrated.pool.query(
      `INSERT INTO public.workspace_agents (id, updated_at, first_connected_at, last_connected_at)
       VALUES ($1, now() - interval '1 second', now() - interval '1 minute', now() - interval '1 second')`,
      [id],
    );
    return id;
  }
  const disconnect = (id: string): Promise<unknown> => migrated.pool.query('SELECT heartbeat.disconnect_agent($1, now(), now())', [id]);

  test('--json: one JSON object per line as each change happens (piped), until SIGINT (exit 0, says where to resume)', async () => {
    const run = start(['watch', '--json', '--database-url', migrated.url]);
    await waitFor('the watcher to start', () => /watching status changes after #\d+ \(LISTEN\)/.test(run.stderr()));
    const ids = [await connectedAgent(), await connectedAgent()];
    for (const id of ids) {
      const sent = Date.now();
      await disconnect(id);
      await waitFor(`the line of ${id}`, () => run.stdout().includes(id), 10_000);
      assert.ok(Date.now() - sent < 5_000, 'printed while running, not at exit');
    }
    run.child.kill('SIGINT');
    const result = await run.done;
    assert.equal(result.code, 0, result.stderr);
    const lines = result.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.deepEqual(lines.map((l) => l.agentId), ids);
    for (const l of lines) {
      assert.equal(l.from, 'connected');
      assert.equal(l.to, 'disconnected');
      assert.equal(l.reason, 'disconnect');
      assert.equal(typeof l.id, 'number');
      assert.match(String(l.at), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.match(String(l.recordedAt), /^\d{4}-\d\d-\d\dT/);
    }
    const last = lines.at(-1)!.id;
    assert.match(result.stderr, new RegExp(`SIGINT: stopped after #${last} \\(resume with --since ${last}\\)`));
  });

  test('--since ID --poll: human lines from after that id, until SIGTERM', async () => {
    const { rows } = await migrated.pool.query<{ h: string }>('SELECT heartbeat.status_events_head() AS h');
    const since = rows[0]!.h;
    const ids = [await connectedAgent(), await connectedAgent()];
    for (const id of ids) await disconnect(id); // before the watcher starts: --since finds them
    const run = start(['watch', '--since', since, '--poll', '--poll-interval', '100'], { DATABASE_URL: migrated.url });
    await waitFor('two lines', () => run.stdout().trim().split('\n').length >= 2 && ids.every((id) => run.stdout().includes(id)));
    assert.match(run.stderr(), new RegExp(`watching status changes after #${since} \\(polling every 100 ms\\)`));
    run.child.kill('SIGTERM');
    const result = await run.done;
    assert.equal(result.code, 0, result.stderr);
    const lines = result.stdout.trim().split('\n');
    assert.equal(lines.length, 2);
    lines.forEach((line, i) => {
      assert.match(line, new RegExp(`^\\d{4}-\\d\\d-\\d\\dT\\S+Z ${ids[i]} connected -> disconnected \\(disconnect\\) #\\d+$`));
    });
  });

  test('a bad --since or --poll-interval is one line', async () => {
    const [since, interval] = await Promise.all([
      cli(['watch', '--since', 'yesterday', '--database-url', migrated.url]),
      cli(['watch', '--poll-interval', '0', '--database-url', migrated.url]),
    ]);
    assertOneLineFailure(since, /^pg-heartbeat watch: --since must be an event id \(a whole number\) or now/, 'bad --since');
    assertOneLineFailure(interval, /^pg-heartbeat watch: --poll-interval must be a positive whole number/, 'bad --poll-interval');
  });
});

describe('--version, --help', () => {
  test('--version prints package.json\'s version; --help lists the commands (no bench: it needs a source checkout)', async () => {
    const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };
    for (const flag of ['--version', '-v']) {
      const run = await cli([flag]);
      assert.equal(run.code, 0);
      assert.equal(run.stdout, `${version}\n`);
    }
    const help = await cli(['--help']);
    assert.equal(help.code, 0);
    for (const name of ['migrate', ...DB_COMMANDS, 'demo']) assert.match(help.stdout, new RegExp(`^  ${name} `, 'm'));
    assert.doesNotMatch(help.stdout, /^ {2}bench /m);
    assert.match(help.stdout, /PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE/);
  });
});

describe('node-postgres conventions: without a URL, the PG* variables', () => {
  /** PGHOST etc. for `url`'s database, and no DATABASE_URL. */
  const pgEnv = (url: string): Record<string, string> => {
    const u = new URL(url);
    return {
      PGHOST: u.hostname,
      PGPORT: u.port || '5432',
      PGUSER: decodeURIComponent(u.username),
      PGPASSWORD: decodeURIComponent(u.password),
      PGDATABASE: u.pathname.slice(1),
    };
  };

  test('migrate, merge, status and unschedule connect with PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE alone', async () => {
    const db = await createTestDb('cli_pgenv', { migrated: false });
    try {
      const env = pgEnv(db.url);
      const migrated = await cli(['migrate'], env);
      assert.equal(migrated.code, 0, migrated.stderr);
      assert.match(migrated.stdout, /^applied \d+ migration\(s\)/);
      const { rows } = await db.pool.query<{ n: string }>('SELECT count(*) AS n FROM heartbeat.migrations');
      assert.ok(Number(rows[0]!.n) >= 8, 'the migrations ran in the database PGDATABASE names');
      const [again, merge, status, unschedule] = await Promise.all([cli(['migrate'], env), cli(['merge', '--json'], env), cli(['status', '--json'], env), cli(['unschedule'], env)]);
      assert.equal(again.stdout, 'already up to date\n');
      assert.equal(merge.code, 0, merge.stderr);
      assert.equal(JSON.parse(merge.stdout).rowsConsumed, 0);
      assert.equal(status.code, 0, status.stderr);
      assert.equal(JSON.parse(status.stdout).stagedRows, 0);
      assert.equal(unschedule.code, 0, unschedule.stderr);
    } finally {
      await db.drop();
    }
  });

  test('an unreachable PGHOST/PGPORT is one line naming where it tried', async () => {
    const run = await cli(['status'], { ...pgEnv(unreachable), PGPASSWORD: '' });
    assertOneLineFailure(run, /^pg-heartbeat status: cannot reach the database at postgresql:\/\/postgres@127\.0\.0\.1:\d+\/nowhere \(from the PG\* variables\): .*ECONNREFUSED/, 'status via PG* to a closed port');
  });

  test('--database-url and DATABASE_URL win over the PG* variables', async () => {
    const run = await cli(['status', '--json'], { ...pgEnv(unreachable), DATABASE_URL: migrated.url });
    assert.equal(run.code, 0, run.stderr);
  });
});
