// Applies sql/012_status.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('012_status.sql'));
export const down = forwardOnly('012_status');
