-- pg-heartbeat 007: running the merge inside the database with pg_cron.
--
--   SELECT * FROM heartbeat.schedule_merge();          -- every 5 seconds
--   SELECT * FROM heartbeat.schedule_merge('10 seconds');
--   SELECT heartbeat.unschedule_merge();
-- or `pg-heartbeat schedule [--every '5 seconds']` / `pg-heartbeat unschedule`.
--
-- pg_cron needs, in postgresql.conf (then a restart, then CREATE EXTENSION
-- pg_cron in that database):
--   shared_preload_libraries = 'pg_cron'
--   cron.database_name = 'the database pg_cron lives in'
--   cron.use_background_workers = on     -- recommended for pg_cron 1.4
--
-- pg_cron 1.5 and newer accept a seconds schedule ('5 seconds'): the job runs
-- one merge each time. Older pg_cron (Debian bookworm ships 1.4.2) accepts only
-- minutes, so the job runs once a minute and CALLs heartbeat.merge_loop(),
-- which merges every `every`, COMMITs between merges and returns before its
-- minute is over. Either way the job is named 'pg-heartbeat-merge' (plus
-- '-<database>' when pg_cron lives in another database and the job runs there
-- with cron.schedule_in_database), so scheduling twice updates the one job.
--
-- pg_cron's schema may not exist when this migration runs (or ever): every
-- cron.* reference is dynamic (EXECUTE), checked with to_regnamespace first.
-- schedule_merge()/unschedule_merge() run with the caller's rights (pg_cron
-- records the caller as the job's user, and the job runs as that user), so
-- EXECUTE is revoked from PUBLIC: the owner (the role that ran the migrations)
-- and superusers may call them; GRANT EXECUTE to an operator role if needed.
SET LOCAL lock_timeout = '10s';

-- The loop the once-a-minute job CALLs; also what a seconds job CALLs (with
-- run_for = 0: one merge). A procedure that COMMITs can be neither SECURITY
-- DEFINER nor carry SET search_path, so every name and operator below is
-- schema-qualified. It runs as the job's user, who needs EXECUTE on
-- heartbeat.merge_agent_connections() (heartbeat_writer has it).
CREATE PROCEDURE heartbeat.merge_loop(
    every   pg_catalog.interval DEFAULT pg_catalog.interval '5 seconds',
    run_for pg_catalog.interval DEFAULT pg_catalog.interval '55 seconds'
)
LANGUAGE plpgsql
AS $loop$
DECLARE
    started pg_catalog.timestamptz;
    merges  pg_catalog.int4;
BEGIN
    IF every IS NULL OR every OPERATOR(pg_catalog.<=) pg_catalog.interval '0'
       OR run_for IS NULL OR run_for OPERATOR(pg_catalog.<) pg_catalog.interval '0' THEN
        RAISE EXCEPTION 'heartbeat.merge_loop: every must be positive and run_for not negative'
            USING ERRCODE = '22023';
    END IF;
    -- The merge refuses anything but READ COMMITTED; make every transaction of
    -- this session (the job's own) READ COMMITTED whatever the defaults are.
    PERFORM pg_catalog.set_config('default_transaction_isolation', 'read committed', false);
    started := pg_catalog.clock_timestamp();
    -- merges at started + 0, every, 2 * every, ... up to started + run_for.
    -- (OPERATOR() forms all share one precedence, left to right: parenthesize.)
    merges := pg_catalog.floor(pg_catalog.date_part('epoch', run_for)
                               OPERATOR(pg_catalog./) pg_catalog.date_part('epoch', every))::pg_catalog.int4
              OPERATOR(pg_catalog.+) 1;
    COMMIT;
    FOR i IN 0 .. merges OPERATOR(pg_catalog.-) 1 LOOP
        IF i OPERATOR(pg_catalog.>) 0 THEN
            -- a slow merge made us late: stop rather than run past our slot
            EXIT WHEN pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>) (started OPERATOR(pg_catalog.+) run_for);
            PERFORM pg_catalog.pg_sleep(pg_catalog.date_part('epoch',
                (started OPERATOR(pg_catalog.+) (every OPERATOR(pg_catalog.*) i::pg_catalog.float8))
                OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp()));
        END IF;
        BEGIN
            PERFORM heartbeat.merge_agent_connections();
        EXCEPTION WHEN OTHERS THEN
            -- logged by the server; the next iteration (or the next job run) retries
            RAISE WARNING 'pg-heartbeat merge failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
        END;
        COMMIT;
    END LOOP;
END
$loop$;

REVOKE ALL ON PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE heartbeat.merge_loop(pg_catalog.interval, pg_catalog.interval) TO heartbeat_writer;

-- What heartbeat.schedule_merge() would schedule, and where: the job's name,
-- schedule and command, the database the job must run in (this one) and the
-- database pg_cron lives in. Raises the "pg_cron is not loaded" error naming
-- the postgresql.conf lines when pg_cron is missing.
CREATE FUNCTION heartbeat.merge_job(every interval DEFAULT interval '5 seconds')
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
        command := pg_catalog.format('CALL heartbeat.merge_loop(every => %L, run_for => %L)',
                                     every, interval '0');
    ELSE
        schedule := '* * * * *';
        command := pg_catalog.format('CALL heartbeat.merge_loop(every => %L, run_for => %L)',
                                     every, interval '60 seconds' - every);
    END IF;
    RETURN NEXT;
END
$job$;

REVOKE ALL ON FUNCTION heartbeat.merge_job(interval) FROM PUBLIC;

-- Schedules (or reschedules) the merge job in pg_cron; returns the job.
CREATE FUNCTION heartbeat.schedule_merge(every interval DEFAULT interval '5 seconds')
RETURNS TABLE (job_id bigint, job_name text, schedule text, command text, database text)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $schedule$
DECLARE
    j record;
BEGIN
    SELECT * INTO j FROM heartbeat.merge_job(every);
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
    job_name := j.job_name; schedule := j.schedule; command := j.command; database := j.database;
    RETURN NEXT;
END
$schedule$;

REVOKE ALL ON FUNCTION heartbeat.schedule_merge(interval) FROM PUBLIC;

-- Removes the merge job; returns whether there was one.
CREATE FUNCTION heartbeat.unschedule_merge()
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
    IF pg_catalog.to_regnamespace('cron') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT count(*) FILTER (WHERE cron.unschedule(j.jobid)) FROM cron.job j WHERE j.jobname = $1'
       INTO removed USING j.job_name;
    RETURN removed > 0;
END
$unschedule$;

REVOKE ALL ON FUNCTION heartbeat.unschedule_merge() FROM PUBLIC;
