-- pg-heartbeat 012: heartbeat.status over the parts, dead letters and the merge
-- locks; heartbeat.part_status(); agent_status() that no row can break.
--
-- heartbeat.status (one row; the columns of sql/006, then new ones):
--   staged_rows, oldest_staged_at, merge_lag   over every part; the oldest
--                      staged time counts only valid times (one hostile
--                      '-infinity' row cannot make the lag infinite)
--   last_merge_*       the last merge of every part, taken together: the
--                      EARLIEST last_merge_at (the part merged longest ago,
--                      so since_last_merge grows if any part stops being
--                      merged), the longest duration, the sum of the counts;
--                      NULL until every part has been merged since the
--                      server started
--   merges_total       part merges since the server started
--   last_merge_dead_lettered, dead_letters, last_dead_letter_at
--                      snapshots the merge could not apply (constraint,
--                      trigger of the user's table): see heartbeat.dead_letters
--   staging_parts      how many parts staging has
--   merge_lock_holder_pid, merge_lock_busy_since
--                      a merge lock that merges have found taken since then,
--                      and the backend holding it: a merge held open in
--                      someone's transaction (BEGIN; merge; ...) shows here
--   staging_epoch_began_at
--                      when staging was last found reset (crash recovery,
--                      promotion): stagers resend after it
-- heartbeat.part_status(): the same per part.
--
-- Both run with the caller's rights: heartbeat_writer and heartbeat_reader may
-- read pg-heartbeat's own tables (never write them).
SET LOCAL lock_timeout = '10s';

DROP VIEW heartbeat.status;
DROP FUNCTION heartbeat.merge_status();

CREATE FUNCTION heartbeat.part_status()
RETURNS TABLE (
    part                        integer,
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
    last_merge_dead_lettered    bigint,
    merges_total                bigint,
    lock_holder_pid             integer,
    lock_busy_since             timestamptz
)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $part_status$
    WITH now AS (
        SELECT pg_catalog.now() AS t, heartbeat.clock_horizon() AS horizon
    ), staged AS (
        SELECT s.tableoid, pg_catalog.count(*) AS n,
               pg_catalog.min(s.updated_at) FILTER (WHERE heartbeat.valid_time(s.updated_at, now.horizon)) AS oldest
          FROM heartbeat.agent_connection_staging s, now
         GROUP BY s.tableoid
    ), locks AS (
        SELECT l.objid::integer AS part, pg_catalog.min(l.pid) AS pid
          FROM pg_catalog.pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                                   WHERE d.datname = pg_catalog.current_database())
           AND l.classid = 1751474803 AND l.objsubid = 2
         GROUP BY l.objid
    )
    SELECT p.part, COALESCE(st.n, 0), st.oldest,
           GREATEST((SELECT t FROM now) - st.oldest, interval '0'),
           ms.last_merge_at, ms.last_duration, (SELECT t FROM now) - ms.last_merge_at,
           ms.rows_consumed, ms.agents_updated, ms.skipped_stale, ms.skipped_unknown,
           ms.skipped_invalid, ms.deferred_locked, ms.dead_lettered, COALESCE(ms.merges_total, 0),
           lk.pid,
           -- merges found the lock taken, by this holder, since first_skip_at
           CASE WHEN lk.pid IS NOT NULL AND sk.holder_pid = lk.pid
                     AND (ms.last_merge_at IS NULL
                          OR sk.first_skip_at > ms.last_merge_at + ms.last_duration)
                THEN sk.first_skip_at END
      FROM heartbeat.staging_parts() p
      LEFT JOIN staged st ON st.tableoid = p.relid::oid
      LEFT JOIN heartbeat.merge_state ms ON ms.part = p.part
      LEFT JOIN heartbeat.merge_skips sk ON sk.part = p.part
      LEFT JOIN locks lk ON lk.part = p.part
     ORDER BY p.part
$part_status$;
REVOKE ALL ON FUNCTION heartbeat.part_status() FROM PUBLIC;

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
    cron_scheduled              boolean,
    last_merge_dead_lettered    bigint,
    dead_letters                bigint,
    last_dead_letter_at         timestamptz,
    staging_parts               integer,
    merge_lock_holder_pid       integer,
    merge_lock_busy_since       timestamptz,
    staging_epoch_began_at      timestamptz
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $status$
#variable_conflict use_column
DECLARE
    all_merged boolean;
BEGIN
    checked_at := pg_catalog.now();
    SELECT pg_catalog.sum(ps.staged_rows)::bigint, pg_catalog.min(ps.oldest_staged_at), pg_catalog.count(*)::integer,
           pg_catalog.bool_and(ps.last_merge_at IS NOT NULL), pg_catalog.min(ps.last_merge_at),
           pg_catalog.max(ps.last_merge_duration), pg_catalog.sum(ps.last_merge_rows_consumed)::bigint,
           pg_catalog.sum(ps.last_merge_agents_updated)::bigint, pg_catalog.sum(ps.last_merge_skipped_stale)::bigint,
           pg_catalog.sum(ps.last_merge_skipped_unknown)::bigint, pg_catalog.sum(ps.last_merge_skipped_invalid)::bigint,
           pg_catalog.sum(ps.last_merge_deferred_locked)::bigint, pg_catalog.sum(ps.last_merge_dead_lettered)::bigint,
           pg_catalog.sum(ps.merges_total)::bigint,
           (pg_catalog.array_agg(ps.lock_holder_pid ORDER BY ps.lock_busy_since) FILTER (WHERE ps.lock_busy_since IS NOT NULL))[1],
           pg_catalog.min(ps.lock_busy_since)
      INTO staged_rows, oldest_staged_at, staging_parts, all_merged, last_merge_at, last_merge_duration,
           last_merge_rows_consumed, last_merge_agents_updated, last_merge_skipped_stale,
           last_merge_skipped_unknown, last_merge_skipped_invalid, last_merge_deferred_locked,
           last_merge_dead_lettered, merges_total, merge_lock_holder_pid, merge_lock_busy_since
      FROM heartbeat.part_status() ps;
    staged_rows := COALESCE(staged_rows, 0);
    merges_total := COALESCE(merges_total, 0);
    IF oldest_staged_at IS NOT NULL THEN
        merge_lag := GREATEST(checked_at - oldest_staged_at, interval '0');
    END IF;
    IF NOT COALESCE(all_merged, false) THEN
        -- some part has never been merged since the server started: no "last merge" yet
        last_merge_at := NULL; last_merge_duration := NULL; last_merge_rows_consumed := NULL;
        last_merge_agents_updated := NULL; last_merge_skipped_stale := NULL; last_merge_skipped_unknown := NULL;
        last_merge_skipped_invalid := NULL; last_merge_deferred_locked := NULL; last_merge_dead_lettered := NULL;
    END IF;
    since_last_merge := checked_at - last_merge_at;
    SELECT pg_catalog.count(*), pg_catalog.max(d.failed_at) INTO dead_letters, last_dead_letter_at FROM heartbeat.dead_letters d;
    SELECT e.began_at INTO staging_epoch_began_at FROM heartbeat.staging_epoch e;

    cron_database := NULLIF(pg_catalog.current_setting('cron.database_name', true), '');
    -- cron.job must be pg_cron's own table (a member of the extension): a schema
    -- "cron" planted by a role with CREATE on the database must never be read here.
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

CREATE VIEW heartbeat.status AS SELECT * FROM heartbeat.merge_status();
REVOKE ALL ON heartbeat.status FROM PUBLIC;

-- agent_status(): comparisons instead of subtractions, so an 'infinity' or
-- '-infinity' already in the table (or a year-294276 value from before 012)
-- gives a status for that agent instead of an error for every agent; a
-- last_connected_at beyond heartbeat.clock_horizon() does not count as connected.
CREATE OR REPLACE FUNCTION heartbeat.agent_status(
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
    PERFORM heartbeat.assert_definer();
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
                             AND wa.created_at < pg_catalog.now()
                                 - wa.connection_timeout_seconds * interval '1 second'
                        THEN 'timeout' ELSE 'connecting' END
               WHEN wa.last_connected_at IS NULL OR wa.disconnected_at >= wa.last_connected_at
                   THEN 'disconnected'
               WHEN wa.last_connected_at < pg_catalog.now() - $1
                   THEN 'disconnected'
               -- a heartbeat from the future is no evidence of life (written before 1.2, or around pg-heartbeat)
               WHEN wa.last_connected_at > heartbeat.clock_horizon()
                   THEN 'disconnected'
               ELSE 'connected'
           END,
           wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
           wa.last_connected_replica_id, wa.updated_at
      FROM public.workspace_agents wa
     WHERE $2 IS NULL OR wa.id = ANY ($2);
END
$agent_status$;
