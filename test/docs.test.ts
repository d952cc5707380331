/**
 * The README and docs/ stay true:
 *
 * - every code block runs, against a fresh migrated database per page (blocks of one page run in
 *   order, sharing it): ```ts blocks that import 'pg-heartbeat' (with this checkout's source in its
 *   place), ```sql through psql, ```python with Debian's python3 and psycopg, ```sh with bash (a
 *   `pg-heartbeat` command on PATH runs this checkout's CLI). A block that must not run here says
 *   why in an HTML comment on the line above it: `<!-- not run: reason -->`, or
 *   `<!-- run by test/x.test.ts -->` when a test of its own runs it (that test must name the page).
 *   Output and configuration (```text, ```console, ```ini, ```yaml, no language) is not code.
 * - every relative link (files and #anchors) resolves, and every docs/ page is linked from somewhere.
 */
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { createTestDb, type TestDb } from './support/db.ts';
import { type Block, codeBlocks } from './support/markdown.ts';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const PAGES = ['README.md', ...readdirSync(join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).sort().map((f) => `docs/${f}`)];
const NOT_CODE = new Set(['', 'text', 'console', 'ini', 'conf', 'yaml', 'yml', 'json', 'diff', 'output']);
const RUNNERS = new Set(['ts', 'sql', 'python', 'sh', 'bash']);
const PYTHON = '/usr/bin/python3';

/** GitHub's anchor for a heading. */
export function slug(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\s_-]/gu, '')
    .replace(/\s/g, '-');
}

function anchors(page: string): Set<string> {
  const seen = new Map<string, number>();
  const out = new Set<string>();
  let fenced = false;
  for (const line of readFileSync(page, 'utf8').split('\n')) {
    if (line.startsWith('```')) fenced = !fenced;
    const h = !fenced && /^#{1,6}\s+(.*)$/.exec(line);
    if (!h) continue;
    const base = slug(h[1]!);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    out.add(n === 0 ? base : `${base}-${n}`);
  }
  for (const m of readFileSync(page, 'utf8').matchAll(/<a (?:name|id)="([^"]+)"/g)) out.add(m[1]!);
  return out;
}

/** Relative links of a page (outside code), as [line, target]. */
function links(page: string): [number, string][] {
  const out: [number, string][] = [];
  let fenced = false;
  readFileSync(join(ROOT, page), 'utf8').split('\n').forEach((line, i) => {
    if (line.startsWith('```')) fenced = !fenced;
    if (fenced) return;
    const text = line.replace(/`[^`]*`/g, '');
    for (const m of text.matchAll(/!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g)) {
      const target = m[1]!;
      if (!/^[a-z][a-z0-9+.-]*:/i.test(target)) out.push([i + 1, target]);
    }
  });
  return out;
}

/** The broken relative links of a page (path relative to the repository), as "page:line: target (why)". */
function brokenLinks(page: string): string[] {
  const broken: string[] = [];
  for (const [line, target] of links(page)) {
    const [path, anchor] = target.split('#') as [string, string | undefined];
    const file = path ? resolve(ROOT, dirname(page), decodeURIComponent(path)) : join(ROOT, page);
    if (!existsSync(file)) {
      broken.push(`${page}:${line}: ${target} (no such file)`);
      continue;
    }
    if (anchor !== undefined) {
      if (!file.endsWith('.md')) broken.push(`${page}:${line}: ${target} (anchor into a non-Markdown file)`);
      else if (!anchors(file).has(anchor)) broken.push(`${page}:${line}: ${target} (no heading #${anchor} in ${relative(ROOT, file)})`);
    }
  }
  return broken;
}

describe('links', () => {
  for (const page of PAGES) {
    test(`${page}: every relative link and anchor resolves`, () => {
      assert.deepEqual(brokenLinks(page), []);
    });
  }

  test('every docs/ page is linked from the README or another page', () => {
    const linked = new Set<string>();
    for (const page of PAGES) {
      for (const [, target] of links(page)) {
        const path = target.split('#')[0]!;
        if (path) linked.add(relative(ROOT, resolve(ROOT, dirname(page), path)));
      }
    }
    assert.deepEqual(PAGES.filter((p) => p !== 'README.md' && !linked.has(p)), []);
  });

  test('the link checker catches a broken link and a broken anchor', () => {
    const dir = mkdtempSync(join(ROOT, '.tmp-links-'));
    try {
      writeFileSync(join(dir, 'a.md'), '# Title `x`\n\n## Same\n\n## Same\n');
      assert.deepEqual([...anchors(join(dir, 'a.md'))], ['title-x', 'same', 'same-1']);
      const page = relative(ROOT, join(dir, 'b.md'));
      writeFileSync(join(dir, 'b.md'), [
        '[fine](a.md#same-1) [fine too](../README.md) [web](https://example.org/x) `[code](nowhere.md)`',
        '[gone](nowhere.md)',
        '[no anchor](a.md#missing) [self](#nothing-here)',
        '```', '[in a block](ignored.md)', '```',
      ].join('\n'));
      assert.deepEqual(brokenLinks(page).map((b) => b.replace(/^.*?:(\d+): /, '$1: ')), [
        '2: nowhere.md (no such file)',
        `3: a.md#missing (no heading #missing in ${relative(ROOT, join(dir, 'a.md'))})`,
        `3: #nothing-here (no heading #nothing-here in ${page})`,
      ]);
      assert.equal(slug('Is the merge keeping up? `heartbeat.status`'), 'is-the-merge-keeping-up-heartbeatstatus');
      assert.equal(slug('PostgreSQL 14–18'), 'postgresql-1418');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('README', () => {
  test('is short: at most 300 lines, and starts with the two commands', () => {
    const text = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const lines = text.trimEnd().split('\n');
    assert.ok(lines.length <= 300, `README.md has ${lines.length} lines`);
    const first = codeBlocks('README.md')[0]!;
    assert.ok(first.line <= 5, 'the first thing after the title is a code block');
    assert.match(first.code, /^npm ci && npm run demo\b/m);
    assert.match(first.code, /^npm test\b/m);
  });
});

describe('code blocks', () => {
  const all = PAGES.flatMap(codeBlocks);

  test('every block of code runs here, or says why not', () => {
    const unaccounted: string[] = [];
    for (const b of all) {
      if (NOT_CODE.has(b.lang)) continue;
      if (b.marker) {
        const by = /^<!-- run by (test\/\S+\.test\.ts) -->$/.exec(b.marker);
        if (by) {
          assert.ok(existsSync(join(ROOT, by[1]!)), `${b.page}:${b.line}: ${by[1]} does not exist`);
          assert.ok(readFileSync(join(ROOT, by[1]!), 'utf8').includes(b.page), `${b.page}:${b.line}: ${by[1]} does not name ${b.page}`);
          continue;
        }
        assert.match(b.marker, /^<!-- not run: \S.*-->$/, `${b.page}:${b.line}: marker ${b.marker}`);
        continue;
      }
      if (!RUNNERS.has(b.lang)) unaccounted.push(`${b.page}:${b.line}: \`\`\`${b.lang} cannot run here: mark it <!-- not run: why -->`);
      if (b.lang === 'ts' && !b.code.includes("from 'pg-heartbeat'")) unaccounted.push(`${b.page}:${b.line}: a ts block that does not import 'pg-heartbeat'`);
    }
    assert.deepEqual(unaccounted, []);
  });

  const runnable = (page: string): Block[] => all.filter((b) => b.page === page && !b.marker && RUNNERS.has(b.lang));
  for (const page of PAGES) {
    const blocks = runnable(page);
    if (blocks.length === 0) continue;
    describe(page, () => {
      let db: TestDb;
      let dir: string;
      let env: NodeJS.ProcessEnv;
      before(async () => {
        db = await createTestDb(`docs_${page}`);
        dir = mkdtempSync(join(ROOT, '.tmp-docs-'));
        const bin = join(dir, 'bin');
        mkdirSync(bin);
        const tsx = import.meta.resolve('tsx');
        writeFileSync(join(bin, 'pg-heartbeat'), `#!/bin/sh\nexec ${JSON.stringify(process.execPath)} --import ${tsx} ${JSON.stringify(join(ROOT, 'src/cli/main.ts'))} "$@"\n`);
        chmodSync(join(bin, 'pg-heartbeat'), 0o755);
        env = { ...process.env, DATABASE_URL: db.url, PATH: `${bin}:${process.env.PATH}` };
        for (const v of ['PGHOST', 'PGPORT', 'PGUSER', 'PGPASSWORD', 'PGDATABASE']) delete env[v];
      });
      after(async () => {
        rmSync(dir, { recursive: true, force: true });
        await db.drop();
      });
      for (const b of blocks) {
        const hasPython = b.lang !== 'python' || spawnSync(PYTHON, ['-c', 'import psycopg']).status === 0;
        const skip = !hasPython && !process.env.CI && 'python3-psycopg is not installed (apt-get install python3-psycopg)';
        test(`${page}:${b.line} (${b.lang}) runs`, { skip }, async () => {
          const file = join(dir, `block-${b.line}.${b.lang === 'python' ? 'py' : b.lang}`);
          let argv: string[];
          if (b.lang === 'ts') {
            writeFileSync(file, b.code.replaceAll("from 'pg-heartbeat'", `from '${join(ROOT, 'src/index.ts')}'`));
            argv = [process.execPath, '--import', import.meta.resolve('tsx'), file];
          } else if (b.lang === 'sql') {
            writeFileSync(file, b.code);
            argv = ['psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-f', file, db.url];
          } else if (b.lang === 'python') {
            writeFileSync(file, b.code);
            argv = [PYTHON, file];
          } else {
            writeFileSync(file, `set -euo pipefail\n${b.code}`);
            argv = ['bash', file];
          }
          const result = await run(argv[0]!, argv.slice(1), { cwd: dir, env, timeout: 120_000, maxBuffer: 16 * 1024 * 1024 }).catch(
            (err: { code: unknown; stdout: string; stderr: string }) => err,
          );
          const { stdout, stderr } = result as { stdout: string; stderr: string };
          const code = (result as { code?: unknown }).code;
          assert.ok(code === undefined || code === 0, `${page}:${b.line} exited ${String(code)}\n${stderr}\n${stdout}`);
          if (b.lang === 'ts' || b.lang === 'python') assert.doesNotMatch(stderr, /Error|Traceback/, stderr);
        });
      }
    });
  }
});
