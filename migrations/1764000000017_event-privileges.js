// Applies sql/017_event_privileges.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('017_event_privileges.sql'));
export const down = forwardOnly('017_event_privileges');
