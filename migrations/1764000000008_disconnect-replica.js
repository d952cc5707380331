// Applies sql/008_disconnect_replica.sql (the same file is the pg_heartbeat
// extension's 1.0 -> 1.1 update script, see extension/build.ts).
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('008_disconnect_replica.sql'));
export const down = (pgm) =>
  pgm.sql('DROP FUNCTION heartbeat.disconnect_replica(uuid, timestamptz, timestamptz);');
