-- heartbeat.status and heartbeat.part_status() (is the merge keeping up?) and
-- heartbeat.agent_status() (each agent's status), never broken by one row.
CREATE FUNCTION pg_temp.agent(c text) RETURNS uuid LANGUAGE sql AS $$ SELECT ('00000000-0000-4000-8000-0000000000e' || c)::uuid $$;

SELECT staged_rows, oldest_staged_at IS NULL AS nothing_waits, merge_lag IS NULL AS no_lag, merges_total > 0 AS merged,
       dead_letters, staging_parts, merge_lock_holder_pid, merge_lock_busy_since
  FROM heartbeat.status;
-- rows waiting: the lag is the oldest valid staged time's age; a hostile '-infinity' does not make it infinite
INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES
    (pg_temp.agent('1'), now() - interval '10 seconds'),
    (pg_temp.agent('2'), '-infinity');
SELECT staged_rows, merge_lag >= interval '10 seconds' AND merge_lag < interval '1 minute' AS lag_is_age FROM heartbeat.status;
SELECT part, staged_rows FROM heartbeat.part_status() WHERE staged_rows > 0 ORDER BY part;
SELECT sum(staged_rows) AS staged FROM heartbeat.part_status();
SELECT rows_consumed, skipped_unknown, skipped_invalid FROM heartbeat.merge_agent_connections();
SELECT last_merge_rows_consumed, last_merge_skipped_unknown, last_merge_skipped_invalid, since_last_merge >= interval '0' AS ok
  FROM heartbeat.status;

-- agent_status: the reference system's rules, on the database clock
INSERT INTO public.workspace_agents (id, created_at, updated_at, first_connected_at, last_connected_at, disconnected_at, connection_timeout_seconds) VALUES
    (pg_temp.agent('a'), now() - interval '1 day', now(), NULL, NULL, NULL, 0),                                                          -- never connected
    (pg_temp.agent('b'), now() - interval '30 seconds', now(), NULL, NULL, NULL, 60),                                                   -- within the connection timeout
    (pg_temp.agent('c'), now() - interval '61 seconds', now(), NULL, NULL, NULL, 60),                                                   -- past it
    (pg_temp.agent('d'), now(), now(), now() - interval '1 minute', now() - interval '5 seconds', now() - interval '4 seconds', 0),    -- disconnected after the last heartbeat
    (pg_temp.agent('e'), now(), now(), now() - interval '1 minute', now() - interval '2 seconds', now() - interval '9 seconds', 0),    -- reconnected
    (pg_temp.agent('f'), now(), now(), now() - interval '1 minute', now() - interval '31 seconds', NULL, 0),                          -- inactive
    (pg_temp.agent('7'), now(), now(), now() - interval '1 minute', now() - interval '1 second', NULL, 0),                            -- recent
    -- values already in the table (from before 1.2, or written around pg-heartbeat) no longer break it
    (pg_temp.agent('8'), '-infinity', now(), '-infinity', 'infinity', NULL, 0),
    (pg_temp.agent('9'), now(), now(), now() - interval '1 minute', '-infinity', 'infinity', 0);
SELECT right(agent_id::text, 1) AS agent, status
  FROM heartbeat.agent_status(agent_ids => ARRAY(SELECT pg_temp.agent(c) FROM unnest(ARRAY['a','b','c','d','e','f','7','8','9']) c))
 ORDER BY agent_id;
SELECT right(agent_id::text, 1) AS agent, status
  FROM heartbeat.agent_status(interval '1 minute', ARRAY[pg_temp.agent('f')]);
SELECT count(*) AS every_agent FROM heartbeat.agent_status();
SELECT heartbeat.agent_status(interval '0');
