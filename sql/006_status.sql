-- pg-heartbeat 006: heartbeat.status (is the merge keeping up?) and
-- heartbeat.agent_status() (each agent's connection status).
--
-- heartbeat.status is one row:
--   staged_rows        rows waiting in staging for the next merge
--   oldest_staged_at   the oldest updated_at among them (the replica's clock)
--   merge_lag          now() - oldest_staged_at, never negative: how long the
--                      most-behind staged heartbeat has waited, counted from
--                      the moment the replica recorded it, so it includes the
--                      stager's flush delay as well as the wait for a merge.
--                      NULL when staging is empty (nothing is waiting).
--   last_merge_*       the facts of the last merge that ran (not one skipped
--                      because another was running), from heartbeat.merge_state:
--                      when it started, how long it took, what it counted.
--   since_last_merge   now() - last_merge_at: a growing value means no merger
--                      (client or pg_cron) is running.
--   cron_database      where pg_cron lives (cron.database_name), NULL without pg_cron
--   cron_job           the pg-heartbeat merge job of this database in cron.job
--                      when pg_cron lives here; NULL when it lives elsewhere
--                      (ask there, or run `pg-heartbeat status`, which does)
--   cron_scheduled     whether that job exists and is active; NULL = unknown
--                      (pg_cron in another database, or cron.job unreadable)
-- Everything is read on the database clock (now()).
--
-- Counting staging scans it; that is cheap because the merge keeps it a few
-- pages. Reading status takes no lock a merge or a COPY waits for.
SET LOCAL lock_timeout = '10s';

CREATE FUNCTION heartbeat.merge_status()
RETURNS TABLE (
    checked_at                  timestamptz,
    staged_rows                 bigint,
    oldest_staged_at            timestamptz,
    merge_lag                   interval,
    last_merge_at               timestamptz,
    last_merge_duration         interval,
    since_last_merge            interval,
    last_merge_rows_consumed    bigint,
    last_merge_agents_updated   bigint,
    last_merge_skipped_stale    bigint,
    last_merge_skipped_unknown  bigint,
    last_merge_skipped_invalid  bigint,
    last_merge_deferred_locked  bigint,
    merges_total                bigint,
    cron_database               text,
    cron_job                    text,
    cron_schedule               text,
    cron_scheduled              boolean
)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $status$
#variable_conflict use_column
BEGIN
    checked_at := pg_catalog.now();
    SELECT count(*), min(s.updated_at)
      INTO staged_rows, oldest_staged_at
      FROM heartbeat.agent_connection_staging s;
    IF oldest_staged_at IS NOT NULL THEN
        merge_lag := GREATEST(checked_at - oldest_staged_at, interval '0');
    END IF;

    SELECT ms.last_merge_at, ms.last_duration, checked_at - ms.last_merge_at, ms.rows_consumed,
           ms.agents_updated, ms.skipped_stale, ms.skipped_unknown, ms.skipped_invalid,
           ms.deferred_locked, ms.merges_total
      INTO last_merge_at, last_merge_duration, since_last_merge, last_merge_rows_consumed,
           last_merge_agents_updated, last_merge_skipped_stale, last_merge_skipped_unknown,
           last_merge_skipped_invalid, last_merge_deferred_locked, merges_total
      FROM heartbeat.merge_state ms;
    merges_total := COALESCE(merges_total, 0);

    cron_database := NULLIF(pg_catalog.current_setting('cron.database_name', true), '');
    -- cron.job must be pg_cron's own table (a member of the extension): a schema
    -- "cron" planted by a role with CREATE on the database (cron.database_name is
    -- settable by anyone while pg_cron is not loaded) must never run here, as owner.
    IF cron_database = pg_catalog.current_database() AND EXISTS (
           SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
            WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
              AND d.objid = pg_catalog.to_regclass('cron.job')
              AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
              AND d.deptype = 'e' AND e.extname = 'pg_cron') THEN
        BEGIN
            -- dynamic: pg_cron may be installed after this migration ran
            EXECUTE 'SELECT j.jobname::text, j.schedule::text, j.active FROM cron.job j '
                    'WHERE j.jobname = $1 ORDER BY j.jobid LIMIT 1'
               INTO cron_job, cron_schedule, cron_scheduled
              USING 'pg-heartbeat-merge';
            cron_scheduled := COALESCE(cron_scheduled, false);
        EXCEPTION WHEN insufficient_privilege OR undefined_table OR undefined_column THEN
            cron_scheduled := NULL;
        END;
    END IF;
    RETURN NEXT;
END
$status$;

REVOKE ALL ON FUNCTION heartbeat.merge_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION heartbeat.merge_status() TO heartbeat_writer;

CREATE VIEW heartbeat.status AS SELECT * FROM heartbeat.merge_status();
REVOKE ALL ON heartbeat.status FROM PUBLIC;
GRANT SELECT ON heartbeat.status TO heartbeat_writer;

-- heartbeat.agent_status(): each agent's connection status by the reference
-- system's rules, evaluated on the database clock (now()):
--   never connected (first_connected_at IS NULL):
--       'timeout'    when connection_timeout_seconds > 0 and more than that
--                    has passed since created_at,
--       'connecting' otherwise;
--   disconnected_at >= last_connected_at (or no last_connected_at): 'disconnected';
--   last_connected_at older than inactive_timeout:                 'disconnected';
--   otherwise:                                                     'connected'.
-- For an agent to stay 'connected' its heartbeats must reach workspace_agents
-- within inactive_timeout, so the deployment must keep
--   flush interval + heartbeat interval + merge interval < inactive timeout
-- (defaults: 2 s + 15 s + 5 s = 22 s < 30 s). Pass agent_ids to look at a few
-- agents without reading the whole table.
CREATE FUNCTION heartbeat.agent_status(
    inactive_timeout interval DEFAULT interval '30 seconds',
    agent_ids        uuid[]   DEFAULT NULL
)
RETURNS TABLE (
    agent_id                    uuid,
    status                      text,
    first_connected_at          timestamptz,
    last_connected_at           timestamptz,
    disconnected_at             timestamptz,
    last_connected_replica_id   uuid,
    updated_at                  timestamptz
)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $agent_status$
BEGIN
    IF $1 IS NULL OR $1 <= interval '0' THEN
        RAISE EXCEPTION 'heartbeat.agent_status: inactive_timeout must be a positive interval, not %',
            COALESCE($1::text, 'NULL')
            USING ERRCODE = '22023';  -- invalid_parameter_value
    END IF;
    RETURN QUERY
    SELECT wa.id,
           CASE
               WHEN wa.first_connected_at IS NULL THEN
                   CASE WHEN wa.connection_timeout_seconds > 0
                             AND pg_catalog.now() - wa.created_at
                                 > wa.connection_timeout_seconds * interval '1 second'
                        THEN 'timeout' ELSE 'connecting' END
               WHEN wa.last_connected_at IS NULL OR wa.disconnected_at >= wa.last_connected_at
                   THEN 'disconnected'
               WHEN pg_catalog.now() - wa.last_connected_at > $1 THEN 'disconnected'
               ELSE 'connected'
           END,
           wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
           wa.last_connected_replica_id, wa.updated_at
      FROM public.workspace_agents wa
     WHERE $2 IS NULL OR wa.id = ANY ($2);
END
$agent_status$;

REVOKE ALL ON FUNCTION heartbeat.agent_status(interval, uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION heartbeat.agent_status(interval, uuid[]) TO heartbeat_writer;
