// Applies sql/002_schema_and_role.sql. Going down keeps the schema (it holds the
// migrations table) and the cluster-wide role, which other databases may use.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('002_schema_and_role.sql'));
export const down = () => {};
