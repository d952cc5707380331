// Applies sql/019_cron_lanes.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('019_cron_lanes.sql'));
export const down = forwardOnly('019_cron_lanes');
