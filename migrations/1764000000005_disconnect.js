// Applies sql/005_disconnect.sql.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('005_disconnect.sql'));
export const down = (pgm) =>
  pgm.sql('DROP FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz);');
