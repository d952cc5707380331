// Applies sql/022_merge_all_parts.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('022_merge_all_parts.sql'));
export const down = forwardOnly('022_merge_all_parts');
