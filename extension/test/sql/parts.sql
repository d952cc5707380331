-- Staging in hash parts: how many is chosen with heartbeat.set_staging_parts(n) (the owner),
-- changed while rows are staged, losing nothing; new parts are members of the extension.
INSERT INTO public.workspace_agents (id, updated_at)
SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(g), 12, '0'))::uuid, '2026-01-01 00:00:00+00'
  FROM generate_series(1, 1000) AS g;
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(g), 12, '0'))::uuid, '2026-03-01 00:00:00+00', '2026-03-01 00:00:00+00'
  FROM generate_series(1, 1000) AS g;
SELECT heartbeat.set_staging_parts(8) AS moved;
SELECT part, relname FROM heartbeat.staging_parts();
SELECT count(*) AS staged FROM heartbeat.agent_connection_staging;
SELECT count(*) AS members
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_heartbeat')
   AND d.classid = 'pg_class'::regclass
   AND d.objid IN (SELECT relid FROM heartbeat.staging_parts());
-- every part merges on its own: the parts are disjoint sets of agents
SELECT rows_consumed, agents_updated, skipped_concurrent FROM heartbeat.merge_staging_part(5);
SELECT sum(rows_consumed) AS rows_consumed, sum(agents_updated) AS agents_updated
  FROM generate_series(0, 7) AS p, heartbeat.merge_staging_part(p);
SELECT count(*) AS merged FROM public.workspace_agents WHERE last_connected_at = '2026-03-01 00:00:00+00';
SELECT * FROM heartbeat.merge_staging_part(8);
-- back to 4; out of range refused
SELECT heartbeat.set_staging_parts(4) AS moved;
SELECT count(*) AS parts FROM heartbeat.staging_parts();
SELECT heartbeat.set_staging_parts(0);
SELECT heartbeat.set_staging_parts(65);
