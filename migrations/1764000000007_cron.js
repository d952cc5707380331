// Applies sql/007_cron.sql. Going down drops the functions but leaves any
// pg_cron job alone (it may live in another database): unschedule first.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('007_cron.sql'));
export const down = (pgm) =>
  pgm.sql(
    'DROP FUNCTION heartbeat.unschedule_merge(); DROP FUNCTION heartbeat.schedule_merge(interval); ' +
      'DROP FUNCTION heartbeat.merge_job(interval); DROP PROCEDURE heartbeat.merge_loop(interval, interval);',
  );
