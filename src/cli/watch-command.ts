import type { HeartbeatError } from '../errors.ts';
import { consoleLogger, type Logger, silentLogger } from '../logger.ts';
import { type StatusChange, watchStatusChanges } from '../status-events.ts';
import { type Command, UsageError } from './command.ts';
import { msOption } from './merger-command.ts';

/** `<at ISO> <agentId> <from> -> <to> (<reason>) #<id>` */
export function eventLine(e: StatusChange): string {
  return `${isoOrNull(e.at) ?? 'invalid-time'} ${e.agentId} ${e.from} -> ${e.to} (${e.reason}) #${e.id}`;
}

/** One JSON object: id, agentId, from, to, reason, at and recordedAt (ISO 8601, null when not representable). */
export function eventJson(e: StatusChange): string {
  return JSON.stringify({ id: e.id, agentId: e.agentId, from: e.from, to: e.to, reason: e.reason, at: isoOrNull(e.at), recordedAt: isoOrNull(e.recordedAt) });
}

const isoOrNull = (d: Date): string | null => (Number.isNaN(d.getTime()) ? null : d.toISOString());

/** 'now' or a whole number >= 0. */
export function sinceOption(value: string | boolean | undefined): number | 'now' {
  if (value === undefined || value === 'now') return 'now';
  const n = typeof value === 'string' && /^\d+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n)) throw new UsageError(`--since must be an event id (a whole number) or now, not ${JSON.stringify(value)}`);
  return n;
}

/** Writes a line to stdout, waiting while the pipe is full (a slow reader slows the watcher; nothing is dropped). */
function writeLine(line: string): Promise<void> {
  return new Promise((resolve) => {
    if (process.stdout.write(`${line}\n`)) resolve();
    else process.stdout.once('drain', resolve);
  });
}

export const watchCommand: Command = {
  name: 'watch',
  summary: 'print agents\' status changes (connected, disconnected, timeout) as they happen, until Ctrl-C or SIGTERM',
  usage: '[--since ID|now] [--json] [--poll] [--poll-interval MS]',
  help: {
    since: 'start after this event id (what a previous run printed last), or now (default)',
    json: 'one JSON object per line: id, agentId, from, to, reason, at, recordedAt',
    poll: 'poll instead of LISTEN (through pgbouncer in transaction mode)',
    'poll-interval': 'ms between polls (default 1000 with --poll; 5000 as the LISTEN backstop)',
  },
  options: { since: { type: 'string' }, json: { type: 'boolean' }, poll: { type: 'boolean' }, 'poll-interval': { type: 'string' } },
  async run(ctx) {
    const since = sinceOption(ctx.values.since);
    const pollIntervalMs = msOption(ctx.values['poll-interval'], 'poll-interval', undefined);
    const listen = !ctx.values.poll;
    const format = ctx.values.json ? eventJson : eventLine;
    const target = ctx.database();
    let failure: HeartbeatError | undefined;
    let started = false;
    // before the watcher first got going, a failure is the command's failure (one line, exit 1); afterwards
    // warnings go to stderr while it retries, and a fatal error is the one line main() prints
    const logger: Logger = {
      ...silentLogger,
      warn: (message, meta) => {
        if (started) consoleLogger.warn(message, meta);
      },
    };
    const watcher = watchStatusChanges(target.url === undefined ? {} : { connectionString: target.url }, {
      since,
      listen,
      pollIntervalMs,
      logger,
      onChange: (event) => writeLine(format(event)),
      onError: (error) => {
        if (!started && failure === undefined) {
          failure = error;
          void watcher.close();
        }
      },
      applicationName: 'pg-heartbeat watch',
    });
    const stop = new Promise<string>((resolve) => {
      process.once('SIGINT', () => resolve('SIGINT'));
      process.once('SIGTERM', () => resolve('SIGTERM'));
      // the reader went away (`| head`): stop quietly, as Unix tools do
      process.stdout.on('error', () => resolve('EPIPE'));
    });
    try {
      const first = await Promise.race([watcher.ready.then(() => undefined), stop]);
      if (first !== undefined) {
        await watcher.close();
        return 0;
      }
    } catch (err) {
      await watcher.close();
      throw failure ?? err;
    }
    started = true;
    process.stderr.write(
      `pg-heartbeat watch: watching status changes after #${watcher.lastId} (${listen ? 'LISTEN' : `polling every ${pollIntervalMs ?? 1000} ms`}); Ctrl-C stops\n`,
    );
    const outcome = await Promise.race([stop, watcher.done]);
    await watcher.close();
    if (outcome === 'EPIPE') return 0;
    await new Promise<void>((resolve) => process.stdout.write('', () => resolve()));
    if (typeof outcome === 'string') {
      process.stderr.write(`pg-heartbeat watch: ${outcome}: stopped after #${watcher.lastId} (resume with --since ${watcher.lastId})\n`);
      return 0;
    }
    if (outcome) throw outcome;
    return 0;
  },
};
