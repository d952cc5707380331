// Applies sql/roles.sql (the cluster-wide roles, created when missing) and
// sql/009_staging_parts.sql. Migrations from 009 on are forward-only (see
// docs/versions.md): going down is refused, nothing is changed.
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => {
  pgm.sql(sqlFile('roles.sql'));
  pgm.sql(sqlFile('009_staging_parts.sql'));
};
export const down = forwardOnly('009_staging_parts');
