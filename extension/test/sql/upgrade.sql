-- Upgrades from every earlier version reach the same objects as a fresh install, and
-- keep what was staged before (1.2 moves staging into parts).
CREATE TABLE public.regress_fresh AS
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS member
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_heartbeat');
CREATE FUNCTION public.regress_members_differ() RETURNS bigint LANGUAGE sql AS $$
    WITH now_members AS (
        SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS member
          FROM pg_depend d
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
           AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_heartbeat'))
    SELECT count(*) FROM ((SELECT * FROM now_members EXCEPT SELECT * FROM public.regress_fresh)
                          UNION ALL (SELECT * FROM public.regress_fresh EXCEPT SELECT * FROM now_members)) x
$$;
INSERT INTO public.workspace_agents (id, updated_at)
SELECT ('00000000-0000-4000-a000-' || lpad(to_hex(g), 12, '0'))::uuid, '2026-01-01 00:00:00+00'
  FROM generate_series(1, 100) AS g;

-- from 1.0, through 1.1
DROP EXTENSION pg_heartbeat;
CREATE EXTENSION pg_heartbeat VERSION '1.0';
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
SELECT ('00000000-0000-4000-a000-' || lpad(to_hex(g), 12, '0'))::uuid, '2026-04-01 00:00:00+00', '2026-04-01 00:00:00+00'
  FROM generate_series(1, 50) AS g;
ALTER EXTENSION pg_heartbeat UPDATE TO '1.1';
SELECT to_regprocedure('heartbeat.disconnect_replica(uuid, timestamptz, timestamptz)') IS NOT NULL AS has_disconnect_replica;
ALTER EXTENSION pg_heartbeat UPDATE TO '1.2';
SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat';
SELECT count(*) AS staged_kept FROM heartbeat.agent_connection_staging;
SELECT rows_consumed, agents_updated FROM heartbeat.merge_agent_connections();
SELECT heartbeat.check_privilege_model();
-- 1.2 to 1.3 (status events), 1.4, 1.5, 1.6, 1.7 and 1.8, with rows staged: kept, and merged with events
INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
SELECT ('00000000-0000-4000-a000-' || lpad(to_hex(g), 12, '0'))::uuid, '2026-04-01 12:00:00+00', '2026-04-01 12:00:00+00', '2026-04-01 12:00:00+00'
  FROM generate_series(1, 10) AS g;
ALTER EXTENSION pg_heartbeat UPDATE TO '1.3';
ALTER EXTENSION pg_heartbeat UPDATE TO '1.4';
ALTER EXTENSION pg_heartbeat UPDATE TO '1.5';
ALTER EXTENSION pg_heartbeat UPDATE TO '1.6';
ALTER EXTENSION pg_heartbeat UPDATE TO '1.7';
ALTER EXTENSION pg_heartbeat UPDATE TO '1.8';
SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat';
SELECT public.regress_members_differ() AS members_differ_from_fresh;
SELECT count(*) AS staged_kept FROM heartbeat.agent_connection_staging;
SELECT rows_consumed, agents_updated, status_events FROM heartbeat.merge_agent_connections();
SELECT from_status, to_status, reason, count(*) FROM heartbeat.status_events_after(0) GROUP BY 1, 2, 3;
SELECT heartbeat.check_privilege_model();

-- from 1.1
DROP EXTENSION pg_heartbeat;
CREATE EXTENSION pg_heartbeat VERSION '1.1';
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
SELECT ('00000000-0000-4000-a000-' || lpad(to_hex(g), 12, '0'))::uuid, '2026-04-02 00:00:00+00', '2026-04-02 00:00:00+00'
  FROM generate_series(51, 100) AS g;
ALTER EXTENSION pg_heartbeat UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat';
SELECT public.regress_members_differ() AS members_differ_from_fresh;
SELECT rows_consumed, agents_updated FROM heartbeat.merge_agent_connections();
SELECT last_connected_at, count(*) FROM public.workspace_agents
 WHERE id::text LIKE '00000000-0000-4000-a000-%' GROUP BY 1 ORDER BY 1;

DROP FUNCTION public.regress_members_differ();
DROP TABLE public.regress_fresh;
-- DROP EXTENSION takes every member with it (and leaves the application's table)
DROP EXTENSION pg_heartbeat;
SELECT count(*) AS left_in_schema FROM pg_class WHERE relnamespace = to_regnamespace('heartbeat');
SELECT to_regclass('public.workspace_agents') IS NOT NULL AS table_kept;
