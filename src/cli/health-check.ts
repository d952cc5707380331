/**
 * `pg-heartbeat status --check`: one line and an exit code a health check (Docker, Kubernetes, Nagios)
 * understands: 0 healthy, 1 unhealthy (merges stopped, or staged rows waiting too long), 2 the database
 * cannot be reached within the deadline.
 */
import pg from 'pg';
import { endPool } from '../connection.ts';
import { ConnectionError, TimeoutError, toHeartbeatError } from '../errors.ts';
import { silentLogger } from '../logger.ts';
import { readStatus, type MergeStatus } from '../status.ts';
import { type CommandContext, UsageError } from './command.ts';

export const HEALTHY = 0;
export const UNHEALTHY = 1;
export const UNREACHABLE = 2;

const UNITS: Record<string, number> = { ms: 1, s: 1000, sec: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** '30s', '500ms', '2m', '1.5h' or a plain number of seconds, in ms; a UsageError for anything else. */
export function parseDuration(value: string, option: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)?\s*$/i.exec(value);
  const ms = m ? Number(m[1]) * UNITS[(m[2] ?? 's').toLowerCase()]! : NaN;
  if (!(ms > 0) || ms > 2 ** 31 - 1) throw new UsageError(`--${option} must be a positive duration such as 30s, 500ms or 2m, not ${JSON.stringify(value)}`);
  return ms;
}

const secs = (ms: number): string => (ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`);

/** Whether `s` is healthy under `maxLagMs`, and the line saying why. */
export function judge(s: MergeStatus, maxLagMs: number): { healthy: boolean; line: string } {
  const problems: string[] = [];
  // the part merged longest ago (parts never merged since the server started have no age)
  let stalest: { part: number; sinceMs: number } | undefined;
  for (const p of s.parts) {
    if (p.lastMerge && (!stalest || p.lastMerge.sinceMs > stalest.sinceMs)) stalest = { part: p.part, sinceMs: p.lastMerge.sinceMs };
  }
  const merged = stalest === undefined
    ? 'no merge since the server started'
    : `last merge ${secs(stalest.sinceMs)} ago${s.parts.length > 1 ? ` (part ${stalest.part}, the part merged longest ago)` : ''}`;
  if (stalest && stalest.sinceMs > maxLagMs) problems.push(`${merged}, more than --max-lag ${secs(maxLagMs)}: are merges running?`);
  const staged = s.stagedRows === 0
    ? 'nothing staged'
    : `${s.stagedRows} staged row(s), the oldest ${s.mergeLagMs === null ? 'of unknown age' : `${secs(s.mergeLagMs)} old`}`;
  if (s.mergeLagMs !== null && s.mergeLagMs > maxLagMs) problems.push(`${staged}, more than --max-lag ${secs(maxLagMs)}`);
  if (problems.length > 0) return { healthy: false, line: `unhealthy: ${problems.join('; ')}` };
  return { healthy: true, line: `healthy: ${merged}; ${staged} (--max-lag ${secs(maxLagMs)})` };
}

/** Runs the check; resolves to the exit code after printing one line (stdout when healthy, stderr otherwise). */
export async function runHealthCheck(ctx: CommandContext): Promise<number> {
  const maxLagMs = parseDuration(typeof ctx.values['max-lag'] === 'string' ? ctx.values['max-lag'] : '30s', 'max-lag');
  const timeoutMs = parseDuration(typeof ctx.values.timeout === 'string' ? ctx.values.timeout : '5s', 'timeout');
  const target = ctx.database();
  const fail = (line: string): void => void process.stderr.write(`pg-heartbeat status: ${line}\n`);
  // the pool's connect timeout and the read's deadline are both the --timeout: a black-holed host
  // (SYNs dropped) or a server that accepts and never answers ends here, not at the OS's TCP timeout
  const pool = new pg.Pool({ ...target.config, max: 1, connectionTimeoutMillis: timeoutMs, application_name: 'pg-heartbeat status --check' });
  pool.on('error', () => {});
  let status: MergeStatus;
  try {
    status = await readStatus({ pool }, { timeoutMs, lookUpCron: false, logger: silentLogger });
  } catch (err) {
    const e = toHeartbeatError(err, 'read heartbeat.status');
    const cause = e.cause instanceof Error ? e.cause.message || String((e.cause as { code?: unknown }).code) : e.message;
    if (e instanceof ConnectionError || (e instanceof TimeoutError && e.sqlState === undefined)) {
      fail(`unreachable: cannot reach the database at ${target.shown} within ${secs(timeoutMs)}: ${oneLine(e instanceof TimeoutError ? e.message : cause)}`);
      return UNREACHABLE;
    }
    fail(`unhealthy: ${oneLine(e.message)}`);
    return UNHEALTHY;
  } finally {
    await endPool(pool, 1000);
  }
  const verdict = judge(status, maxLagMs);
  if (verdict.healthy) ctx.out(verdict.line);
  else fail(verdict.line);
  return verdict.healthy ? HEALTHY : UNHEALTHY;
}

const oneLine = (text: string): string => text.replace(/\s+/g, ' ').trim();
