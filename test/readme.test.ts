/**
 * The README's TypeScript examples run for real: each ```ts block that imports
 * 'pg-heartbeat' is written to a temp module (importing this checkout's source
 * instead of the published package) and executed against a fresh database.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import { createTestDb, type TestDb } from './support/db.ts';

const run = promisify(execFile);
const root = new URL('..', import.meta.url).pathname;
const blocks = [...readFileSync(join(root, 'README.md'), 'utf8').matchAll(/```ts\n([\s\S]*?)```/g)]
  .map((m) => m[1]!)
  .filter((code) => code.includes("from 'pg-heartbeat'"));

let db: TestDb;
let dir: string;
before(async () => {
  db = await createTestDb('readme');
  dir = mkdtempSync(join(root, '.tmp-readme-'));
});
after(async () => {
  rmSync(dir, { recursive: true, force: true });
  await db.drop();
});

test('the README has runnable examples', () => {
  assert.ok(blocks.length >= 1);
});

for (const [i, code] of blocks.entries()) {
  test(`README example ${i + 1} runs`, async () => {
    const file = join(dir, `example-${i + 1}.ts`);
    writeFileSync(file, code.replaceAll("from 'pg-heartbeat'", `from '${join(root, 'src/index.ts')}'`));
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', file], {
      env: { ...process.env, DATABASE_URL: db.url },
      timeout: 60_000,
    });
    assert.doesNotMatch(stderr, /Error/, stderr);
    assert.ok(stdout.length >= 0);
  });
}
