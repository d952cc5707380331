-- pg-heartbeat 005: heartbeat.disconnect_agent(), the direct write for disconnects.
--
-- Disconnects bypass staging so they are visible at once. The update is guarded
-- exactly like the merge (applied only when strictly newer), so a heartbeat
-- staged before the disconnect (older updated_at) can never make the agent look
-- connected again when it is merged later. Returns whether the row changed:
-- false for an unknown agent or a disconnect older than (or as old as) the row.
--
-- first_connected_at and last_connected_at are optional: the agent's connection
-- facts as the disconnecting replica knows them (the client passes those of a
-- heartbeat it had not written yet). first_connected_at keeps the earliest value
-- ever seen (even when the disconnect itself is too old to apply);
-- last_connected_at replaces the stored one when given. So an agent
-- that connects and disconnects between two merges still shows 'disconnected'
-- rather than 'connecting'. NULL (the default) keeps the stored values.
SET LOCAL lock_timeout = '10s';

CREATE FUNCTION heartbeat.disconnect_agent(
    agent_id        uuid,
    disconnected_at timestamptz,
    updated_at      timestamptz,
    replica_id      uuid DEFAULT NULL,
    first_connected_at timestamptz DEFAULT NULL,
    last_connected_at  timestamptz DEFAULT NULL
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
    PERFORM heartbeat.reject_future(GREATEST($2, $3, $5, $6), 'heartbeat.disconnect_agent');

    UPDATE public.workspace_agents AS wa
       SET disconnected_at           = $2,
           updated_at                = $3,
           last_connected_replica_id = COALESCE($4, wa.last_connected_replica_id),
           first_connected_at        = LEAST(wa.first_connected_at, $5),
           last_connected_at         = COALESCE($6, wa.last_connected_at)
     WHERE wa.id = $1
       AND wa.updated_at < $3;
    IF FOUND THEN
        RETURN true;
    END IF;
    -- too old to apply, but it may still know an earlier first connection
    IF $5 IS NOT NULL THEN
        UPDATE public.workspace_agents AS wa
           SET first_connected_at = $5
         WHERE wa.id = $1
           AND $5 < COALESCE(wa.first_connected_at, 'infinity');
    END IF;
    RETURN false;
END
$disconnect$;

REVOKE ALL ON FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz) TO heartbeat_writer;
