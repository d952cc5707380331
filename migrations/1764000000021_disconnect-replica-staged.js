// Applies sql/021_disconnect_replica_staged.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('021_disconnect_replica_staged.sql'));
export const down = forwardOnly('021_disconnect_replica_staged');
