-- pg-heartbeat 005: heartbeat.disconnect_agent(), the direct write for disconnects.
--
-- Disconnects bypass staging so they are visible at once. The update is guarded
-- exactly like the merge (applied only when strictly newer), so a heartbeat
-- staged before the disconnect (older updated_at) can never make the agent look
-- connected again when it is merged later. Returns whether the row changed:
-- false for an unknown agent or a disconnect older than (or as old as) the row.
SET LOCAL lock_timeout = '10s';

CREATE FUNCTION heartbeat.disconnect_agent(
    agent_id        uuid,
    disconnected_at timestamptz,
    updated_at      timestamptz,
    replica_id      uuid DEFAULT NULL
) RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $disconnect$
BEGIN
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_agent: agent_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    IF $3 > pg_catalog.statement_timestamp() + COALESCE(
            NULLIF(pg_catalog.current_setting('heartbeat.max_clock_skew', true), '')::interval,
            interval '5 minutes') THEN
        RAISE EXCEPTION 'heartbeat.disconnect_agent: updated_at % is too far ahead of the database clock', $3
            USING ERRCODE = '22008',  -- datetime_field_overflow
                  HINT = 'Check the clock of the replica, or raise heartbeat.max_clock_skew.';
    END IF;

    UPDATE public.workspace_agents AS wa
       SET disconnected_at           = $2,
           updated_at                = $3,
           last_connected_replica_id = COALESCE($4, wa.last_connected_replica_id)
     WHERE wa.id = $1
       AND wa.updated_at < $3;
    RETURN FOUND;
END
$disconnect$;

REVOKE ALL ON FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid) TO heartbeat_writer;
