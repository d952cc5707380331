-- pg-heartbeat 009: staging in hash parts, the staging epoch, dead letters, per-part merge state.
--
-- heartbeat.agent_connection_staging becomes a HASH-partitioned parent (on
-- agent_id) of N UNLOGGED parts, heartbeat.agent_connection_staging_p0 .. _p<N-1>.
-- Clients still COPY into the parent (PostgreSQL routes each row); every part is
-- merged on its own, with its own lock, and parts touch disjoint agents, so
-- several backends can merge at once. N is heartbeat.set_staging_parts(n)
-- (default 4; changed later with the same call, losing nothing).
--
-- heartbeat.settings: the knobs of the merge, one row, changed by the owner:
--   UPDATE heartbeat.settings SET max_rows_per_merge = 20000;
--
-- heartbeat.staging_epoch: one row, in an UNLOGGED table. PostgreSQL empties
-- every UNLOGGED table after crash recovery (a kill -9 of any backend is enough)
-- and a promoted standby starts with them empty; so when this row is gone, or has
-- changed, staging has been reset. Stagers read it (heartbeat.staging_epoch())
-- on every new connection and resend what they had COPYed and no merge has
-- consumed yet (see src/retained.ts).
--
-- heartbeat.dead_letters: staged snapshots that failed to apply (a constraint,
-- a trigger error on the user's table), with the error; the merge moves them
-- here instead of failing as a whole. LOGGED: it is the record of a data problem.
-- heartbeat.retry_dead_letters() puts them back into staging.
SET LOCAL lock_timeout = '10s';

CREATE TABLE heartbeat.settings (
    singleton               boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    -- staged rows one merge statement consumes at most (per call; a call over
    -- every part shares it between them). Bounds the statement's duration, so a
    -- backlog drains in chunks under any statement_timeout.
    max_rows_per_merge      integer  NOT NULL DEFAULT 50000 CHECK (max_rows_per_merge > 0),
    -- dead letters kept at most (the oldest go first)
    dead_letters_max        integer  NOT NULL DEFAULT 100000 CHECK (dead_letters_max > 0),
    -- how far ahead of the database clock a timestamp may be (heartbeat.clock_horizon())
    max_clock_skew          interval NOT NULL DEFAULT interval '5 minutes'
                                     CHECK (max_clock_skew > interval '0' AND max_clock_skew <= interval '1 day')
);
-- a bound set the earlier way (ALTER FUNCTION heartbeat.clock_horizon() SET heartbeat.max_clock_skew = ...) is kept
INSERT INTO heartbeat.settings (max_clock_skew)
SELECT COALESCE((SELECT pg_catalog.substring(c, '^heartbeat\.max_clock_skew=(.*)$')::interval
                   FROM pg_catalog.pg_proc p, pg_catalog.unnest(p.proconfig) AS c
                  WHERE p.oid = 'heartbeat.clock_horizon()'::regprocedure
                    AND c LIKE 'heartbeat.max\_clock\_skew=%'),
                interval '5 minutes');
REVOKE ALL ON heartbeat.settings FROM PUBLIC;

-- The bound on timestamps: the statement's time plus heartbeat.settings.max_clock_skew,
-- which only the owner may change (UPDATE heartbeat.settings SET max_clock_skew = '10 minutes').
CREATE OR REPLACE FUNCTION heartbeat.clock_horizon() RETURNS timestamptz
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $horizon$
    SELECT pg_catalog.statement_timestamp() + s.max_clock_skew FROM heartbeat.settings s
$horizon$;

-- Rebuild staging as the partitioned parent. Its rows are moved, not lost: the
-- ACCESS EXCLUSIVE lock waits for COPYs in flight (up to lock_timeout) and holds
-- new ones until commit; those then find the new table by name.
LOCK TABLE heartbeat.agent_connection_staging IN ACCESS EXCLUSIVE MODE;
ALTER TABLE heartbeat.agent_connection_staging RENAME TO agent_connection_staging_unpartitioned;

CREATE TABLE heartbeat.agent_connection_staging (
    agent_id                    uuid,
    first_connected_at          timestamptz,
    last_connected_at           timestamptz,
    last_connected_replica_id   uuid,
    disconnected_at             timestamptz,
    updated_at                  timestamptz
) PARTITION BY HASH (agent_id);
REVOKE ALL ON heartbeat.agent_connection_staging FROM PUBLIC;
GRANT INSERT ON heartbeat.agent_connection_staging TO heartbeat_writer;

-- The parts, by number (the remainder of hash(agent_id) / modulus).
CREATE FUNCTION heartbeat.staging_parts()
RETURNS TABLE (part integer, relid regclass, relname name)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $parts$
    SELECT pg_catalog.substring(c.relname::text, '_p([0-9]+)$')::integer, c.oid::regclass, c.relname
      FROM pg_catalog.pg_inherits i
      JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'heartbeat.agent_connection_staging'::regclass
     ORDER BY 1
$parts$;
REVOKE ALL ON FUNCTION heartbeat.staging_parts() FROM PUBLIC;

-- Splits staging into `parts` UNLOGGED (or, with durable staging, LOGGED) parts.
-- Safe while stagers COPY and mergers merge: it takes the merges' repartition
-- lock and an ACCESS EXCLUSIVE lock on staging (waiting at most lock_timeout for
-- COPYs and merges in flight; COPYs that arrive meanwhile wait for it), creates
-- the new parts, moves every staged row into them and drops the old ones, in one
-- transaction. Run by the owner (the role that ran the migrations); returns the
-- number of rows moved.
CREATE FUNCTION heartbeat.set_staging_parts(parts integer)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $set_parts$
DECLARE
    parent      regclass := 'heartbeat.agent_connection_staging'::regclass;
    persistence text;
    old         record;
    moved       bigint := 0;
    n           bigint;
    in_ext      boolean;
    part_name   text;
    old_name    text;
BEGIN
    IF parts IS NULL OR parts < 1 OR parts > 64 THEN
        RAISE EXCEPTION 'heartbeat.set_staging_parts: parts must be from 1 to 64, not %', COALESCE(parts::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- merges hold this lock shared for their whole transaction
    PERFORM pg_catalog.pg_advisory_xact_lock(1751474802, 2);
    EXECUTE 'LOCK TABLE heartbeat.agent_connection_staging IN ACCESS EXCLUSIVE MODE';
    -- the parts keep the persistence staging has now (UNLOGGED unless durable staging was chosen)
    SELECT CASE WHEN pg_catalog.bool_or(c.relpersistence = 'p') THEN 'LOGGED' ELSE 'UNLOGGED' END
      INTO persistence
      FROM heartbeat.staging_parts() s JOIN pg_catalog.pg_class c ON c.oid = s.relid;
    IF persistence IS NULL THEN
        -- first call: the persistence of the table from before partitioning (durable staging), if any
        SELECT CASE c.relpersistence WHEN 'p' THEN 'LOGGED' ELSE 'UNLOGGED' END INTO persistence
          FROM pg_catalog.pg_class c
         WHERE c.oid = pg_catalog.to_regclass('heartbeat.agent_connection_staging_unpartitioned');
    END IF;
    persistence := COALESCE(persistence, 'UNLOGGED');
    in_ext := EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                       WHERE d.classid = 'pg_catalog.pg_class'::regclass
                         AND d.objid = parent
                         AND d.deptype = 'e');

    -- the old parts become plain tables named *_old<k>
    FOR old IN SELECT * FROM heartbeat.staging_parts() LOOP
        old_name := 'agent_connection_staging_old' || old.part;
        EXECUTE pg_catalog.format('ALTER TABLE heartbeat.agent_connection_staging DETACH PARTITION heartbeat.%I', old.relname);
        EXECUTE pg_catalog.format('ALTER TABLE heartbeat.%I RENAME TO %I', old.relname, old_name);
    END LOOP;

    FOR k IN 0 .. parts - 1 LOOP
        part_name := 'agent_connection_staging_p' || k;
        EXECUTE pg_catalog.format(
            'CREATE UNLOGGED TABLE heartbeat.%I PARTITION OF heartbeat.agent_connection_staging '
            'FOR VALUES WITH (MODULUS %s, REMAINDER %s) WITH ('
            'autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, '
            'autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000, '
            'autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0, '
            'autovacuum_analyze_threshold = 100000)',
            part_name, parts::integer, k::integer);
        IF persistence = 'LOGGED' THEN
            EXECUTE pg_catalog.format('ALTER TABLE heartbeat.%I SET LOGGED', part_name);
        END IF;
        EXECUTE pg_catalog.format('REVOKE ALL ON heartbeat.%I FROM PUBLIC', part_name);
        EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON heartbeat.%I TO heartbeat_definer', part_name);
        -- created outside CREATE/ALTER EXTENSION: make it a member like its parent
        IF in_ext AND NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_depend d
                WHERE d.classid = 'pg_catalog.pg_class'::regclass
                  AND d.objid = pg_catalog.to_regclass('heartbeat.' || part_name)
                  AND d.deptype = 'e') THEN
            EXECUTE pg_catalog.format('ALTER EXTENSION pg_heartbeat ADD TABLE heartbeat.%I', part_name);
        END IF;
    END LOOP;

    -- move the rows of the old parts (and of the table from before partitioning) into the new ones
    FOR old IN SELECT c.oid AS relid, c.relname
                 FROM pg_catalog.pg_class c
                WHERE c.relnamespace = 'heartbeat'::regnamespace
                  AND c.relkind = 'r'
                  AND (c.relname ~ '^agent_connection_staging_old[0-9]+$'
                       OR c.relname = 'agent_connection_staging_unpartitioned') LOOP
        EXECUTE pg_catalog.format('INSERT INTO heartbeat.agent_connection_staging SELECT * FROM heartbeat.%I', old.relname);
        GET DIAGNOSTICS n = ROW_COUNT;
        moved := moved + n;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::regclass
                      AND d.objid = old.relid AND d.deptype = 'e') THEN
            BEGIN
                EXECUTE pg_catalog.format('ALTER EXTENSION pg_heartbeat DROP TABLE heartbeat.%I', old.relname);
            EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported THEN
                NULL;  -- inside the extension's own script: members may simply be dropped
            END;
        END IF;
        EXECUTE pg_catalog.format('DROP TABLE heartbeat.%I', old.relname);
    END LOOP;
    DELETE FROM heartbeat.merge_state ms
     WHERE ms.part >= parts;
    RETURN moved;
END
$set_parts$;
REVOKE ALL ON FUNCTION heartbeat.set_staging_parts(integer) FROM PUBLIC;

-- One row per part describing its last merge (not a growing log): read by
-- heartbeat.status. UNLOGGED: an observation, not data; after a crash it says
-- that no merge has run yet.
DROP TABLE heartbeat.merge_state;
CREATE UNLOGGED TABLE heartbeat.merge_state (
    part                integer     PRIMARY KEY,
    last_merge_at       timestamptz NOT NULL,   -- when the last merge of this part started
    last_duration       interval    NOT NULL,
    -- the start of the last merge that left nothing behind in this part: every
    -- row committed to it before then has been consumed (stagers release what
    -- they kept for a resend up to here)
    drained_through     timestamptz,
    rows_consumed       bigint      NOT NULL,
    agents_updated      bigint      NOT NULL,
    skipped_stale       bigint      NOT NULL,
    skipped_unknown     bigint      NOT NULL,
    skipped_invalid     bigint      NOT NULL,
    deferred_locked     bigint      NOT NULL,
    dead_lettered       bigint      NOT NULL,
    merges_total        bigint      NOT NULL DEFAULT 0,
    merged_by           text        -- the merger that asked for it (startMerger() passes its id), if any
);
REVOKE ALL ON heartbeat.merge_state FROM PUBLIC;

-- Merges that found a part's lock taken: when the waiting started and who held
-- it, so a merge held open in someone's transaction shows in heartbeat.status.
-- Written only by the merges that skip (never by the one holding the lock).
CREATE UNLOGGED TABLE heartbeat.merge_skips (
    part                integer     PRIMARY KEY,
    first_skip_at       timestamptz NOT NULL,
    last_skip_at        timestamptz NOT NULL,
    holder_pid          integer
);
REVOKE ALL ON heartbeat.merge_skips FROM PUBLIC;

CREATE UNLOGGED TABLE heartbeat.staging_epoch (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch       uuid        NOT NULL,
    began_at    timestamptz NOT NULL
);
REVOKE ALL ON heartbeat.staging_epoch FROM PUBLIC;

CREATE TABLE heartbeat.dead_letters (
    id                          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    failed_at                   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    agent_id                    uuid        NOT NULL,
    first_connected_at          timestamptz,
    last_connected_at           timestamptz,
    last_connected_replica_id   uuid,
    disconnected_at             timestamptz,
    updated_at                  timestamptz NOT NULL,
    sqlstate                    text        NOT NULL,
    message                     text        NOT NULL,
    detail                      text
);
REVOKE ALL ON heartbeat.dead_letters FROM PUBLIC;

-- the first parts: 4 (merged by one call when the backlog is small, by up to 4
-- backends in parallel when it is not; see docs/running-the-merge.md)
SELECT heartbeat.set_staging_parts(4);
