/**
 * `pg-heartbeat demo` as a user runs it (one process per run), on a test
 * database given as DATABASE_URL, with a small fleet: it must print the
 * disconnect check and the summary, exit 0, and leave the database as it found
 * it (other agents untouched, its own removed), also when interrupted.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';
import { agentRow, createAgents, createTestDb, stagedCount, type AgentRow, type TestDb } from './support/db.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface Run { code: number | null; stdout: string; stderr: string }

function start(args: string[], env: Record<string, string>): { child: ChildProcess; done: Promise<Run>; stdout(): string } {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<Run>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  return { child, done, stdout: () => stdout };
}

const num = (s: string): number => Number(s.replace(/,/g, ''));

function field(stdout: string, pattern: RegExp): RegExpMatchArray {
  const m = stdout.match(pattern);
  assert.ok(m, `output lacks ${pattern}:\n${stdout}`);
  return m;
}

let db: TestDb;
let others: string[];
let othersBefore: AgentRow[];
before(async () => {
  db = await createTestDb('demo');
  // agents of "the application": the demo must not touch them
  others = await createAgents(db.pool, 5);
  othersBefore = await Promise.all(others.map((id) => agentRow(db.pool, id)));
});
after(async () => {
  await db.drop();
});

async function assertCleanedUp(): Promise<void> {
  const { rows } = await db.pool.query<{ id: string }>('SELECT id FROM public.workspace_agents ORDER BY id');
  assert.deepEqual(rows.map((r) => r.id), [...others].sort(), 'only the pre-existing agents are left');
  assert.deepEqual(await Promise.all(others.map((id) => agentRow(db.pool, id))), othersBefore, 'pre-existing agents unchanged');
  assert.equal(await stagedCount(db.pool), 0, 'nothing of the demo left in staging');
}

test('demo on DATABASE_URL: disconnect check, summary, exit 0, cleaned up', async () => {
  const run = await start(['demo', '--agents', '300', '--seconds', '12'], { DATABASE_URL: db.url }).done;
  assert.equal(run.code, 0, `exit code; stderr: ${run.stderr}\nstdout: ${run.stdout}`);
  assert.equal(run.stderr, '');
  const out = run.stdout;
  assert.doesNotMatch(out, /\r/, 'stdout is not a terminal: plain progress lines');
  assert.match(out, /^ +\d+ s {2}heartbeats +[\d,]+\/s {2}db statements +[\d.,]+\/s {2}merged +[\d,]+ rows {2}merge lag /m, 'a progress line');
  assert.match(out, /counting database statements with pg_stat_database/, 'the test cluster has no pg_stat_statements: the fallback says so');
  assert.match(out, /disconnect storm: 30 agents \(10 %\) disconnected through HeartbeatStager\.disconnect .*\(30 rows changed\)/);
  assert.match(out, /heartbeat\.agent_status\(\): 270 connected, 30 disconnected; all 30 disconnected agents show 'disconnected'/);
  const events = out.match(/status events: (\d+) of 30 'disconnect' events reached a watcher \(LISTEN\/NOTIFY\), median ([\d.]+) (ms|s), last ([\d.]+) (ms|s)/);
  assert.ok(events, `the demo reports the status events of the storm:\n${out}`);
  assert.equal(events[1], '30', 'every disconnect reached the watcher');
  const lastMs = Number(events[4]) * (events[5] === 's' ? 1000 : 1);
  assert.ok(lastMs < 5_000, `within seconds of the storm (${events[4]} ${events[5]})`);

  const heartbeats = num(field(out, /^ {2}heartbeats +([\d,]+) \(/m)[1]!);
  const [, ours, copies, rowsCopied, merges] = field(out, /^ {2}pg-heartbeat +([\d,]+) statements .*: ([\d,]+) COPY \(([\d,]+) rows\), ([\d,]+) merges .*, 30 disconnects/m);
  const counted = num(field(out, /^ {2}the database counted +([\d,]+) /m)[1]!);
  const naive = num(field(out, /^ {2}naive +([\d,]+) statements/m)[1]!);
  assert.ok(heartbeats >= 300, `every agent heartbeats at least once: ${heartbeats}`);
  assert.equal(naive, heartbeats + 30, 'naive = one UPDATE per heartbeat and per disconnect');
  assert.equal(num(ours!), num(copies!) + num(merges!) + 30, 'own count = COPYs + merges + disconnects');
  assert.ok(num(rowsCopied!) >= 300 && num(rowsCopied!) <= heartbeats, 'every agent reached staging, folded at most once per heartbeat');
  assert.ok(counted >= num(ours!), `the database saw at least the library's statements (${counted} < ${ours})`);
  assert.ok(num(ours!) < naive, 'fewer statements than one UPDATE per heartbeat');
  assert.match(out, /^cleanup: removed the demo's 300 agents$/m);
  await assertCleanedUp();
});

test('demo interrupted (SIGINT): removes its agents, one line on stderr, non-zero exit', async () => {
  const run = start(['demo', '--agents', '200', '--seconds', '120'], { DATABASE_URL: db.url });
  const deadline = Date.now() + 60_000;
  while (!/heartbeats +[\d,]+\/s/.test(run.stdout())) {
    assert.ok(Date.now() < deadline, `no progress line within 60 s:\n${run.stdout()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const { rows } = await db.pool.query<{ n: string }>('SELECT count(*) AS n FROM public.workspace_agents');
  assert.equal(Number(rows[0]!.n), 205, 'the demo created its agents');
  run.child.kill('SIGINT');
  const done = await run.done;
  assert.notEqual(done.code, 0);
  assert.deepEqual(done.stderr.trim().split('\n'), ['pg-heartbeat demo: interrupted by SIGINT']);
  assert.match(done.stdout, /^cleanup: removed the demo's 200 agents$/m);
  await assertCleanedUp();
});

test('demo with bad options: one line, non-zero exit, nothing created', async () => {
  for (const args of [['--agents', '0'], ['--agents', 'many'], ['--seconds', '0']]) {
    const run = await start(['demo', ...args], { DATABASE_URL: db.url }).done;
    assert.notEqual(run.code, 0, args.join(' '));
    assert.match(run.stderr, /^pg-heartbeat demo: --(agents|seconds) must be [^\n]*\n$/, args.join(' '));
  }
  await assertCleanedUp();
});
