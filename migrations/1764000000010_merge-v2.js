// Applies sql/010_merge.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('010_merge.sql'));
export const down = forwardOnly('010_merge');
