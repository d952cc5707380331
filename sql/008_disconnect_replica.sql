-- pg-heartbeat 008: heartbeat.disconnect_replica(), every agent of one replica at once.
--
-- When an app replica shuts down, or dies and is noticed by another replica or an
-- operator, all agents it was serving are disconnected in one statement instead
-- of one disconnect_agent() call each. Only agents that still look connected
-- through that replica are touched: last_connected_replica_id is the replica and
-- disconnected_at is NULL or older than last_connected_at. The guard is the same
-- as everywhere else (applied only where updated_at is strictly newer), so an
-- agent that has meanwhile reconnected elsewhere, or whose newer heartbeat is
-- already merged, keeps its row; a heartbeat staged before the disconnect
-- (older updated_at) cannot revive the agent when it is merged later. Returns
-- how many agents it disconnected.
--
-- There is no index on last_connected_replica_id (the merge's updates stay HOT),
-- so this reads the whole table: fine for a shutdown or a clean-up, not for a
-- hot path. Row locks are waited for at most lock_timeout (2 s), like the merge;
-- on TimeoutError just call it again.
--
-- This is also the example of an extension upgrade: pg_heartbeat 1.0 -> 1.1 is
-- this file (see extension/build.ts); the migration 1764000000008 applies it too.
SET LOCAL lock_timeout = '10s';

CREATE FUNCTION heartbeat.disconnect_replica(
    replica_id      uuid,
    disconnected_at timestamptz,
    updated_at      timestamptz
) RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $disconnect_replica$
DECLARE
    n bigint;
BEGIN
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_replica: replica_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    PERFORM heartbeat.reject_future(GREATEST($2, $3), 'heartbeat.disconnect_replica');

    UPDATE public.workspace_agents AS wa
       SET disconnected_at = $2,
           updated_at      = $3
     WHERE wa.last_connected_replica_id = $1
       AND wa.last_connected_at IS NOT NULL
       AND (wa.disconnected_at IS NULL OR wa.disconnected_at < wa.last_connected_at)
       AND wa.updated_at < $3;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$disconnect_replica$;

REVOKE ALL ON FUNCTION heartbeat.disconnect_replica(uuid, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION heartbeat.disconnect_replica(uuid, timestamptz, timestamptz) TO heartbeat_writer;
