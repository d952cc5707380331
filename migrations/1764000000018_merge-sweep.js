// Applies sql/018_merge_sweep.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('018_merge_sweep.sql'));
export const down = forwardOnly('018_merge_sweep');
