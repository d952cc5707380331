import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { PACKAGE_ROOT } from '../paths.ts';
import { checkDatabaseUrl, type Command, UsageError } from './command.ts';

/** Options passed through to bench/run.ts (see the README, "Benchmark"). */
const STRING_OPTIONS = ['sizes', 'duration', 'warmup', 'period', 'strategies', 'sample', 'ceiling-strategies', 'ceiling-duration', 'ceiling-start', 'out', 'tag'] as const;
const BOOLEAN_OPTIONS = ['ceiling', 'no-micro'] as const;

export const benchCommand: Command = {
  name: 'bench',
  summary: 'benchmark naive UPDATEs, the reference batcher and pg-heartbeat side by side (source checkout only; own cluster unless a database is given)',
  usage: '[--sizes 10000,100000] [--duration S] [--warmup S] [--strategies a,b] [--ceiling] ...',
  help: {
    sizes: 'fleet sizes (default 10000,100000,1000000)',
    duration: 'measured seconds per phase (default 60)',
    warmup: 'warm-up seconds per phase (default 20)',
    period: 'heartbeat period per agent in seconds (default 15)',
    strategies: 'comma-separated strategies (default: all standard ones)',
    sample: 'agents sampled for staleness (default 1000)',
    ceiling: 'also search each strategy\'s largest sustained fleet',
    'ceiling-strategies': 'strategies for --ceiling (default reference,pg-heartbeat)',
    'ceiling-duration': 'measured seconds per ceiling probe (default 30)',
    'ceiling-start': 'first size per strategy, e.g. reference=400000,pg-heartbeat=800000',
    'no-micro': 'skip the stage() micro-benchmark',
    out: 'results folder (default bench/results)',
    tag: 'suffix for the result file names',
  },
  options: {
    ...Object.fromEntries(STRING_OPTIONS.map((o) => [o, { type: 'string' as const }])),
    ...Object.fromEntries(BOOLEAN_OPTIONS.map((o) => [o, { type: 'boolean' as const }])),
  },
  async run(ctx) {
    const script = join(PACKAGE_ROOT, 'bench', 'run.ts');
    if (!existsSync(script)) throw new UsageError('the benchmark needs a source checkout of pg-heartbeat (bench/run.ts is not in the published package)');
    const given = (ctx.values['database-url'] as string | undefined) ?? process.env.DATABASE_URL;
    const url = given ? checkDatabaseUrl(given) : undefined;
    const argv: string[] = [];
    for (const o of STRING_OPTIONS) if (typeof ctx.values[o] === 'string') argv.push(`--${o}`, ctx.values[o] as string);
    for (const o of BOOLEAN_OPTIONS) if (ctx.values[o] === true) argv.push(`--${o}`);
    const bench = (await import(pathToFileURL(script).href)) as {
      runBench(argv: string[], out: (line: string) => void, databaseUrl?: string): Promise<number>;
    };
    return bench.runBench(argv, ctx.out, url);
  },
};
