-- pg-heartbeat 013: the pg_cron loop keeps every gap within the interval.
--
-- pg_cron 1.4 runs a job at most once a minute, so the job CALLs
-- heartbeat.merge_loop(), which merges on a fixed grid of instants (the
-- multiples of `every` since the Unix epoch, on the database clock) until the
-- end of its minute, and returns before the next minute's run starts. The next
-- run continues on the same grid and first catches up an instant that fell
-- between the two runs. So the gap between two merges is `every` (plus the
-- start-up delay of pg_cron's next run, well under a second), for any interval
-- from 1 to 59 seconds — not only for those that divide 60. A merge that takes
-- longer than `every` is followed at once by the next. Each merge drains: it
-- merges again, committing in between, while rows are left (bounded merges).
--
-- heartbeat.unschedule_merge() also tells running loops to stop: they return
-- before their next merge, within one interval (heartbeat.cron_state.generation).
--
-- pg_cron 1.5 and newer take a seconds schedule ('5 seconds'): the job CALLs
-- merge_loop(every, run_for => '0'), one draining merge per run.
SET LOCAL lock_timeout = '10s';

CREATE TABLE heartbeat.cron_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation  bigint  NOT NULL DEFAULT 0    -- bumped to stop running loops
);
INSERT INTO heartbeat.cron_state DEFAULT VALUES;
REVOKE ALL ON heartbeat.cron_state FROM PUBLIC;
GRANT SELECT ON heartbeat.cron_state TO heartbeat_writer;

DROP PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval);

-- A procedure that COMMITs can be neither SECURITY DEFINER nor carry SET
-- search_path, so every name and operator below is schema-qualified. It runs as
-- the job's user, who needs EXECUTE on heartbeat.merge_agent_connections()
-- (heartbeat_writer has it).
--   every    the grid's step, 1 to 59 whole seconds
--   run_for  NULL: merge until the end of the current minute (the pg_cron 1.4
--            job); '0': one draining merge (a pg_cron >= 1.5 seconds job);
--            otherwise merge on the grid for that long
CREATE PROCEDURE heartbeat.merge_loop(
    every   pg_catalog.interval DEFAULT pg_catalog.interval '5 seconds',
    run_for pg_catalog.interval DEFAULT NULL
)
LANGUAGE plpgsql
AS $loop$
DECLARE
    step        pg_catalog.float8;
    deadline    pg_catalog.float8;   -- epoch seconds: no merge starts at or after it
    drain_until pg_catalog.float8;   -- a draining merge stops merging again at this time
    started     pg_catalog.float8;
    slot        pg_catalog.float8;   -- the grid instant of the merge to run next
    gen         pg_catalog.int8;
    last_merge  pg_catalog.float8;
    now_epoch   pg_catalog.float8;
    merge_now   boolean;
    r           record;
BEGIN
    IF every IS NULL OR every OPERATOR(pg_catalog.<) pg_catalog.interval '1 second'
       OR every OPERATOR(pg_catalog.>) pg_catalog.interval '59 seconds'
       OR run_for OPERATOR(pg_catalog.<) pg_catalog.interval '0' THEN
        RAISE EXCEPTION 'heartbeat.merge_loop: every must be from 1 to 59 seconds and run_for not negative'
            USING ERRCODE = '22023';
    END IF;
    -- the merge refuses anything but READ COMMITTED: make every transaction of
    -- this session (the job's own) READ COMMITTED whatever the defaults are
    PERFORM pg_catalog.set_config('default_transaction_isolation', 'read committed', false);
    step := pg_catalog.date_part('epoch', every);
    started := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp());
    deadline := CASE
        WHEN run_for IS NULL THEN pg_catalog.date_part('epoch',
                 pg_catalog.date_trunc('minute', pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.+) pg_catalog.interval '1 minute')
        ELSE started OPERATOR(pg_catalog.+) pg_catalog.date_part('epoch', run_for) END;
    -- one draining merge (run_for 0) may take up to one interval; in the loop, up to the end of the run
    drain_until := GREATEST(deadline, started OPERATOR(pg_catalog.+) step);
    SELECT s.generation INTO gen FROM heartbeat.cron_state s;
    -- the latest grid instant not after now: run it at once unless a merge started since
    slot := pg_catalog.floor(started OPERATOR(pg_catalog./) step) OPERATOR(pg_catalog.*) step;
    SELECT pg_catalog.date_part('epoch', pg_catalog.min(ms.last_merge_at)) INTO last_merge FROM heartbeat.merge_state ms;
    merge_now := run_for OPERATOR(pg_catalog.=) pg_catalog.interval '0'
                 OR last_merge IS NULL OR last_merge OPERATOR(pg_catalog.<) slot;
    IF NOT merge_now THEN
        slot := slot OPERATOR(pg_catalog.+) step;
    END IF;
    COMMIT;
    LOOP
        IF NOT merge_now THEN
            -- the next instant belongs to the next run (or is past run_for)
            EXIT WHEN slot OPERATOR(pg_catalog.>=) deadline;
            PERFORM pg_catalog.pg_sleep(GREATEST(0, slot OPERATOR(pg_catalog.-)
                                                    pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())));
        END IF;
        merge_now := false;
        -- unschedule_merge() since we started: stop
        EXIT WHEN (SELECT s.generation FROM heartbeat.cron_state s) IS DISTINCT FROM gen;
        -- one draining merge: again while rows are left, committing in between
        LOOP
            BEGIN
                SELECT * INTO r FROM heartbeat.merge_agent_connections();
            EXCEPTION WHEN OTHERS THEN
                -- logged by the server; the next grid instant (or the next run) retries
                RAISE WARNING 'pg-heartbeat merge failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
                r := NULL;
            END;
            COMMIT;
            EXIT WHEN r IS NULL OR NOT r.more
                 OR pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.>=) drain_until;
        END LOOP;
        EXIT WHEN run_for OPERATOR(pg_catalog.=) pg_catalog.interval '0';
        slot := slot OPERATOR(pg_catalog.+) step;
        -- the merge ran past the next instant(s): one merge at once, on the latest instant passed
        now_epoch := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp());
        IF slot OPERATOR(pg_catalog.<) now_epoch THEN
            slot := pg_catalog.floor(now_epoch OPERATOR(pg_catalog./) step) OPERATOR(pg_catalog.*) step;
        END IF;
    END LOOP;
END
$loop$;
REVOKE ALL ON PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval) TO heartbeat_writer;

-- What heartbeat.schedule_merge() would schedule (sql/007, with the new command).
CREATE OR REPLACE FUNCTION heartbeat.merge_job(every interval DEFAULT interval '5 seconds')
RETURNS TABLE (
    job_name         text,
    schedule         text,
    command          text,
    database         text,
    cron_database    text,
    pg_cron_version  text,
    seconds_schedule boolean
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $job$
DECLARE
    secs    double precision;
    parts   text[];
BEGIN
    IF every IS NULL OR every < interval '1 second' OR every > interval '59 seconds'
       OR pg_catalog.date_part('epoch', every) <> pg_catalog.trunc(pg_catalog.date_part('epoch', every)) THEN
        RAISE EXCEPTION 'heartbeat.schedule_merge: every must be a whole number of seconds from 1 to 59, not %',
            COALESCE(every::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    secs := pg_catalog.date_part('epoch', every);
    database := pg_catalog.current_database();
    cron_database := NULLIF(pg_catalog.current_setting('cron.database_name', true), '');
    SELECT e.default_version INTO pg_cron_version
      FROM pg_catalog.pg_available_extensions e WHERE e.name = 'pg_cron';
    IF cron_database IS NULL OR pg_cron_version IS NULL THEN
        RAISE EXCEPTION 'pg_cron is not loaded: add to postgresql.conf shared_preload_libraries = ''pg_cron'' and cron.database_name = ''%'' (with pg_cron 1.4 also cron.use_background_workers = on), restart PostgreSQL, then CREATE EXTENSION pg_cron in that database; or run the merge from the application with startMerger() / pg-heartbeat merger',
            database
            USING ERRCODE = '55000',  -- object_not_in_prerequisite_state
                  HINT = 'pg_cron is the Debian/Ubuntu package postgresql-<major>-cron.';
    END IF;
    -- '1.4-1' -> {1,4,1}; seconds schedules arrived in pg_cron 1.5
    parts := pg_catalog.regexp_split_to_array(pg_cron_version, '[.-]');
    seconds_schedule := (parts[1]::int, COALESCE(NULLIF(parts[2], '')::int, 0)) >= (1, 5);
    job_name := CASE WHEN cron_database = database THEN 'pg-heartbeat-merge'
                     ELSE 'pg-heartbeat-merge-' || database END;
    IF seconds_schedule THEN
        schedule := secs::int || ' seconds';
        command := pg_catalog.format('CALL heartbeat.merge_loop(every => %L, run_for => %L)', every, interval '0');
    ELSE
        schedule := '* * * * *';
        command := pg_catalog.format('CALL heartbeat.merge_loop(every => %L)', every);
    END IF;
    RETURN NEXT;
END
$job$;

-- Tells every running merge loop of this database to return before its next merge.
CREATE FUNCTION heartbeat.stop_merge_loops()
RETURNS bigint
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $stop$
    UPDATE heartbeat.cron_state SET generation = generation + 1 RETURNING generation
$stop$;
REVOKE ALL ON FUNCTION heartbeat.stop_merge_loops() FROM PUBLIC;

-- Removes the merge job and stops the loop that is running; returns whether there was a job.
CREATE OR REPLACE FUNCTION heartbeat.unschedule_merge()
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $unschedule$
DECLARE
    j       record;
    removed bigint;
BEGIN
    SELECT * INTO j FROM heartbeat.merge_job();
    IF j.cron_database <> j.database THEN
        RAISE EXCEPTION 'pg_cron lives in database % (cron.database_name), not in %: run pg-heartbeat unschedule, or in % run: SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = %',
            pg_catalog.quote_ident(j.cron_database), pg_catalog.quote_ident(j.database),
            pg_catalog.quote_ident(j.cron_database), pg_catalog.quote_literal(j.job_name)
            USING ERRCODE = '55000';
    END IF;
    PERFORM heartbeat.stop_merge_loops();
    IF pg_catalog.to_regnamespace('cron') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT count(*) FILTER (WHERE cron.unschedule(j.jobid)) FROM cron.job j WHERE j.jobname = $1'
       INTO removed USING j.job_name;
    RETURN removed > 0;
END
$unschedule$;

-- An existing job (pg_cron in this database) still has the command of sql/007,
-- whose loop stops `every` seconds before the minute ends: schedule it again
-- with the new command. (When pg_cron lives in another database, run
-- `pg-heartbeat schedule` again after upgrading.)
DO $reschedule$
DECLARE
    every text;
BEGIN
    IF pg_catalog.to_regclass('cron.job') IS NULL
       OR NULLIF(pg_catalog.current_setting('cron.database_name', true), '') IS DISTINCT FROM pg_catalog.current_database() THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT (regexp_match(j.command, $$every => ''([^'']+)''$$))[1] FROM cron.job j '
            'WHERE j.jobname = $1 AND j.command LIKE $2 ORDER BY j.jobid LIMIT 1'
       INTO every USING 'pg-heartbeat-merge', '%merge_loop%run_for%';
    IF every IS NOT NULL THEN
        PERFORM heartbeat.schedule_merge(every::interval);
        RAISE NOTICE 'pg-heartbeat: rescheduled the pg_cron merge job (every %) with the new loop', every;
    END IF;
EXCEPTION WHEN insufficient_privilege OR undefined_table OR undefined_function OR object_not_in_prerequisite_state THEN
    RAISE NOTICE 'pg-heartbeat: could not reschedule the pg_cron merge job (%): run pg-heartbeat schedule again', SQLERRM;
END
$reschedule$;
