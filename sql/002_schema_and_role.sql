-- pg-heartbeat 002: the heartbeat schema and the heartbeat_writer role.
--
-- heartbeat_writer is a NOLOGIN group role. Grant it to the application's login
-- role (GRANT heartbeat_writer TO my_app;): members may COPY into the staging
-- table and execute the merge and disconnect functions, and nothing else.
-- Roles are cluster-wide, so it is created only when missing.
SET LOCAL lock_timeout = '10s';

CREATE SCHEMA IF NOT EXISTS heartbeat;
REVOKE ALL ON SCHEMA heartbeat FROM PUBLIC;

DO $role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'heartbeat_writer') THEN
        CREATE ROLE heartbeat_writer NOLOGIN;
    END IF;
EXCEPTION WHEN unique_violation OR duplicate_object THEN
    -- created meanwhile by a migration of another database of this cluster
    -- (the migrations' advisory lock is per database, roles are per cluster)
    NULL;
END
$role$;

GRANT USAGE ON SCHEMA heartbeat TO heartbeat_writer;
