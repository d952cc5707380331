-- pg-heartbeat 019: pg_cron merges the parts of staging in parallel lanes.
--
-- One pg_cron job runs one loop in one backend, so with a single job the parts
-- are merged one after another and one core caps the fleet, as it did before
-- staging had parts. heartbeat.schedule_merge(every, lanes) schedules `lanes`
-- jobs instead, each running heartbeat.merge_loop(every, lane => k, lanes => L):
--
--   lane 0       merges every part in one call, on the grid, as the single job
--                always did (job 'pg-heartbeat-merge', the same name as before);
--   lane k >= 1  merges the parts whose number is k modulo L, each in its own
--                calls (heartbeat.merge_staging_part), but only when that part
--                needs it: its last merge left rows behind (a backlog), or it
--                was this lane's and took at least a tenth of the interval (a
--                large fleet: the lane keeps the part), or nobody merged it for
--                two intervals (lane 0 is not running). Otherwise the lane sleeps
--                to the next grid instant: a small fleet pays one merge call per
--                interval, whatever the number of lanes.
--
-- Parts have their own advisory lock: a part a lane is merging is skipped by
-- lane 0's call at once, and the other way round, so lanes never wait for each
-- other and never merge the same rows. Each lane holds one pg_cron background
-- worker (pg_cron 1.4: for the whole minute; 1.5+: for each run) and one
-- connection; lanes beyond the number of parts have nothing to merge.
--
--   SELECT * FROM heartbeat.schedule_merge('5 seconds', lanes => 4);
--   SELECT heartbeat.unschedule_merge();     -- removes every lane's job
SET LOCAL lock_timeout = '10s';

DROP PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval);

-- A procedure that COMMITs can be neither SECURITY DEFINER nor carry SET
-- search_path, so every name and operator below is schema-qualified. It runs as
-- the job's user, who needs EXECUTE on the merge functions (heartbeat_writer).
--   every    the grid's step, 1 to 59 whole seconds
--   run_for  NULL: merge until the end of the current minute (the pg_cron 1.4
--            job); '0': one grid instant (a pg_cron >= 1.5 seconds job);
--            otherwise merge on the grid for that long
--   lane     this loop's lane, 0 to lanes - 1
--   lanes    how many loops share the parts (1: this loop merges them all)
CREATE PROCEDURE heartbeat.merge_loop(
    every   pg_catalog.interval DEFAULT pg_catalog.interval '5 seconds',
    run_for pg_catalog.interval DEFAULT NULL,
    lane    pg_catalog.int4     DEFAULT 0,
    lanes   pg_catalog.int4     DEFAULT 1
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
    me          pg_catalog.text;     -- merge_state.merged_by of this loop's merges
    todo        pg_catalog.int4[];   -- the parts to merge at this instant (lane 0: {NULL}, every part in one call)
    part_no     pg_catalog.int4;
    r           record;
BEGIN
    IF every IS NULL OR every OPERATOR(pg_catalog.<) pg_catalog.interval '1 second'
       OR every OPERATOR(pg_catalog.>) pg_catalog.interval '59 seconds'
       OR run_for OPERATOR(pg_catalog.<) pg_catalog.interval '0' THEN
        RAISE EXCEPTION 'heartbeat.merge_loop: every must be from 1 to 59 seconds and run_for not negative'
            USING ERRCODE = '22023';
    END IF;
    IF lanes IS NULL OR lanes OPERATOR(pg_catalog.<) 1 OR lanes OPERATOR(pg_catalog.>) 64
       OR lane IS NULL OR lane OPERATOR(pg_catalog.<) 0 OR lane OPERATOR(pg_catalog.>=) lanes THEN
        RAISE EXCEPTION 'heartbeat.merge_loop: lanes must be from 1 to 64 and lane from 0 to lanes - 1, not lane % of %',
            COALESCE(lane::pg_catalog.text, 'NULL'), COALESCE(lanes::pg_catalog.text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- the merge refuses anything but READ COMMITTED: make every transaction of
    -- this session (the job's own) READ COMMITTED whatever the defaults are
    PERFORM pg_catalog.set_config('default_transaction_isolation', 'read committed', false);
    me := CASE WHEN lanes OPERATOR(pg_catalog.=) 1 THEN 'pg_cron'
               ELSE pg_catalog.format('pg_cron lane %s of %s', lane, lanes) END;
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
    -- (the other lanes look at once: they merge only what needs it)
    slot := pg_catalog.floor(started OPERATOR(pg_catalog./) step) OPERATOR(pg_catalog.*) step;
    SELECT pg_catalog.date_part('epoch', pg_catalog.min(ms.last_merge_at)) INTO last_merge FROM heartbeat.merge_state ms;
    merge_now := run_for OPERATOR(pg_catalog.=) pg_catalog.interval '0' OR lane OPERATOR(pg_catalog.>) 0
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
        IF lane OPERATOR(pg_catalog.=) 0 THEN
            todo := ARRAY[NULL]::pg_catalog.int4[];   -- every part in one call
        ELSE
            -- this lane's parts that need it (see the head of sql/019)
            SELECT pg_catalog.array_agg(p.part ORDER BY p.part) INTO todo
              FROM heartbeat.staging_parts() p
              LEFT JOIN heartbeat.merge_state ms ON ms.part OPERATOR(pg_catalog.=) p.part
             WHERE p.part OPERATOR(pg_catalog.%) lanes OPERATOR(pg_catalog.=) lane
               AND (ms.part IS NULL
                    OR ms.drained_through IS NULL
                    OR ms.drained_through OPERATOR(pg_catalog.<) ms.last_merge_at
                    OR (ms.merged_by OPERATOR(pg_catalog.=) me
                        AND ms.last_duration OPERATOR(pg_catalog.>=) (every OPERATOR(pg_catalog./) 10::pg_catalog.float8))
                    -- (OPERATOR() forms all share one precedence, left to right: parenthesize)
                    OR ms.last_merge_at OPERATOR(pg_catalog.<)
                       (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) (every OPERATOR(pg_catalog.*) 2::pg_catalog.float8)));
            COMMIT;
        END IF;
        -- each: merge again while rows are left (NULL: every part in one call), committing in between
        FOREACH part_no IN ARRAY COALESCE(todo, '{}') LOOP
            LOOP
                BEGIN
                    IF part_no IS NULL THEN
                        SELECT * INTO r FROM heartbeat.merge_agent_connections(merger => me);
                    ELSE
                        SELECT * INTO r FROM heartbeat.merge_staging_part(part => part_no, merger => me);
                    END IF;
                EXCEPTION WHEN OTHERS THEN
                    -- logged by the server; the next grid instant (or the next run) retries
                    RAISE WARNING 'pg-heartbeat merge (%) failed: % (SQLSTATE %)',
                        COALESCE('part ' OPERATOR(pg_catalog.||) part_no::pg_catalog.text, 'every part'), SQLERRM, SQLSTATE;
                    r := NULL;
                END;
                COMMIT;
                EXIT WHEN r IS NULL OR NOT r.more
                     OR pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.>=) drain_until;
            END LOOP;
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
REVOKE ALL ON PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval, pg_catalog.int4, pg_catalog.int4) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval, pg_catalog.int4, pg_catalog.int4) TO heartbeat_writer;

-- What heartbeat.schedule_merge(every, lanes) would schedule: one row per lane,
-- lane 0 first. Lane 0's job has the name (and, with one lane, the command) of
-- the single job of earlier versions; lane k's is that name plus '-lane-k'.
DROP FUNCTION heartbeat.merge_job(interval);
CREATE FUNCTION heartbeat.merge_job(every interval DEFAULT interval '5 seconds', lanes integer DEFAULT 1)
RETURNS TABLE (
    job_name         text,
    schedule         text,
    command          text,
    database         text,
    cron_database    text,
    pg_cron_version  text,
    seconds_schedule boolean,
    lane             integer
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $job$
DECLARE
    secs    double precision;
    parts   text[];
    base    text;
BEGIN
    IF every IS NULL OR every < interval '1 second' OR every > interval '59 seconds'
       OR pg_catalog.date_part('epoch', every) <> pg_catalog.trunc(pg_catalog.date_part('epoch', every)) THEN
        RAISE EXCEPTION 'heartbeat.schedule_merge: every must be a whole number of seconds from 1 to 59, not %',
            COALESCE(every::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF lanes IS NULL OR lanes < 1 OR lanes > 64 THEN
        RAISE EXCEPTION 'heartbeat.schedule_merge: lanes must be from 1 to 64, not %', COALESCE(lanes::text, 'NULL')
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
    base := CASE WHEN cron_database = database THEN 'pg-heartbeat-merge'
                 ELSE 'pg-heartbeat-merge-' || database END;
    schedule := CASE WHEN seconds_schedule THEN secs::int || ' seconds' ELSE '* * * * *' END;
    FOR l IN 0 .. lanes - 1 LOOP
        lane := l;
        job_name := CASE WHEN l = 0 THEN base ELSE base || '-lane-' || l END;
        command := pg_catalog.format('CALL heartbeat.merge_loop(every => %L', every)
                   || CASE WHEN seconds_schedule THEN pg_catalog.format(', run_for => %L', interval '0') ELSE '' END
                   || CASE WHEN lanes > 1 THEN pg_catalog.format(', lane => %s, lanes => %s', l, lanes) ELSE '' END
                   || ')';
        RETURN NEXT;
    END LOOP;
END
$job$;
REVOKE ALL ON FUNCTION heartbeat.merge_job(interval, integer) FROM PUBLIC;

-- Schedules (or reschedules) the merge in pg_cron: one job per lane; lanes left
-- over from an earlier call with more lanes are unscheduled. Returns the jobs,
-- lane 0 first.
DROP FUNCTION heartbeat.schedule_merge(interval);
CREATE FUNCTION heartbeat.schedule_merge(every interval DEFAULT interval '5 seconds', lanes integer DEFAULT 1)
RETURNS TABLE (job_id bigint, job_name text, schedule text, command text, database text, lane integer)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $schedule$
DECLARE
    j       record;
    jobs    text[] := '{}';
    prefix  text;
BEGIN
    FOR j IN SELECT * FROM heartbeat.merge_job(every, lanes) LOOP
        IF j.cron_database <> j.database THEN
            RAISE EXCEPTION 'pg_cron lives in database % (cron.database_name), not in %: run pg-heartbeat schedule, or in % run: SELECT cron.schedule_in_database(%, %, %, %)',
                pg_catalog.quote_ident(j.cron_database), pg_catalog.quote_ident(j.database),
                pg_catalog.quote_ident(j.cron_database), pg_catalog.quote_literal(j.job_name),
                pg_catalog.quote_literal(j.schedule), pg_catalog.quote_literal(j.command),
                pg_catalog.quote_literal(j.database)
                USING ERRCODE = '55000';
        END IF;
        IF pg_catalog.to_regnamespace('cron') IS NULL THEN
            RAISE EXCEPTION 'pg_cron is loaded but the extension is missing in database %: run CREATE EXTENSION pg_cron',
                pg_catalog.quote_ident(j.database)
                USING ERRCODE = '55000';
        END IF;
        -- pg_cron upserts on (jobname, username): scheduling again updates the job
        EXECUTE 'SELECT cron.schedule($1, $2, $3)' INTO job_id USING j.job_name, j.schedule, j.command;
        job_name := j.job_name; schedule := j.schedule; command := j.command; database := j.database; lane := j.lane;
        jobs := jobs || j.job_name;
        RETURN NEXT;
    END LOOP;
    -- fewer lanes than before: the extra lanes' jobs go (their loops return at
    -- the end of their minute; they merge only parts that need it until then)
    prefix := jobs[1] || '-lane-';
    EXECUTE 'SELECT count(cron.unschedule(c.jobid)) FROM cron.job c '
            'WHERE pg_catalog.starts_with(c.jobname, $1) AND c.database = pg_catalog.current_database() '
            '  AND c.jobname <> ALL ($2)'
       USING prefix, jobs;
END
$schedule$;
REVOKE ALL ON FUNCTION heartbeat.schedule_merge(interval, integer) FROM PUBLIC;

-- Removes every lane's job and stops the loops that are running; returns whether there was a job.
CREATE OR REPLACE FUNCTION heartbeat.unschedule_merge()
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $unschedule$
DECLARE
    j       record;
    removed bigint;
    prefix  text;
BEGIN
    SELECT * INTO j FROM heartbeat.merge_job();
    IF j.cron_database <> j.database THEN
        RAISE EXCEPTION 'pg_cron lives in database % (cron.database_name), not in %: run pg-heartbeat unschedule, or in % run: SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = % OR jobname LIKE %',
            pg_catalog.quote_ident(j.cron_database), pg_catalog.quote_ident(j.database),
            pg_catalog.quote_ident(j.cron_database), pg_catalog.quote_literal(j.job_name),
            pg_catalog.quote_literal(j.job_name || '-lane-%')
            USING ERRCODE = '55000';
    END IF;
    PERFORM heartbeat.stop_merge_loops();
    IF pg_catalog.to_regnamespace('cron') IS NULL THEN
        RETURN false;
    END IF;
    prefix := j.job_name || '-lane-';
    EXECUTE 'SELECT count(cron.unschedule(c.jobid)) FROM cron.job c '
            'WHERE c.jobname = $1 OR (pg_catalog.starts_with(c.jobname, $2) AND c.database = pg_catalog.current_database())'
       INTO removed USING j.job_name, prefix;
    RETURN removed > 0;
END
$unschedule$;
