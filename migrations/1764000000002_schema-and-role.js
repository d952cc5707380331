// Creates the heartbeat schema (when node-pg-migrate has not already, for its
// bookkeeping table) and the cluster-wide roles (sql/roles.sql, created only
// when missing), then applies sql/002_schema_and_role.sql. Going down keeps the
// schema (it holds the migrations table) and the roles, which other databases may use.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => {
  pgm.sql('CREATE SCHEMA IF NOT EXISTS heartbeat');
  pgm.sql(sqlFile('roles.sql'));
  pgm.sql(sqlFile('002_schema_and_role.sql'));
};
export const down = () => {};
