// Applies sql/020_disconnect_replica_lock_order.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('020_disconnect_replica_lock_order.sql'));
export const down = forwardOnly('020_disconnect_replica_lock_order');
