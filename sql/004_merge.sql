-- pg-heartbeat 004: heartbeat.merge_agent_connections(), the set-based merge.
--
-- One call consumes every staged row that is visible to it (at least every row
-- committed before it began) and applies, per agent, the newest staged snapshot
-- to public.workspace_agents in a single UPDATE ... FROM.
--
-- How staged rows are consumed: DELETE ... RETURNING in the same statement as
-- the UPDATE. Under READ COMMITTED the DELETE removes exactly the rows in its
-- snapshot; a COPY still in flight (or committing meanwhile) is invisible to it
-- and its rows stay for the next merge, so nothing is lost and COPY never waits
-- for a merge (INSERT and DELETE take compatible table locks). If the merge
-- fails (statement_timeout, lock trouble, a crash) the DELETE rolls back with
-- it and the rows are merged next time. The alternatives and why not:
--   * TRUNCATE under an ACCESS EXCLUSIVE lock: no dead tuples, but every COPY
--     blocks for the whole merge, so client flushes stall behind it;
--   * rotating staging tables: no dead tuples either, but the clients must learn
--     which table is current (an extra round trip per flush, or a race on the
--     name), and a COPY into the old table after the swap must still be found.
-- The DELETE's dead tuples are cheap here (UNLOGGED, no indexes) and the
-- table's autovacuum settings (003) reclaim them continuously.
--
-- Rules (see README "Merge rules"):
--   * newest snapshot per agent: DISTINCT ON (agent_id) ORDER BY updated_at DESC,
--     ties broken deterministically: a disconnect wins, then the later
--     last_connected_at, then the greater replica id;
--   * applied only where the staged updated_at is strictly newer than the row's:
--     an older or equal snapshot never overwrites, so re-merging is a no-op;
--   * first_connected_at keeps the earliest non-null value ever seen, also from
--     a staged snapshot too old to apply otherwise (say, a first heartbeat
--     merged after the agent's disconnect);
--   * the other columns come from the winning snapshot; NULL means NULL;
--   * unknown agents are discarded and counted; rows without agent_id or
--     updated_at, or more than 5 minutes (heartbeat.clock_horizon()) ahead of
--     the database clock, are discarded and counted as invalid;
--   * a concurrent merge makes this one return at once (skipped_concurrent);
--   * a workspace_agents row locked by another transaction delays the merge by
--     at most lock_timeout (2 s): the merge then retries skipping locked rows
--     and puts those agents' snapshots back into staging for the next merge.
SET LOCAL lock_timeout = '10s';

-- The latest updated_at accepted: the statement's time plus the allowed clock
-- skew. A replica with a clock far ahead could otherwise freeze a row (every
-- later, honest snapshot would look older). Used by the merge and the
-- disconnect functions. (From sql/009 on the bound is the owner's
-- heartbeat.settings.max_clock_skew; a session cannot widen it.)
CREATE FUNCTION heartbeat.clock_horizon() RETURNS timestamptz
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $horizon$
    SELECT pg_catalog.statement_timestamp() + pg_catalog.interval '5 minutes'
$horizon$;
REVOKE ALL ON FUNCTION heartbeat.clock_horizon() FROM PUBLIC;

-- The direct writes (disconnect_agent, disconnect_replica) refuse what the merge
-- would skip: a timestamp beyond heartbeat.clock_horizon() raises 22008.
CREATE FUNCTION heartbeat.reject_future(latest timestamptz, caller text) RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $reject$
BEGIN
    IF latest > heartbeat.clock_horizon() THEN
        RAISE EXCEPTION '%: % is too far ahead of the database clock', caller, latest
            USING ERRCODE = '22008',  -- datetime_field_overflow
                  HINT = 'Check the clock of the replica (the bound is heartbeat.clock_horizon()).';
    END IF;
END
$reject$;
REVOKE ALL ON FUNCTION heartbeat.reject_future(timestamptz, text) FROM PUBLIC;

CREATE FUNCTION heartbeat.merge_agent_connections()
RETURNS TABLE (
    rows_consumed       bigint,
    agents_updated      bigint,
    skipped_stale       bigint,
    skipped_unknown     bigint,
    skipped_invalid     bigint,
    deferred_locked     bigint,
    skipped_concurrent  boolean
)
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $merge$
#variable_conflict use_column
DECLARE
    started     timestamptz := pg_catalog.clock_timestamp();
    horizon     timestamptz;
    n_agents    bigint;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'heartbeat.merge_agent_connections() must run in a READ COMMITTED transaction, not %',
            pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = '25001';  -- active_sql_transaction
    END IF;

    -- One merge at a time, database-wide. The lock is transaction-scoped (safe
    -- behind a transaction pooler) and never waited for.
    IF NOT pg_catalog.pg_try_advisory_xact_lock(1751474802, 1) THEN
        rows_consumed := 0; agents_updated := 0; skipped_stale := 0; skipped_unknown := 0;
        skipped_invalid := 0; deferred_locked := 0; skipped_concurrent := true;
        RETURN NEXT;
        RETURN;
    END IF;
    skipped_concurrent := false;
    deferred_locked := 0;
    horizon := heartbeat.clock_horizon();

    BEGIN
        -- Fast path: one statement; waits at most lock_timeout for row locks.
        WITH consumed AS (
            DELETE FROM heartbeat.agent_connection_staging
            RETURNING agent_id, first_connected_at, last_connected_at,
                      last_connected_replica_id, disconnected_at, updated_at
        ), newest AS (
            SELECT DISTINCT ON (c.agent_id)
                   c.agent_id, c.last_connected_at, c.last_connected_replica_id,
                   c.disconnected_at, c.updated_at,
                   min(c.first_connected_at) OVER w AS first_connected_at
              FROM consumed c
             WHERE c.agent_id IS NOT NULL AND c.updated_at IS NOT NULL AND c.updated_at <= horizon
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
        ), all_updated AS (
            -- the steady state: every agent's snapshot applied, so nothing is stale or unknown
            -- and the look at the rest below is skipped (a one-time filter, not a scan)
            SELECT (SELECT count(*) FROM newest) = (SELECT count(*) FROM updated) AS yes
        ), earlier_first AS (
            -- a snapshot too old to apply still tells when the agent first connected
            UPDATE public.workspace_agents AS wa
               SET first_connected_at = n.first_connected_at
              FROM newest n
             WHERE NOT (SELECT yes FROM all_updated)
               AND wa.id = n.agent_id
               AND n.first_connected_at < COALESCE(wa.first_connected_at, 'infinity')
               AND NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM consumed),
               (SELECT count(*) FROM consumed c
                 WHERE c.agent_id IS NULL OR c.updated_at IS NULL OR c.updated_at > horizon),
               (SELECT count(*) FROM newest),
               (SELECT count(*) FROM updated),
               -- unknown agents: only those the UPDATE did not touch need a second look
               (SELECT count(*) FROM newest n
                 WHERE NOT (SELECT yes FROM all_updated)
                   AND NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
                   AND NOT EXISTS (SELECT 1 FROM public.workspace_agents wa WHERE wa.id = n.agent_id))
          INTO rows_consumed, skipped_invalid, n_agents, agents_updated, skipped_unknown;
        skipped_stale := n_agents - agents_updated - skipped_unknown;
    EXCEPTION WHEN lock_not_available THEN
        -- Slow path: some workspace_agents row is locked by another transaction
        -- (the fast path's work was rolled back with its subtransaction). Update
        -- every row we can lock now and put the snapshots of the locked agents
        -- back into staging, so one busy row never stalls the whole fleet. It
        -- costs about twice the fast path (an extra lock pass), hence only here.
        -- Its consumed/newest CTEs repeat the fast path's on purpose: the fast
        -- path's DELETE was rolled back with its subtransaction, so the rows must
        -- be consumed again, in this statement (a CTE cannot be shared across
        -- statements, and parking the rows in a temp table would be session state,
        -- which a transaction pooler cannot keep).
        WITH consumed AS (
            DELETE FROM heartbeat.agent_connection_staging
            RETURNING agent_id, first_connected_at, last_connected_at,
                      last_connected_replica_id, disconnected_at, updated_at
        ), newest AS (
            SELECT DISTINCT ON (c.agent_id)
                   c.agent_id, c.last_connected_at, c.last_connected_replica_id,
                   c.disconnected_at, c.updated_at,
                   min(c.first_connected_at) OVER w AS first_connected_at
              FROM consumed c
             WHERE c.agent_id IS NOT NULL AND c.updated_at IS NOT NULL AND c.updated_at <= horizon
            WINDOW w AS (PARTITION BY c.agent_id
                         ORDER BY c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                                  c.last_connected_at DESC NULLS LAST,
                                  c.last_connected_replica_id DESC NULLS LAST
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
             ORDER BY c.agent_id, c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                      c.last_connected_at DESC NULLS LAST, c.last_connected_replica_id DESC NULLS LAST
        ), targets AS (
            -- known agents whose row this merge changes: a newer snapshot, or an earlier first_connected_at
            SELECT n.*
              FROM newest n
              JOIN public.workspace_agents wa ON wa.id = n.agent_id
             WHERE wa.updated_at < n.updated_at
                OR n.first_connected_at < COALESCE(wa.first_connected_at, 'infinity')
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
               AND t.first_connected_at < COALESCE(wa.first_connected_at, 'infinity')
               AND NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = t.agent_id)
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
        SELECT (SELECT count(*) FROM consumed),
               (SELECT count(*) FROM consumed c
                 WHERE c.agent_id IS NULL OR c.updated_at IS NULL OR c.updated_at > horizon),
               (SELECT count(*) FROM newest),
               (SELECT count(*) FROM updated),
               (SELECT count(*) FROM restaged),
               (SELECT count(*) FROM newest n
                 WHERE NOT EXISTS (SELECT 1 FROM public.workspace_agents wa WHERE wa.id = n.agent_id))
          INTO rows_consumed, skipped_invalid, n_agents, agents_updated, deferred_locked, skipped_unknown;
        skipped_stale := n_agents - agents_updated - skipped_unknown - deferred_locked;
    END;

    INSERT INTO heartbeat.merge_state AS ms
           (singleton, last_merge_at, last_duration, rows_consumed, agents_updated, skipped_stale,
            skipped_unknown, skipped_invalid, deferred_locked, merges_total)
    VALUES (true, started, pg_catalog.clock_timestamp() - started, rows_consumed, agents_updated,
            skipped_stale, skipped_unknown, skipped_invalid, deferred_locked, 1)
    ON CONFLICT (singleton) DO UPDATE
       SET last_merge_at   = excluded.last_merge_at,
           last_duration   = excluded.last_duration,
           rows_consumed   = excluded.rows_consumed,
           agents_updated  = excluded.agents_updated,
           skipped_stale   = excluded.skipped_stale,
           skipped_unknown = excluded.skipped_unknown,
           skipped_invalid = excluded.skipped_invalid,
           deferred_locked = excluded.deferred_locked,
           merges_total    = ms.merges_total + 1;

    RETURN NEXT;
END
$merge$;

REVOKE ALL ON FUNCTION heartbeat.merge_agent_connections() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION heartbeat.merge_agent_connections() TO heartbeat_writer;
