-- pg-heartbeat 021: disconnect_replica() also disconnects the agents whose connection
-- through the replica is staged but not merged yet.
--
-- disconnect_replica(A) disconnected the rows of workspace_agents connected through A
-- when it ran. An agent whose connection through A was still in staging (reconnected
-- after a disconnect, or a first connect) was not one of them, and the next merge
-- applied that connection: the agent showed connected through the gone replica until
-- its connection timeout. The same happened when a merge applying such connections was
-- in flight (not committed) during the call: its rows were not connected yet in the
-- call's snapshot, and were a moment later. Now the call also stages a disconnect for
-- every agent whose newest staged snapshot (the one the merge would apply, in the merge's
-- order) is a connection through A older than the call (updated_at before its
-- updated_at) and newer than the agent's row: the staged connection's last_connected_at,
-- through A, disconnected at the call's time. The merge takes it as the agent's newest
-- snapshot: the agent ends connected at its real last_connected_at and disconnected at
-- the call's time, and a connection staged later with a newer time still wins. A merge
-- in flight has deleted its rows from staging without committing, so the call's snapshot
-- still sees them there and stages their disconnects the same way. The result counts
-- both: rows disconnected now and disconnects staged. Signature and rules otherwise
-- unchanged (lock order as in sql/020).
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
            ), staged_via AS MATERIALIZED (
                -- agents with a staged connection through the replica that the merge would apply
                -- before the call's time (its updated_at earlier); the candidates, usually few
                SELECT DISTINCT s.agent_id
                  FROM heartbeat.agent_connection_staging s
                 WHERE s.last_connected_replica_id = $1
                   AND s.agent_id IS NOT NULL
                   AND s.last_connected_at IS NOT NULL
                   AND (s.disconnected_at IS NULL OR s.disconnected_at < s.last_connected_at)
                   AND s.updated_at < $3
            ), staged_newest AS (
                -- each candidate's newest staged snapshot, in the merge's order
                SELECT DISTINCT ON (s.agent_id)
                       s.agent_id, s.last_connected_at, s.last_connected_replica_id, s.disconnected_at, s.updated_at
                  FROM heartbeat.agent_connection_staging s
                  JOIN staged_via c ON c.agent_id = s.agent_id
                 WHERE s.updated_at IS NOT NULL
                 ORDER BY s.agent_id, s.updated_at DESC, s.disconnected_at DESC NULLS LAST,
                          s.last_connected_at DESC NULLS LAST, s.last_connected_replica_id DESC NULLS LAST
            ), staged_off AS (
                -- its disconnect, staged: the next merge applies it instead of the connection
                INSERT INTO heartbeat.agent_connection_staging
                       (agent_id, last_connected_at, last_connected_replica_id, disconnected_at, updated_at)
                SELECT sn.agent_id, sn.last_connected_at, $1, $2, $3
                  FROM staged_newest sn
                  JOIN public.workspace_agents wa ON wa.id = sn.agent_id
                 WHERE sn.last_connected_replica_id = $1
                   AND sn.last_connected_at IS NOT NULL
                   AND (sn.disconnected_at IS NULL OR sn.disconnected_at < sn.last_connected_at)
                   AND sn.updated_at < $3
                   AND wa.updated_at < sn.updated_at
                   -- not a row connected through the replica in this snapshot: those are the
                   -- victims above (or, re-checked as locked, were changed by another transaction)
                   AND NOT (wa.last_connected_replica_id IS NOT DISTINCT FROM $1
                            AND wa.last_connected_at IS NOT NULL
                            AND (wa.disconnected_at IS NULL OR wa.disconnected_at < wa.last_connected_at))
                RETURNING 1
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
            SELECT (SELECT pg_catalog.count(*) FROM disconnected) + (SELECT pg_catalog.count(*) FROM staged_off),
                   (SELECT pg_catalog.count(*) FROM events)
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
