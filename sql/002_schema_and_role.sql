-- pg-heartbeat 002: the heartbeat schema's privileges.
--
-- The schema itself comes from the migrations (node-pg-migrate keeps its
-- bookkeeping table there) or from CREATE EXTENSION (the control file's
-- schema); the roles from sql/roles.sql, once per cluster. heartbeat_writer is a
-- NOLOGIN group role: GRANT heartbeat_writer TO my_app; members may COPY into
-- the staging table and execute the merge and disconnect functions.
SET LOCAL lock_timeout = '10s';

REVOKE ALL ON SCHEMA heartbeat FROM PUBLIC;
GRANT USAGE ON SCHEMA heartbeat TO heartbeat_writer;
