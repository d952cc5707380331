// Reads one of the numbered SQL files beside this module: the single source of
// truth shared by the node-pg-migrate migrations, the Postgres extension build
// and anyone applying the SQL by hand.
import { readFileSync } from 'node:fs';

export function sqlFile(name) {
  return readFileSync(new URL(`./${name}`, import.meta.url), 'utf8');
}
