-- Status events (1.3): every transition and reason, recorded once; the reader's contract.
CREATE FUNCTION pg_temp.agent(c text) RETURNS uuid LANGUAGE sql AS $$ SELECT ('00000000-0000-4000-8000-00000000ee0' || c)::uuid $$;
CREATE FUNCTION pg_temp.events() RETURNS TABLE (agent text, from_status text, to_status text, reason text)
LANGUAGE sql AS $$
    SELECT right(e.agent_id::text, 1), e.from_status, e.to_status, e.reason
      FROM heartbeat.status_events_after(0, 1000) e
     WHERE e.agent_id::text LIKE '00000000-0000-4000-8000-00000000ee0%' ORDER BY e.id
$$;
-- the sweep's instant, a minute ago: statuses are evaluated there until the next sweep
UPDATE heartbeat.event_state SET swept_through = now() - interval '1 minute', last_sweep_at = NULL;
-- 1 heartbeated 45 s ago (inactive now, not a minute ago); 2 never connects (timeout 20 s, created 50 s ago);
-- 3 connected just now
INSERT INTO public.workspace_agents (id, created_at, updated_at, first_connected_at, last_connected_at, connection_timeout_seconds)
VALUES (pg_temp.agent('1'), now() - interval '1 hour', now() - interval '45 seconds', now() - interval '1 hour', now() - interval '45 seconds', 0),
       (pg_temp.agent('2'), now() - interval '50 seconds', now() - interval '50 seconds', NULL, NULL, 20),
       (pg_temp.agent('3'), now() - interval '1 hour', now() - interval '1 hour', NULL, NULL, 0);

-- the sweep: inactivity and a connection timeout
SELECT heartbeat.sweep_status() >= 2 AS swept;  -- (and what earlier tests left)
SELECT * FROM pg_temp.events();
-- a second sweep right away skips (NULL), and would find nothing
SELECT heartbeat.sweep_status() AS skipped;

-- merges: a reconnect and a first heartbeat; a heartbeat of a connected agent records nothing
INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
VALUES (pg_temp.agent('1'), now(), now(), now()), (pg_temp.agent('3'), now(), now(), now());
SELECT rows_consumed, agents_updated, status_events FROM heartbeat.merge_agent_connections();
INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at)
VALUES (pg_temp.agent('1'), now(), clock_timestamp(), clock_timestamp());
SELECT rows_consumed, agents_updated, status_events FROM heartbeat.merge_agent_connections();

-- direct writes: a disconnect, then the same agent's stale disconnect (nothing), then a replica's
SELECT heartbeat.disconnect_agent(pg_temp.agent('1'), clock_timestamp(), clock_timestamp()) AS applied;
SELECT heartbeat.disconnect_agent(pg_temp.agent('1'), now() - interval '1 second', now() - interval '1 second') AS stale;
UPDATE public.workspace_agents SET last_connected_replica_id = '22222222-2222-4222-8222-222222222222' WHERE id = pg_temp.agent('3');
SELECT heartbeat.disconnect_replica('22222222-2222-4222-8222-222222222222', clock_timestamp(), clock_timestamp()) AS disconnected;
SELECT * FROM pg_temp.events();

-- ids increase; the head is the highest
SELECT count(*) = count(DISTINCT id) AND max(id) = heartbeat.status_events_head() AS ids_ok
  FROM heartbeat.status_events_after(0, 1000);

-- a reader that asks for purged events is told (HBP01), a reader after the horizon is not
UPDATE heartbeat.event_state SET purged_through = 2;
SELECT count(*) FROM heartbeat.status_events_after(0);
SELECT count(*) > 0 AS after_horizon FROM heartbeat.status_events_after(2);
UPDATE heartbeat.event_state SET purged_through = 0;

-- a reader reads events; it may not sweep or write them
SET ROLE heartbeat_reader;
SELECT heartbeat.status_events_head() > 0 AS reads;
SELECT heartbeat.sweep_status();
DELETE FROM heartbeat.status_events;
RESET ROLE;
