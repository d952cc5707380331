-- pg-heartbeat 020: disconnect_replica() locks its rows in the merge's order.
--
-- A merge over every part (heartbeat.merge_agent_connections(), pg_cron's lane 0)
-- merges the parts of staging one after another in one transaction: it locks the
-- rows of part 0's agents, then part 1's, and so on, each part in id order. Until
-- now heartbeat.disconnect_replica() locked its victims in id order across the
-- whole table, so a merge holding a part-0 agent and waiting for a part-3 agent
-- could meet a disconnect_replica() holding that part-3 agent (smaller id) and
-- waiting for the part-0 one: a deadlock, which the server broke by rolling back
-- one of them (disconnect_replica() retried up to 5 times; under a busy merge it
-- could fail all 5). Now it locks part by part (the part a row's agent_id hashes
-- to, as the partitioned staging table routes it: satisfies_hash_partition()),
-- each in id order, so the two take their locks in the same order and no cycle
-- forms between them. Deadlocks with other transactions (an application's own
-- lock order) are still retried as before. Signature, rules and result unchanged.
SET LOCAL lock_timeout = '10s';

CREATE OR REPLACE FUNCTION heartbeat.disconnect_replica(
    replica_id      uuid,
    disconnected_at timestamptz,
    updated_at      timestamptz
) RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
-- Never a nested loop: the replica's rows were just written (its statistics say one row),
-- and staging can hold many dead pages between vacuums; a nested-loop anti-join then scans
-- staging once per victim (12 s for 10,000 agents, measured), holding their row locks.
-- Hash joins make it one pass over each (0.35 s).
SET enable_nestloop = off
AS $disconnect_replica$
DECLARE
    n       bigint;
    n_ev    bigint;
    clk     record;
    n_parts integer;
BEGIN
    PERFORM heartbeat.assert_definer();
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_replica: replica_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    PERFORM heartbeat.check_times('heartbeat.disconnect_replica', $2, $3);
    clk := heartbeat.event_clock();
    SELECT pg_catalog.count(*) INTO n_parts FROM heartbeat.staging_parts();

    FOR attempt IN 1 .. 5 LOOP
        BEGIN
            WITH victims AS MATERIALIZED (
                SELECT wa.id,
                       heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                           wa.created_at, wa.connection_timeout_seconds,
                                           clk.at, clk.stale_before, clk.horizon) AS old_status
                  FROM public.workspace_agents wa
                 WHERE wa.last_connected_replica_id = $1
                   AND wa.last_connected_at IS NOT NULL
                   AND (wa.disconnected_at IS NULL OR wa.disconnected_at < wa.last_connected_at)
                   AND wa.updated_at < $3
                   -- a newer connection through another replica, staged but not merged yet
                   AND NOT EXISTS (
                       SELECT 1 FROM heartbeat.agent_connection_staging s
                        WHERE s.agent_id = wa.id
                          AND s.last_connected_replica_id IS DISTINCT FROM $1
                          AND s.last_connected_at > wa.last_connected_at
                          AND (s.disconnected_at IS NULL OR s.disconnected_at < s.last_connected_at))
                 -- the merge's order: part by part, each in id order (sql/020)
                 ORDER BY (SELECT p FROM pg_catalog.generate_series(0, n_parts - 1) AS p
                            WHERE pg_catalog.satisfies_hash_partition(
                                      'heartbeat.agent_connection_staging'::pg_catalog.regclass, n_parts, p, wa.id)
                            LIMIT 1),
                          wa.id
                   FOR NO KEY UPDATE OF wa
            ), disconnected AS (
                UPDATE public.workspace_agents AS wa
                   SET disconnected_at = $2,
                       updated_at      = $3
                  FROM victims v
                 WHERE wa.id = v.id
                   -- re-checked on the row as locked: it may have changed meanwhile
                   AND wa.last_connected_replica_id = $1
                   AND (wa.disconnected_at IS NULL OR wa.disconnected_at < wa.last_connected_at)
                   AND wa.updated_at < $3
                RETURNING wa.id, v.old_status, wa.last_connected_at, wa.disconnected_at, wa.created_at,
                          wa.connection_timeout_seconds,
                          heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                              wa.created_at, wa.connection_timeout_seconds,
                                              clk.at, clk.stale_before, clk.horizon) AS new_status
            ), events AS (
                INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
                SELECT x.id, x.old_status, x.new_status, x.reason,
                       heartbeat.event_at(x.new_status, x.reason, x.last_connected_at, x.disconnected_at,
                                          x.created_at, x.connection_timeout_seconds, clk.inactive_timeout, clk.at)
                  FROM (SELECT d.*, heartbeat.event_reason(d.old_status, d.new_status, d.last_connected_at,
                                                           d.disconnected_at) AS reason
                          FROM disconnected d
                         WHERE d.old_status <> d.new_status) x
                RETURNING 1
            )
            SELECT (SELECT pg_catalog.count(*) FROM disconnected), (SELECT pg_catalog.count(*) FROM events)
              INTO n, n_ev;
            IF n_ev > 0 THEN
                PERFORM heartbeat.publish_events();
            END IF;
            RETURN n;
        EXCEPTION WHEN deadlock_detected OR lock_not_available THEN
            -- a deadlock, or a row a merge held past lock_timeout (a large merge on a busy
            -- server): this attempt rolled back; try again, at most 5 times in all
            IF attempt = 5 THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.pg_sleep(0.05 * attempt);
        END;
    END LOOP;
    RETURN 0;  -- not reached
END
$disconnect_replica$;
