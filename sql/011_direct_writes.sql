-- pg-heartbeat 011: the direct writes, hardened.
--
-- heartbeat.disconnect_agent() and heartbeat.disconnect_replica() keep their
-- signatures and rules (sql/005, sql/008), and now:
--   * validate every timestamp with heartbeat.valid_time() (finite, not before
--     1970, not beyond heartbeat.clock_horizon()): anything else raises 22008
--     and changes nothing (a stale disconnect could set first_connected_at to
--     -infinity before);
--   * wait at most lock_timeout (2 s) for a row lock, then raise 55P03 (the
--     client's TimeoutError): never blocked for good by a transaction that holds
--     a row (or a merge held open by someone);
--   * disconnect_replica locks its rows in id order and retries a deadlock (with
--     a merge, which never waits for it either) or a lock timeout (up to 5 attempts,
--     each waiting at most lock_timeout), and leaves alone an agent whose
--     newer connection through another replica is already staged but not merged
--     yet: a reconnect elsewhere is never undone.
SET LOCAL lock_timeout = '10s';

-- Raises 22008 unless every timestamp is valid (the merge's definition).
CREATE FUNCTION heartbeat.check_times(caller text, VARIADIC times timestamptz[])
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $check$
DECLARE
    horizon timestamptz := heartbeat.clock_horizon();
    t       timestamptz;
BEGIN
    FOREACH t IN ARRAY times LOOP
        IF NOT heartbeat.valid_time(t, horizon) THEN
            RAISE EXCEPTION '%: % %', caller, t,
                CASE WHEN NOT pg_catalog.isfinite(t) THEN 'is not a finite time'
                     WHEN t > horizon THEN 'is too far ahead of the database clock (beyond heartbeat.clock_horizon(), ' || horizon || ')'
                     ELSE 'is before 1970' END
                USING ERRCODE = '22008',  -- datetime_field_overflow
                      HINT = 'Timestamps must be real instants; one far ahead means a replica clock is wrong.';
        END IF;
    END LOOP;
END
$check$;
REVOKE ALL ON FUNCTION heartbeat.check_times(text, timestamptz[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION heartbeat.disconnect_agent(
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
SET lock_timeout = '2s'
AS $disconnect$
BEGIN
    PERFORM heartbeat.assert_definer();
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_agent: agent_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    PERFORM heartbeat.check_times('heartbeat.disconnect_agent', $2, $3, $5, $6);

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
AS $disconnect_replica$
DECLARE
    n bigint;
BEGIN
    PERFORM heartbeat.assert_definer();
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_replica: replica_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    PERFORM heartbeat.check_times('heartbeat.disconnect_replica', $2, $3);

    FOR attempt IN 1 .. 5 LOOP
        BEGIN
            WITH victims AS MATERIALIZED (
                SELECT wa.id
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
                 ORDER BY wa.id
                   FOR NO KEY UPDATE OF wa
            )
            UPDATE public.workspace_agents AS wa
               SET disconnected_at = $2,
                   updated_at      = $3
              FROM victims v
             WHERE wa.id = v.id
               -- re-checked on the row as locked: it may have changed meanwhile
               AND wa.last_connected_replica_id = $1
               AND (wa.disconnected_at IS NULL OR wa.disconnected_at < wa.last_connected_at)
               AND wa.updated_at < $3;
            GET DIAGNOSTICS n = ROW_COUNT;
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
