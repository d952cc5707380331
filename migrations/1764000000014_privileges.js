// Applies sql/014_privileges.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('014_privileges.sql'));
export const down = forwardOnly('014_privileges');
