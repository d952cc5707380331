// Applies sql/004_merge.sql.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('004_merge.sql'));
export const down = (pgm) => pgm.sql('DROP FUNCTION heartbeat.merge_agent_connections(); DROP FUNCTION heartbeat.reject_future(timestamptz, text); DROP FUNCTION heartbeat.clock_horizon();');
