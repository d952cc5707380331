/** Runs the `pg-heartbeat` CLI of this checkout as a child process, as a user would (see test/cli.test.ts). */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface Run { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

export interface Started { child: ChildProcess; done: Promise<Run>; stdout(): string; stderr(): string }

/** Starts `pg-heartbeat ...args` with `env` on top of this process's (DATABASE_URL and PG* only when given). */
export function startCli(args: string[], env: Record<string, string> = {}, nodeArgs: string[] = []): Started {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, ...env };
  if (!('DATABASE_URL' in env)) delete childEnv.DATABASE_URL;
  for (const v of ['PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE']) if (!(v in env)) delete childEnv[v];
  const t0 = performance.now();
  const child = spawn(process.execPath, ['--import', 'tsx', ...nodeArgs, 'src/cli/main.ts', ...args], { cwd: ROOT, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<Run>((resolve) => child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 })));
  return { child, done, stdout: () => stdout, stderr: () => stderr };
}

export const runCli = (args: string[], env: Record<string, string> = {}, nodeArgs: string[] = []): Promise<Run> => startCli(args, env, nodeArgs).done;
