// Applies sql/006_status.sql.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('006_status.sql'));
export const down = (pgm) =>
  pgm.sql(
    'DROP VIEW heartbeat.status; DROP FUNCTION heartbeat.merge_status(); DROP FUNCTION heartbeat.agent_status(interval, uuid[]);',
  );
