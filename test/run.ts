/**
 * `npm test`: starts a throwaway PostgreSQL (unless DATABASE_URL is set), runs
 * every test/**\/*.test.ts with node's test runner against it (each file makes
 * its own database), then stops and deletes the cluster. Extra arguments are
 * passed to `node --test` (e.g. a file name).
 */
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { startCluster, type Cluster } from './support/cluster.ts';

function testFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? testFiles(join(dir, e.name)) : e.name.endsWith('.test.ts') ? [join(dir, e.name)] : [],
  );
}

const args = process.argv.slice(2);
const files = args.filter((a) => !a.startsWith('-'));
const flags = args.filter((a) => a.startsWith('-'));
let cluster: Cluster | undefined;
const env = { ...process.env };
if (!process.env.DATABASE_URL) {
  cluster = await startCluster();
  env.TEST_DATABASE_URL = cluster.url();
  console.log(`test cluster: PostgreSQL from ${cluster.binDir} on port ${cluster.port}`);
} else {
  console.log('test cluster: using DATABASE_URL');
}
const child = spawn(
  process.execPath,
  ['--import', 'tsx', '--test', '--test-concurrency=2', '--test-timeout=300000', ...flags, ...(files.length ? files : testFiles('test').sort())],
  { stdio: 'inherit', env },
);
const stop = (): void => void cluster?.destroy();
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
const code: number = await new Promise((resolve) => child.on('close', (c) => resolve(c ?? 1)));
await cluster?.destroy();
process.exit(code);
