// Applies sql/003_staging.sql.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('003_staging.sql'));
export const down = (pgm) =>
  pgm.sql('DROP TABLE heartbeat.agent_connection_staging; DROP TABLE heartbeat.merge_state;');
