// Applies sql/011_direct_writes.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('011_direct_writes.sql'));
export const down = forwardOnly('011_direct_writes');
