-- pg-heartbeat roles: cluster-wide, created once per cluster.
--
-- The migrations apply this file before the numbered ones. For the extension
-- (CREATE EXTENSION pg_heartbeat), a role with CREATEROLE (or a superuser) runs it
-- once, as the role that will run CREATE EXTENSION:
--   psql -v ON_ERROR_STOP=1 -f sql/roles.sql
--
--   heartbeat_writer   NOLOGIN group for the application's login roles: COPY into
--                      staging, the merge, disconnects, status.
--                      (GRANT heartbeat_writer TO my_app;)
--   heartbeat_reader   NOLOGIN group for consumers that only read status and events.
--   heartbeat_definer  NOLOGIN, owns pg-heartbeat's SECURITY DEFINER functions, so
--                      they run with its rights and nobody else's: SELECT and UPDATE
--                      of the connection columns of public.workspace_agents and
--                      pg-heartbeat's own tables. It is never a superuser, has no
--                      role attributes and is a member of no role; anything that
--                      runs inside those functions (a trigger on workspace_agents,
--                      say) runs as it. Nobody logs in as it.
--
-- The role that runs the migrations (or CREATE EXTENSION) becomes a member of
-- heartbeat_definer, which PostgreSQL requires to hand the functions to it, and
-- of heartbeat_writer (a pg_cron job runs the merge as the role that scheduled it).
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['heartbeat_writer', 'heartbeat_reader', 'heartbeat_definer'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
            EXCEPTION WHEN unique_violation OR duplicate_object THEN
                -- created meanwhile by a migration of another database of this cluster
                NULL;
            END;
        END IF;
    END LOOP;
    IF NOT pg_catalog.pg_has_role(CURRENT_USER, 'heartbeat_definer', 'MEMBER') THEN
        BEGIN
            EXECUTE pg_catalog.format('GRANT heartbeat_definer TO %I', CURRENT_USER);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'pg-heartbeat: % must be a member of heartbeat_definer to install pg-heartbeat', CURRENT_USER
                USING ERRCODE = '42501',
                      HINT = pg_catalog.format('A superuser or a role with ADMIN on it runs: GRANT heartbeat_definer TO %I;', CURRENT_USER);
        END;
    END IF;
    IF NOT pg_catalog.pg_has_role(CURRENT_USER, 'heartbeat_writer', 'MEMBER') THEN
        BEGIN
            EXECUTE pg_catalog.format('GRANT heartbeat_writer TO %I', CURRENT_USER);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg-heartbeat: % is not a member of heartbeat_writer: it cannot run the merge from pg_cron', CURRENT_USER;
        END;
    END IF;
END
$roles$;
