/**
 * The `logger` option works for real with pino, winston and console: the
 * library's own log calls (a merger on a database without the migrations, so a
 * failing merge with its error; then a successful one with its counts) reach
 * each logger's output with the message, the meta and the error.
 */
import assert from 'node:assert/strict';
import { Console } from 'node:console';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import winston from 'winston';
import { pinoLogger, startMerger, toLogger, winstonLogger, consoleLogger, type Logger } from '../src/index.ts';
import { createTestDb, type TestDb } from './support/db.ts';

class Capture extends Writable {
  text = '';
  override _write(chunk: Buffer, _enc: BufferEncoding, done: () => void): void {
    this.text += chunk.toString();
    done();
  }
  lines(): string[] {
    return this.text.split('\n').filter(Boolean);
  }
}

let bare: TestDb;
let migrated: TestDb;
before(async () => {
  [bare, migrated] = await Promise.all([createTestDb('logger_bare', { migrated: false }), createTestDb('logger')]);
});
after(async () => {
  await Promise.all([bare.drop(), migrated.drop()]);
});

async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!cond()) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Runs a merger with `logger` (as the user passes it) against `db` until `done()`; returns nothing. */
async function runMerger(db: TestDb, logger: unknown, done: () => boolean, what: string): Promise<void> {
  const merger = startMerger({ pool: db.pool }, { logger: logger as Logger, intervalMs: 100 });
  try {
    await until(done, what);
  } finally {
    await merger.stop();
  }
}

describe('pino', () => {
  test('the error, its message and stack, and the meta arrive (pino takes the fields first)', async () => {
    const out = new Capture();
    const logger = pino({ level: 'debug' }, out);
    await runMerger(bare, logger, () => out.text.includes('"level":50'), 'a failed merge logged');
    const line = JSON.parse(out.lines().find((l) => l.includes('"level":50'))!) as Record<string, any>;
    assert.match(line.msg, /merge failed: .*run the migrations: pg-heartbeat migrate.*; retrying in about 100 ms/);
    assert.equal(line.consecutiveFailures >= 1, true, 'meta field');
    assert.equal(line.err.type, 'MigrationsMissingError', 'the error under pino\'s err key, serialised');
    assert.match(line.err.message, /run the migrations/);
    assert.match(line.err.stack, /MigrationsMissingError/);
    assert.equal(line.err.code, 'MIGRATIONS_MISSING');

    const ok = new Capture();
    await runMerger(migrated, pino({ level: 'info' }, ok), () => ok.text.includes('merged staged heartbeats'), 'a merge logged');
    const merged = JSON.parse(ok.lines().find((l) => l.includes('merged staged heartbeats'))!) as Record<string, any>;
    assert.equal(merged.level, 30);
    assert.equal(merged.rowsConsumed, 0, 'the counts as fields');
    assert.equal(typeof merged.durationMs, 'number');
  });

  test('without the adapter pino would drop the meta: that is what toLogger fixes', () => {
    const out = new Capture();
    const raw = pino(out);
    (raw.error as (...args: unknown[]) => void)('boom', { error: new Error('lost') }); // what a (message, meta) call does
    assert.doesNotMatch(out.text, /lost/, 'pino called as (message, meta) drops meta');
    const adapted = toLogger(pino(out));
    adapted.error('boom', { error: new Error('kept'), agents: 3 });
    const line = JSON.parse(out.lines().at(-1)!) as Record<string, any>;
    assert.equal(line.msg, 'boom');
    assert.equal(line.agents, 3);
    assert.equal(line.err.message, 'kept');
    assert.equal(toLogger(adapted), adapted, 'idempotent');
  });
});

describe('winston', () => {
  test('the error (message, stack, code) and the meta arrive in its JSON output', async () => {
    const out = new Capture();
    const logger = winston.createLogger({ level: 'debug', format: winston.format.json(), transports: [new winston.transports.Stream({ stream: out })] });
    await runMerger(bare, logger, () => out.text.includes('"level":"error"'), 'a failed merge logged');
    const line = JSON.parse(out.lines().find((l) => l.includes('"level":"error"'))!) as Record<string, any>;
    assert.match(line.message, /merge failed: .*run the migrations/);
    assert.ok(line.consecutiveFailures >= 1, 'meta field');
    assert.equal(line.error.name, 'MigrationsMissingError');
    assert.match(line.error.message, /run the migrations/);
    assert.equal(line.error.code, 'MIGRATIONS_MISSING');
    assert.equal(line.error.sqlState, '3F000', 'the SQLSTATE (schema heartbeat missing)');
    assert.match(line.error.stack, /MigrationsMissingError/);

    const ok = new Capture();
    const info = winston.createLogger({ level: 'info', format: winston.format.json(), transports: [new winston.transports.Stream({ stream: ok })] });
    await runMerger(migrated, info, () => ok.text.includes('merged staged heartbeats'), 'a merge logged');
    const merged = JSON.parse(ok.lines().find((l) => l.includes('merged staged heartbeats'))!) as Record<string, any>;
    assert.equal(merged.level, 'info');
    assert.equal(merged.agentsUpdated, 0);
  });

  test('explicit adapters are exported too', () => {
    const out = new Capture();
    const w = winstonLogger(winston.createLogger({ format: winston.format.json(), transports: [new winston.transports.Stream({ stream: out })] }));
    w.warn('careful', { error: Object.assign(new Error('outer', { cause: new Error('inner') }), { code: 'X' }) });
    const line = JSON.parse(out.text) as Record<string, any>;
    assert.equal(line.error.code, 'X');
    assert.equal(line.error.cause.message, 'inner');
    const p = new Capture();
    pinoLogger(pino(p)).info('hello', { a: 1 });
    assert.equal(JSON.parse(p.text).a, 1);
  });
});

describe('console', () => {
  test('console (and any Console) is used as it is: message, meta and the error with its stack', async () => {
    const stdout = new Capture();
    const stderr = new Capture();
    const logger = new Console({ stdout, stderr });
    await runMerger(bare, logger, () => stderr.text.includes('retrying'), 'a failed merge logged');
    assert.match(stderr.text, /merge failed: .*run the migrations.*retrying in about 100 ms/);
    assert.match(stderr.text, /consecutiveFailures: \d+/);
    assert.match(stderr.text, /MigrationsMissingError: merge failed/);
    assert.match(stderr.text, /\n\s+at /, 'the stack, as console prints errors');
    assert.equal(toLogger(console), console);
  });

  test('the default logger: warnings and errors on stderr, one line each, the error\'s message included', () => {
    assert.equal(toLogger(undefined), consoleLogger);
  });

  test('a logger with only some levels gets no-ops for the others; a non-logger is refused', () => {
    const seen: string[] = [];
    const partial = toLogger({ error: (m: string) => seen.push(m) });
    partial.debug('nothing');
    partial.error('something');
    assert.deepEqual(seen, ['something']);
    assert.throws(() => toLogger({}), TypeError);
    assert.throws(() => toLogger('stderr'), TypeError);
  });
});
