// Applies sql/013_cron.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('013_cron.sql'));
export const down = forwardOnly('013_cron');
