/**
 * Issue 11, the extension install path: the same escalation attacks as
 * test/security-migrations.test.ts, with pg-heartbeat installed by
 * CREATE EXTENSION pg_heartbeat (as a superuser; the application owns the table).
 * No `reapply`: apply_privileges() repairs a re-owned function rather than refusing it.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { sqlFile } from '../sql/load.js';
import { escalationSuite } from './support/escalation.ts';

const EXTENSION_DIR = fileURLToPath(new URL('../extension', import.meta.url));

escalationSuite({
  name: 'extension',
  install: async (url) => {
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    try {
      const { rows } = await c.query("SELECT setting AS sharedir FROM pg_config() WHERE name = 'SHAREDIR'");
      const sharedir = rows[0].sharedir as string;
      if (!existsSync(join(sharedir, 'extension'))) throw new Error(`the server's share directory ${sharedir} is not on this machine`);
      const make = spawnSync('make', ['-C', EXTENSION_DIR, '-s', 'install', `datadir=${sharedir}`], { encoding: 'utf8' });
      if (make.status !== 0) throw new Error(`make -C extension install failed: ${make.stderr || make.error}`);
      await c.query(sqlFile('roles.sql'));
      await c.query('CREATE EXTENSION pg_heartbeat');
    } finally {
      await c.end();
    }
  },
});
