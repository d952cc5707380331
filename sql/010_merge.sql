-- pg-heartbeat 010: the bounded merge, part by part, with dead letters.
--
-- heartbeat.merge_agent_connections(max_rows, min_interval) merges every part
-- of staging, one after another, in one call; heartbeat.merge_staging_part(part,
-- max_rows, min_interval) merges one part, so several backends can merge the
-- parts in parallel (the client's merger and the pg_cron jobs do, when the
-- backlog is large). Each returns one row of counts.
--
-- How one part is merged (heartbeat.merge_part):
--   * its own advisory lock, never waited for: a part being merged elsewhere is
--     skipped (skipped_concurrent), and who holds the lock, since when, is
--     recorded for heartbeat.status;
--   * at most max_rows staged rows are consumed per statement (default
--     heartbeat.settings.max_rows_per_merge, 50,000; a call over every part
--     shares it between them), with DELETE ... RETURNING in the same statement
--     as the DISTINCT ON and the UPDATE; `more` says rows were left, so call
--     again (the client and the pg_cron loop do, committing in between): a
--     backlog drains in bounded statements and never times out as a whole;
--   * a COPY in flight is invisible to the DELETE's snapshot: its rows wait for
--     the next merge, and COPY never waits for a merge;
--   * the rules (docs/merge-rules.md): the newest snapshot per agent wins
--     (updated_at, then a disconnect, then the later last_connected_at, then the
--     greater replica id); it is applied only when strictly newer than the row;
--     first_connected_at keeps the earliest value ever seen; unknown agents are
--     counted and discarded; rows whose agent_id or updated_at is NULL, or with
--     any timestamp outside heartbeat.valid_time() (not finite, before 1970, or
--     beyond heartbeat.clock_horizon()), are counted as invalid and discarded;
--   * a row of workspace_agents locked by another transaction delays the fast
--     path by at most lock_timeout (2 s); a deadlock is detected after
--     deadlock_timeout; either way the slow path then updates every row it can
--     lock at once and puts the locked agents' snapshots back into staging;
--   * a snapshot that fails to apply (a CHECK or FOREIGN KEY of the user's
--     table, a trigger that raises, a value out of range) makes the slow path
--     bisect the batch in subtransactions: the failing snapshots go to
--     heartbeat.dead_letters with their SQLSTATE and message, every other agent
--     is applied by the same merge.
--   * statement_timeout and cancellation are not caught: the part's work rolls
--     back and its rows are merged next time.
SET LOCAL lock_timeout = '10s';

DROP FUNCTION heartbeat.merge_agent_connections();

-- A staged snapshot as the slow path holds it.
CREATE TYPE heartbeat.snapshot AS (
    agent_id                    uuid,
    first_connected_at          timestamptz,
    last_connected_at           timestamptz,
    last_connected_replica_id   uuid,
    disconnected_at             timestamptz,
    updated_at                  timestamptz
);

-- The one definition of a valid timestamp, for every timestamp column of the
-- merge and of every direct write: NULL, or finite, not before 1970 and not
-- beyond `horizon` (heartbeat.clock_horizon()). Keeps 'infinity', '-infinity'
-- and year-294276 values out of workspace_agents. (A plain SQL expression, so
-- PostgreSQL inlines it.)
CREATE FUNCTION heartbeat.valid_time(t timestamptz, horizon timestamptz)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $valid$
    SELECT t IS NULL
        OR (t OPERATOR(pg_catalog.>=) '1970-01-01 00:00:00+00'::pg_catalog.timestamptz
            AND t OPERATOR(pg_catalog.<=) horizon)
$valid$;
REVOKE ALL ON FUNCTION heartbeat.valid_time(timestamptz, timestamptz) FROM PUBLIC;

-- Every SECURITY DEFINER function of pg-heartbeat calls this first. It refuses
-- to run with the rights of a privileged role: anything that runs inside those
-- functions (a trigger, a CHECK function, a rule on workspace_agents) runs with
-- their owner's rights, and that owner must be the unprivileged
-- heartbeat_definer (sql/015, docs/security.md): no role attribute, and the
-- privileges of no other role (an inherited pg_write_server_files, say, would
-- let a trigger write files as the server). And it says plainly when that
-- owner cannot do its job: public.workspace_agents missing, or its column grants
-- missing (pg_dump treats grants made by CREATE EXTENSION as the extension's own,
-- so a restore needs SELECT heartbeat.apply_privileges(); once).
CREATE FUNCTION heartbeat.assert_definer()
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $assert$
DECLARE
    target regclass := pg_catalog.to_regclass('public.workspace_agents');
    why    text;
BEGIN
    SELECT pg_catalog.string_agg(x, ', ') INTO why FROM (
        SELECT a.attr AS x
          FROM pg_catalog.pg_roles r,
               LATERAL (VALUES ('SUPERUSER', r.rolsuper), ('CREATEROLE', r.rolcreaterole), ('CREATEDB', r.rolcreatedb),
                               ('BYPASSRLS', r.rolbypassrls), ('REPLICATION', r.rolreplication)) AS a(attr, has)
         WHERE r.rolname = CURRENT_USER AND a.has
        UNION ALL
        -- any membership, inherited or not: up to PostgreSQL 15, code running here could still
        -- SET ROLE to a role it is a NOINHERIT member of (and write server files as
        -- pg_write_server_files); heartbeat_definer is a member of no role
        SELECT 'member of ' || pg_catalog.quote_ident(g.rolname)
          FROM pg_catalog.pg_auth_members m
          JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
         WHERE m.member = (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER)
    ) s;
    IF why IS NOT NULL THEN
        RAISE EXCEPTION 'pg-heartbeat refuses to run with the rights of %, a privileged role (%)', CURRENT_USER, why
            USING ERRCODE = '42501',
                  HINT = 'pg-heartbeat''s SECURITY DEFINER functions must be owned by heartbeat_definer, which must stay unprivileged: run pg-heartbeat migrate again, or SELECT heartbeat.apply_privileges(); and REVOKE what was granted to heartbeat_definer (docs/security.md).';
    END IF;
    IF target IS NULL THEN
        RAISE EXCEPTION 'pg-heartbeat: public.workspace_agents does not exist'
            USING ERRCODE = '42P01',
                  HINT = 'Create it (sql/001_workspace_agents.sql, or your own table or view with those columns), then SELECT heartbeat.apply_privileges();';
    END IF;
    IF NOT pg_catalog.has_column_privilege(target, 'updated_at', 'UPDATE')
       OR NOT pg_catalog.has_column_privilege(target, 'id', 'SELECT') THEN
        RAISE EXCEPTION 'pg-heartbeat: % may not read and update public.workspace_agents', CURRENT_USER
            USING ERRCODE = '42501',
                  HINT = 'The owner of public.workspace_agents runs SELECT heartbeat.apply_privileges(); (needed once after a pg_dump restore, or after replacing the table).';
    END IF;
END
$assert$;
REVOKE ALL ON FUNCTION heartbeat.assert_definer() FROM PUBLIC;

-- Applies `batch` (at most one snapshot per agent) to workspace_agents, never
-- waiting for a row lock and never failing as a whole: locked agents go back to
-- staging, snapshots that fail to apply go to heartbeat.dead_letters (found by
-- bisection in subtransactions). The slow path of heartbeat.merge_part().
CREATE FUNCTION heartbeat.apply_snapshots(
    batch           heartbeat.snapshot[],
    OUT agents_updated  bigint,
    OUT skipped_stale   bigint,
    OUT skipped_unknown bigint,
    OUT deferred_locked bigint,
    OUT dead_lettered   bigint
)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $apply$
DECLARE
    n_batch     integer := COALESCE(pg_catalog.cardinality(batch), 0);
    half        integer;
    n_known     bigint;
    n_earlier   bigint;
    left_half   record;
    right_half  record;
    e_state     text;
    e_message   text;
    e_detail    text;
BEGIN
    agents_updated := 0; skipped_stale := 0; skipped_unknown := 0; deferred_locked := 0; dead_lettered := 0;
    IF n_batch = 0 THEN
        RETURN;
    END IF;
    BEGIN
        WITH known AS (
            SELECT n.*, (wa.updated_at < n.updated_at) AS newer,
                   wa.first_connected_at AS old_first
              FROM pg_catalog.unnest(batch) n
              JOIN public.workspace_agents wa ON wa.id = n.agent_id
        ), targets AS (
            -- the agents whose row this merge changes: a newer snapshot, or an earlier first_connected_at
            SELECT k.* FROM known k
             WHERE k.newer OR k.first_connected_at < COALESCE(k.old_first, 'infinity')
        ), lockable AS (
            SELECT wa.id
              FROM public.workspace_agents wa
              JOIN targets t ON wa.id = t.agent_id
               FOR NO KEY UPDATE OF wa SKIP LOCKED
        ), updated AS (
            UPDATE public.workspace_agents AS wa
               SET first_connected_at        = LEAST(wa.first_connected_at, t.first_connected_at),
                   last_connected_at         = t.last_connected_at,
                   last_connected_replica_id = t.last_connected_replica_id,
                   disconnected_at           = t.disconnected_at,
                   updated_at                = t.updated_at
              FROM targets t
              JOIN lockable l ON l.id = t.agent_id
             WHERE wa.id = t.agent_id
               AND wa.updated_at < t.updated_at
            RETURNING wa.id
        ), earlier_first AS (
            UPDATE public.workspace_agents AS wa
               SET first_connected_at = t.first_connected_at
              FROM targets t
              JOIN lockable l ON l.id = t.agent_id
             WHERE wa.id = t.agent_id
               AND NOT t.newer
               AND t.first_connected_at < COALESCE(wa.first_connected_at, 'infinity')
            RETURNING 1
        ), restaged AS (
            INSERT INTO heartbeat.agent_connection_staging
                   (agent_id, first_connected_at, last_connected_at,
                    last_connected_replica_id, disconnected_at, updated_at)
            SELECT t.agent_id, t.first_connected_at, t.last_connected_at,
                   t.last_connected_replica_id, t.disconnected_at, t.updated_at
              FROM targets t
             WHERE NOT EXISTS (SELECT 1 FROM lockable l WHERE l.id = t.agent_id)
            RETURNING 1
        )
        SELECT (SELECT pg_catalog.count(*) FROM known),
               (SELECT pg_catalog.count(*) FROM updated),
               (SELECT pg_catalog.count(*) FROM restaged),
               (SELECT pg_catalog.count(*) FROM earlier_first)
          INTO n_known, agents_updated, deferred_locked, n_earlier;
        skipped_unknown := n_batch - n_known;
        -- newer but locked agents are deferred, not stale; an earlier first_connected_at alone is stale
        skipped_stale := n_known - agents_updated - deferred_locked;
        RETURN;
    EXCEPTION
        -- what one snapshot can cause: a value out of range (class 22), a constraint (23), a view's
        -- check option (44), a trigger that raises (P0001); anything else (privileges, a missing
        -- column, a timeout, a shutdown) is not the snapshot's fault: the merge fails and the rows stay
        WHEN data_exception OR integrity_constraint_violation OR with_check_option_violation OR raise_exception THEN
            GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT, e_detail = PG_EXCEPTION_DETAIL;
    END;
    IF n_batch = 1 THEN
        -- this one snapshot cannot be applied: set it aside with the reason
        INSERT INTO heartbeat.dead_letters
               (agent_id, first_connected_at, last_connected_at, last_connected_replica_id,
                disconnected_at, updated_at, sqlstate, message, detail)
        SELECT b.agent_id, b.first_connected_at, b.last_connected_at, b.last_connected_replica_id,
               b.disconnected_at, b.updated_at, e_state, e_message, NULLIF(e_detail, '')
          FROM pg_catalog.unnest(batch) b;
        DELETE FROM heartbeat.dead_letters d
         WHERE d.id <= (SELECT pg_catalog.max(x.id) FROM heartbeat.dead_letters x)
                                            - (SELECT s.dead_letters_max FROM heartbeat.settings s);
        dead_lettered := 1;
        RETURN;
    END IF;
    -- some snapshot of the batch failed: apply each half on its own
    half := n_batch / 2;
    left_half := heartbeat.apply_snapshots(batch[1:half]);
    right_half := heartbeat.apply_snapshots(batch[half + 1:n_batch]);
    agents_updated  := left_half.agents_updated  + right_half.agents_updated;
    skipped_stale   := left_half.skipped_stale   + right_half.skipped_stale;
    skipped_unknown := left_half.skipped_unknown + right_half.skipped_unknown;
    deferred_locked := left_half.deferred_locked + right_half.deferred_locked;
    dead_lettered   := left_half.dead_lettered   + right_half.dead_lettered;
END
$apply$;
REVOKE ALL ON FUNCTION heartbeat.apply_snapshots(heartbeat.snapshot[]) FROM PUBLIC;

-- What merging one part (or every part) did.
CREATE TYPE heartbeat.merge_result AS (
    rows_consumed               bigint,
    agents_updated              bigint,
    skipped_stale               bigint,
    skipped_unknown             bigint,
    skipped_invalid             bigint,
    deferred_locked             bigint,
    skipped_concurrent          boolean,   -- every part asked for was being merged elsewhere
    dead_lettered               bigint,
    parts                       integer,   -- parts asked for
    parts_merged                integer,
    parts_skipped_concurrent    integer,
    parts_skipped_recent        integer,
    parts_more                  integer[], -- parts that still hold rows: merge again now
    more                        boolean,
    duration                    interval,
    lock_holder_pid             integer,   -- who holds a part's lock this call found taken
    lock_busy_since             timestamptz -- since when merges find it taken
);

-- Merges one part: `relname` is its table in schema heartbeat (agent_connection_staging_p<part>).
CREATE FUNCTION heartbeat.merge_part(
    part            integer,
    relname         name,
    budget          integer,
    min_interval    interval,
    horizon         timestamptz,
    merger          text
) RETURNS heartbeat.merge_result
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $merge_part$
#variable_conflict use_variable
DECLARE
    res         heartbeat.merge_result;
    started     timestamptz := pg_catalog.clock_timestamp();
    snap_at     timestamptz;
    n_agents    bigint;
    batch       heartbeat.snapshot[];
    slow        record;
    state       record;
BEGIN
    res.rows_consumed := 0; res.agents_updated := 0; res.skipped_stale := 0; res.skipped_unknown := 0;
    res.skipped_invalid := 0; res.deferred_locked := 0; res.dead_lettered := 0;
    res.skipped_concurrent := false; res.parts := 1; res.parts_merged := 0;
    res.parts_skipped_concurrent := 0; res.parts_skipped_recent := 0; res.parts_more := '{}'; res.more := false;

    IF min_interval IS NOT NULL THEN
        -- another merger (another app replica) merged this part recently and left nothing behind
        SELECT ms.last_merge_at, ms.drained_through, ms.merged_by INTO state
          FROM heartbeat.merge_state ms WHERE ms.part = merge_part.part;
        IF state.last_merge_at > started - min_interval
           AND state.drained_through >= state.last_merge_at
           AND state.merged_by IS DISTINCT FROM merger THEN
            res.parts_skipped_recent := 1;
            res.duration := pg_catalog.clock_timestamp() - started;
            RETURN res;
        END IF;
    END IF;

    IF NOT pg_catalog.pg_try_advisory_xact_lock(1751474803, part) THEN
        -- merged elsewhere right now: note who holds the lock and since when we see it taken
        SELECT l.pid INTO res.lock_holder_pid
          FROM pg_catalog.pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                                   WHERE d.datname = pg_catalog.current_database())
           AND l.classid = 1751474803 AND l.objid = part::oid
           AND l.objsubid = 2
         LIMIT 1;
        -- Record the skip, never waiting: the row of merge_skips stays locked until the end of the
        -- transaction that wrote it (which may go on merging other parts for seconds), so only one
        -- transaction at a time writes it (this advisory lock); the others read what it recorded.
        IF pg_catalog.pg_try_advisory_xact_lock(1751474804, part) THEN
            INSERT INTO heartbeat.merge_skips AS s (part, first_skip_at, last_skip_at, holder_pid)
            VALUES (part, started, started, res.lock_holder_pid)
            ON CONFLICT ON CONSTRAINT merge_skips_pkey DO UPDATE
               SET first_skip_at = CASE
                       -- a merge of this part finished since the last skip: a new episode
                       WHEN EXISTS (SELECT 1 FROM heartbeat.merge_state ms
                                     WHERE ms.part = s.part
                                       AND ms.last_merge_at + ms.last_duration
                                           > s.last_skip_at)
                         OR s.holder_pid IS DISTINCT FROM excluded.holder_pid
                       THEN excluded.first_skip_at ELSE s.first_skip_at END,
                   last_skip_at = excluded.last_skip_at,
                   holder_pid = excluded.holder_pid
            RETURNING s.first_skip_at INTO res.lock_busy_since;
        ELSE
            SELECT s.first_skip_at INTO res.lock_busy_since
              FROM heartbeat.merge_skips s
             WHERE s.part = merge_part.part AND s.holder_pid = res.lock_holder_pid;
        END IF;
        res.skipped_concurrent := true;
        res.parts_skipped_concurrent := 1;
        res.duration := pg_catalog.clock_timestamp() - started;
        RETURN res;
    END IF;
    res.parts_merged := 1;

    snap_at := pg_catalog.clock_timestamp();  -- the DELETE's snapshot is taken after this
    BEGIN
        -- Fast path: one statement; waits at most lock_timeout for row locks.
        EXECUTE pg_catalog.format($fast$
        WITH consumed AS (
            DELETE FROM heartbeat.%1$I AS s
             WHERE s.ctid = ANY (ARRAY(SELECT t.ctid FROM heartbeat.%1$I AS t LIMIT $2))
            RETURNING s.agent_id, s.first_connected_at, s.last_connected_at,
                      s.last_connected_replica_id, s.disconnected_at, s.updated_at,
                      (s.agent_id IS NOT NULL AND s.updated_at IS NOT NULL
                       AND heartbeat.valid_time(s.updated_at, $1)
                       AND heartbeat.valid_time(s.first_connected_at, $1)
                       AND heartbeat.valid_time(s.last_connected_at, $1)
                       AND heartbeat.valid_time(s.disconnected_at, $1)) AS valid
        ), newest AS (
            SELECT DISTINCT ON (c.agent_id)
                   c.agent_id, c.last_connected_at, c.last_connected_replica_id,
                   c.disconnected_at, c.updated_at,
                   pg_catalog.min(c.first_connected_at) OVER w AS first_connected_at
              FROM consumed c
             WHERE c.valid
            WINDOW w AS (PARTITION BY c.agent_id
                         ORDER BY c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                                  c.last_connected_at DESC NULLS LAST,
                                  c.last_connected_replica_id DESC NULLS LAST
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
             ORDER BY c.agent_id, c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                      c.last_connected_at DESC NULLS LAST, c.last_connected_replica_id DESC NULLS LAST
        ), updated AS (
            UPDATE public.workspace_agents AS wa
               SET first_connected_at        = LEAST(wa.first_connected_at, n.first_connected_at),
                   last_connected_at         = n.last_connected_at,
                   last_connected_replica_id = n.last_connected_replica_id,
                   disconnected_at           = n.disconnected_at,
                   updated_at                = n.updated_at
              FROM newest n
             WHERE wa.id = n.agent_id
               AND wa.updated_at < n.updated_at
            RETURNING wa.id
        ), counts AS (
            SELECT k.n_consumed, k.n_invalid,
                   (SELECT pg_catalog.count(*) FROM newest) AS n_newest,
                   (SELECT pg_catalog.count(*) FROM updated) AS n_updated
              FROM (SELECT pg_catalog.count(*) AS n_consumed,
                           pg_catalog.count(*) FILTER (WHERE NOT c.valid) AS n_invalid
                      FROM consumed c) k
            OFFSET 0
        ), earlier_first AS (
            -- a snapshot too old to apply still tells when the agent first connected
            -- (only looked at when some agent was not updated: the steady state skips it)
            UPDATE public.workspace_agents AS wa
               SET first_connected_at = n.first_connected_at
              FROM newest n
             WHERE (SELECT c.n_newest > c.n_updated FROM counts c)
               AND wa.id = n.agent_id
               AND n.first_connected_at < COALESCE(wa.first_connected_at, 'infinity')
               AND NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
            RETURNING 1
        )
        SELECT c.n_consumed, c.n_invalid, c.n_newest, c.n_updated,
               CASE WHEN c.n_newest > c.n_updated THEN
                   (SELECT pg_catalog.count(*) FROM newest n
                     WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
                       AND NOT EXISTS (SELECT 1 FROM public.workspace_agents wa
                                        WHERE wa.id = n.agent_id))
               ELSE 0 END,
               (SELECT pg_catalog.count(*) FROM earlier_first)
          FROM counts c
        $fast$, relname)
          INTO res.rows_consumed, res.skipped_invalid, n_agents, res.agents_updated, res.skipped_unknown
         USING horizon, budget;
        res.skipped_stale := n_agents - res.agents_updated - res.skipped_unknown;
    EXCEPTION
        WHEN lock_not_available OR deadlock_detected OR data_exception OR integrity_constraint_violation
             OR with_check_option_violation OR raise_exception THEN
            -- Slow path: a row is locked (lock_timeout), a deadlock, or some snapshot
            -- cannot be applied (a constraint or trigger of the user's table). Any
            -- other error (privileges, a timeout, a shutdown) fails the merge: the
            -- rows stay staged for the next one. The
            -- fast path's work was rolled back with its subtransaction: consume the
            -- same rows again, keep the newest snapshot per agent in memory, and
            -- apply them without waiting and without failing as a whole.
            snap_at := pg_catalog.clock_timestamp();
            EXECUTE pg_catalog.format($slow$
            WITH consumed AS (
                DELETE FROM heartbeat.%1$I AS s
                 WHERE s.ctid = ANY (ARRAY(SELECT t.ctid FROM heartbeat.%1$I AS t LIMIT $2))
                RETURNING s.agent_id, s.first_connected_at, s.last_connected_at,
                          s.last_connected_replica_id, s.disconnected_at, s.updated_at,
                          (s.agent_id IS NOT NULL AND s.updated_at IS NOT NULL
                           AND heartbeat.valid_time(s.updated_at, $1)
                           AND heartbeat.valid_time(s.first_connected_at, $1)
                           AND heartbeat.valid_time(s.last_connected_at, $1)
                           AND heartbeat.valid_time(s.disconnected_at, $1)) AS valid
            ), newest AS (
                SELECT DISTINCT ON (c.agent_id)
                       ROW(c.agent_id, pg_catalog.min(c.first_connected_at) OVER w, c.last_connected_at,
                           c.last_connected_replica_id, c.disconnected_at, c.updated_at)::heartbeat.snapshot AS snap
                  FROM consumed c
                 WHERE c.valid
                WINDOW w AS (PARTITION BY c.agent_id
                             ORDER BY c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                                      c.last_connected_at DESC NULLS LAST,
                                      c.last_connected_replica_id DESC NULLS LAST
                             ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
                 ORDER BY c.agent_id, c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                          c.last_connected_at DESC NULLS LAST, c.last_connected_replica_id DESC NULLS LAST
            )
            SELECT (SELECT pg_catalog.count(*) FROM consumed),
                   (SELECT pg_catalog.count(*) FROM consumed c WHERE NOT c.valid),
                   (SELECT pg_catalog.array_agg(n.snap) FROM newest n)
            $slow$, relname)
              INTO res.rows_consumed, res.skipped_invalid, batch
             USING horizon, budget;
            slow := heartbeat.apply_snapshots(batch);
            res.agents_updated  := slow.agents_updated;
            res.skipped_stale   := slow.skipped_stale;
            res.skipped_unknown := slow.skipped_unknown;
            res.deferred_locked := slow.deferred_locked;
            res.dead_lettered   := slow.dead_lettered;
    END;

    res.more := res.rows_consumed >= budget;
    IF res.more THEN
        res.parts_more := ARRAY[part];
    END IF;
    res.duration := pg_catalog.clock_timestamp() - started;
    INSERT INTO heartbeat.merge_state AS ms
           (part, last_merge_at, last_duration, drained_through, rows_consumed, agents_updated, skipped_stale,
            skipped_unknown, skipped_invalid, deferred_locked, dead_lettered, merges_total, merged_by)
    VALUES (part, started, res.duration,
            CASE WHEN NOT res.more AND res.deferred_locked = 0 THEN snap_at END,
            res.rows_consumed, res.agents_updated, res.skipped_stale, res.skipped_unknown,
            res.skipped_invalid, res.deferred_locked, res.dead_lettered, 1, merger)
    ON CONFLICT ON CONSTRAINT merge_state_pkey DO UPDATE
       SET last_merge_at   = excluded.last_merge_at,
           last_duration   = excluded.last_duration,
           drained_through = COALESCE(excluded.drained_through, ms.drained_through),
           rows_consumed   = excluded.rows_consumed,
           agents_updated  = excluded.agents_updated,
           skipped_stale   = excluded.skipped_stale,
           skipped_unknown = excluded.skipped_unknown,
           skipped_invalid = excluded.skipped_invalid,
           deferred_locked = excluded.deferred_locked,
           dead_lettered   = excluded.dead_lettered,
           merges_total    = ms.merges_total + 1,
           merged_by       = excluded.merged_by;
    RETURN res;
END
$merge_part$;
REVOKE ALL ON FUNCTION heartbeat.merge_part(integer, name, integer, interval, timestamptz, text) FROM PUBLIC;

-- Checks shared by the two entry points; returns the row budget and the horizon.
CREATE FUNCTION heartbeat.merge_prelude(max_rows integer, OUT budget integer, OUT horizon timestamptz)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $prelude$
BEGIN
    PERFORM heartbeat.assert_definer();
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'the pg-heartbeat merge must run in a READ COMMITTED transaction, not %',
            pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = '25001',  -- active_sql_transaction
                  HINT = 'BEGIN ISOLATION LEVEL READ COMMITTED; SELECT * FROM heartbeat.merge_agent_connections(); COMMIT;';
    END IF;
    IF max_rows IS NOT NULL AND max_rows < 1 THEN
        RAISE EXCEPTION 'pg-heartbeat merge: max_rows must be positive, not %', max_rows USING ERRCODE = '22023';
    END IF;
    budget := COALESCE(max_rows, (SELECT s.max_rows_per_merge FROM heartbeat.settings s));
    horizon := heartbeat.clock_horizon();
    -- set_staging_parts() takes this lock exclusively while it swaps the parts
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(1751474802, 2);
END
$prelude$;
REVOKE ALL ON FUNCTION heartbeat.merge_prelude(integer) FROM PUBLIC;

-- Merges every part, one after another (max_rows is shared between them).
-- min_interval: skip the parts that another merger merged less than this long
-- ago and left empty (what startMerger() passes, so replicas do not multiply
-- merges); merger: who is asking (startMerger() passes an id of its own), so a
-- merger never skips a part because of its own last merge.
CREATE FUNCTION heartbeat.merge_agent_connections(
    max_rows        integer  DEFAULT NULL,
    min_interval    interval DEFAULT NULL,
    merger          text     DEFAULT NULL
) RETURNS SETOF heartbeat.merge_result
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $merge$
DECLARE
    pre     record;
    total   heartbeat.merge_result;
    r       heartbeat.merge_result;
    p       record;
    n_parts integer;
    started timestamptz := pg_catalog.clock_timestamp();
BEGIN
    pre := heartbeat.merge_prelude(max_rows);
    SELECT pg_catalog.count(*) INTO n_parts FROM heartbeat.staging_parts();
    total := ROW(0, 0, 0, 0, 0, 0, false, 0, n_parts, 0, 0, 0, '{}', false, NULL, NULL, NULL)::heartbeat.merge_result;
    FOR p IN SELECT * FROM heartbeat.staging_parts() LOOP
        r := heartbeat.merge_part(p.part, p.relname,
                                  GREATEST(1, pg_catalog.ceil(pre.budget::numeric / n_parts)::integer),
                                  min_interval, pre.horizon, merger);
        total.rows_consumed   := total.rows_consumed   + r.rows_consumed;
        total.agents_updated  := total.agents_updated  + r.agents_updated;
        total.skipped_stale   := total.skipped_stale   + r.skipped_stale;
        total.skipped_unknown := total.skipped_unknown + r.skipped_unknown;
        total.skipped_invalid := total.skipped_invalid + r.skipped_invalid;
        total.deferred_locked := total.deferred_locked + r.deferred_locked;
        total.dead_lettered   := total.dead_lettered   + r.dead_lettered;
        total.parts_merged    := total.parts_merged    + r.parts_merged;
        total.parts_skipped_concurrent := total.parts_skipped_concurrent + r.parts_skipped_concurrent;
        total.parts_skipped_recent     := total.parts_skipped_recent     + r.parts_skipped_recent;
        total.parts_more := total.parts_more || r.parts_more;
        IF r.lock_busy_since IS NOT NULL
           AND (total.lock_busy_since IS NULL OR r.lock_busy_since < total.lock_busy_since) THEN
            total.lock_busy_since := r.lock_busy_since;
            total.lock_holder_pid := r.lock_holder_pid;
        END IF;
    END LOOP;
    total.more := pg_catalog.cardinality(total.parts_more) > 0;
    total.skipped_concurrent := n_parts > 0
                                AND total.parts_skipped_concurrent = n_parts;
    total.duration := pg_catalog.clock_timestamp() - started;
    RETURN NEXT total;
END
$merge$;

-- Merges one part (0 .. parts-1): what parallel mergers call, one part each.
CREATE FUNCTION heartbeat.merge_staging_part(
    part            integer,
    max_rows        integer  DEFAULT NULL,
    min_interval    interval DEFAULT NULL,
    merger          text     DEFAULT NULL
) RETURNS SETOF heartbeat.merge_result
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $merge_one$
DECLARE
    pre         record;
    part_name   name;
    n_parts     integer;
BEGIN
    pre := heartbeat.merge_prelude(max_rows);
    SELECT s.relname INTO part_name FROM heartbeat.staging_parts() s WHERE s.part = merge_staging_part.part;
    IF part_name IS NULL THEN
        SELECT pg_catalog.count(*) INTO n_parts FROM heartbeat.staging_parts();
        RAISE EXCEPTION 'heartbeat.merge_staging_part: staging has parts 0 to %, not %', n_parts - 1, part
            USING ERRCODE = '22023';
    END IF;
    RETURN NEXT heartbeat.merge_part(part, part_name, pre.budget, min_interval, pre.horizon, merger);
END
$merge_one$;

-- What a stager needs to resend after staging was reset: the epoch (a new one
-- after crash recovery or on a promoted standby, where UNLOGGED tables start
-- empty) and how far every part has been drained, on the database clock.
CREATE FUNCTION heartbeat.staging_epoch(
    OUT epoch           uuid,
    OUT began_at        timestamptz,
    OUT drained_through timestamptz,
    OUT checked_at      timestamptz
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $epoch$
BEGIN
    PERFORM heartbeat.assert_definer();
    checked_at := pg_catalog.clock_timestamp();
    SELECT e.epoch, e.began_at INTO epoch, began_at FROM heartbeat.staging_epoch e;
    IF NOT FOUND THEN
        INSERT INTO heartbeat.staging_epoch AS e (singleton, epoch, began_at)
        VALUES (true, pg_catalog.gen_random_uuid(), checked_at)
        ON CONFLICT ON CONSTRAINT staging_epoch_pkey DO NOTHING;
        SELECT e.epoch, e.began_at INTO epoch, began_at FROM heartbeat.staging_epoch e;
    END IF;
    -- every part must have been drained; a part never merged since the reset has no row
    SELECT CASE WHEN pg_catalog.count(ms.part) = pg_catalog.count(*)
                THEN pg_catalog.min(ms.drained_through) END
      INTO drained_through
      FROM heartbeat.staging_parts() p
      LEFT JOIN heartbeat.merge_state ms ON ms.part = p.part;
END
$epoch$;

-- Puts dead letters back into staging (after fixing what made them fail) and
-- removes them; returns how many. Only those with id <= up_to, when given.
CREATE FUNCTION heartbeat.retry_dead_letters(up_to bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $retry$
    WITH moved AS (
        DELETE FROM heartbeat.dead_letters d
         WHERE up_to IS NULL OR d.id <= up_to
        RETURNING d.agent_id, d.first_connected_at, d.last_connected_at,
                  d.last_connected_replica_id, d.disconnected_at, d.updated_at
    ), staged AS (
        INSERT INTO heartbeat.agent_connection_staging
               (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at)
        SELECT * FROM moved
        RETURNING 1
    )
    SELECT pg_catalog.count(*) FROM staged
$retry$;
REVOKE ALL ON FUNCTION heartbeat.retry_dead_letters(bigint) FROM PUBLIC;
