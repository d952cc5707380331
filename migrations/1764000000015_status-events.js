// Applies sql/015_status_events.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('015_status_events.sql'));
export const down = forwardOnly('015_status_events');
