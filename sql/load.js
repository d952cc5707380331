// Reads one of the numbered SQL files beside this module: the single source of
// truth shared by the node-pg-migrate migrations, the Postgres extension build
// and anyone applying the SQL by hand.
import { readFileSync } from 'node:fs';

export function sqlFile(name) {
  return readFileSync(new URL(`./${name}`, import.meta.url), 'utf8');
}

// Migrations from 009 on replace functions and rebuild staging in ways that
// cannot be undone without losing staged heartbeats: they are forward-only.
// Going down is refused with this message (the transaction rolls back, nothing
// changes). To remove pg-heartbeat entirely: DROP SCHEMA heartbeat CASCADE.
export function forwardOnly(name) {
  return () => {
    throw new Error(
      `pg-heartbeat migration ${name} is forward-only: it cannot be reverted (restore a backup to go back, ` +
        'or DROP SCHEMA heartbeat CASCADE to remove pg-heartbeat)',
    );
  };
}
