#!/usr/bin/env node
/** The `pg-heartbeat` command line. Every failure is one line on stderr and a non-zero exit. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ConnectionError, HeartbeatError, toHeartbeatError } from '../errors.ts';
import { PACKAGE_ROOT } from '../paths.ts';
import { checkDatabaseUrl, type Command, type DatabaseTarget, redact, resolveDatabase } from './command.ts';
import { commands } from './commands.ts';

const COMMON = {
  'database-url': { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

function usage(): string {
  const width = Math.max(...commands.map((c) => c.name.length));
  return [
    'usage: pg-heartbeat <command> [options]',
    '',
    'commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
    'options for every command:',
    '  --database-url URL  the database (default: $DATABASE_URL; without either, node-postgres\'s',
    '                      PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE)',
    '  -h, --help          help for the command',
    '  -v, --version       print pg-heartbeat\'s version (alone, without a command)',
  ].join('\n');
}

function commandUsage(c: Command): string {
  const lines = [`usage: pg-heartbeat ${c.name} [--database-url URL]${c.usage ? ` ${c.usage}` : ''}`, '', c.summary];
  const help = c.help ?? {};
  if (Object.keys(help).length) {
    lines.push('', 'options:');
    for (const [name, text] of Object.entries(help)) lines.push(`  --${name.padEnd(18)} ${text}`);
  }
  return lines.join('\n');
}

function version(): string {
  return (JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
}

export async function main(argv: string[]): Promise<number> {
  const name = argv[0];
  if (name === '--version' || name === '-v' || name === 'version') {
    console.log(version());
    return 0;
  }
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage());
    return name ? 0 : 2;
  }
  const command = commands.find((c) => c.name === name);
  if (!command) {
    console.error(`pg-heartbeat: unknown command ${JSON.stringify(name)}\n\n${usage()}`);
    return 2;
  }
  let parsed;
  try {
    parsed = parseArgs({ args: argv.slice(1), options: { ...COMMON, ...(command.options ?? {}) }, allowPositionals: true, strict: true });
  } catch (err) {
    console.error(`pg-heartbeat ${name}: ${(err as Error).message.replace(/\s+/g, ' ').trim()}`);
    return 2;
  }
  if (parsed.values.help) {
    console.log(commandUsage(command));
    return 0;
  }
  const url = (parsed.values['database-url'] as string | undefined) ?? process.env.DATABASE_URL;
  let target: DatabaseTarget | undefined;
  try {
    const code = await command.run({
      values: parsed.values as Record<string, string | boolean | undefined>,
      positionals: parsed.positionals,
      databaseUrl: () => checkDatabaseUrl(url),
      database: () => (target = resolveDatabase(url)),
      out: (line) => console.log(line),
    });
    return code ?? 0;
  } catch (err) {
    console.error(`pg-heartbeat ${name}: ${oneLine(err, url, target?.shown)}`);
    return 1;
  }
}

function oneLine(err: unknown, url: string | undefined, shown = url && redact(url)): string {
  const mapped = err instanceof HeartbeatError || typeof (err as { code?: unknown })?.code === 'string' ? toHeartbeatError(err, 'database') : err;
  if (mapped instanceof ConnectionError) {
    const cause = mapped.cause ?? err;
    err = new Error(`cannot reach the database${shown ? ` at ${shown}` : ''}: ${describe(cause)}`);
  } else err = mapped;
  let text = err instanceof Error ? err.message : String(err);
  if (!(err instanceof HeartbeatError) && err instanceof Error && err.name !== 'Error') text = `${err.name}: ${text}`;
  if (url) text = text.split(url).join(redact(url));
  return text.replace(/\s+/g, ' ').trim();
}

function describe(err: unknown): string {
  if (err instanceof AggregateError && !err.message) return err.errors.map(describe).join('; ');
  return err instanceof Error ? err.message || String((err as { code?: unknown }).code) : String(err);
}

process.exit(await main(process.argv.slice(2)));
