-- pg-heartbeat 016: the merge and the direct writes record status changes
-- (sql/015, docs/events.md).
--
-- The functions of sql/010 and sql/011 again, with one addition each: every
-- status is evaluated at the sweep's instant (heartbeat.event_clock(), which
-- also takes the event-state lock shared), and a row whose status the statement
-- changes gets an event, in the same statement as the change:
--   * the merge's fast path updates the agents whose status does not change
--     (the steady state: two CASE expressions per row more than before); the
--     others are locked, read, updated and recorded by a second step of the
--     same statement, which the steady state skips;
--   * the slow path (heartbeat.apply_snapshots) reads the status before from
--     the rows it locks;
--   * heartbeat.disconnect_agent() locks its row first, and
--     heartbeat.disconnect_replica() reads the status from the rows it locks
--     (and never plans a nested loop: see its SET clause);
--   * at their end the merge functions sweep (heartbeat.merge_epilogue) when
--     they run in a transaction of their own, and publish.
-- Their rules, results and signatures are unchanged, except merge_result's new
-- last attribute status_events (events this call recorded).
SET LOCAL lock_timeout = '10s';

ALTER TYPE heartbeat.merge_result ADD ATTRIBUTE status_events bigint;  -- events this call recorded (its sweep's too)
ALTER TYPE heartbeat.merge_result ADD ATTRIBUTE status_swept boolean;  -- this call swept, or a sweep ran less than 1 s ago

-- Records the change of one agent's status made by the current transaction
-- (the direct writes): `old_status` as read from the locked row before.
CREATE FUNCTION heartbeat.record_change(
    agent uuid, old_status text, ev_at timestamptz, ev_timeout interval, ev_horizon timestamptz
) RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $record$
DECLARE
    n           bigint;
    ev_stale    timestamptz := ev_at - ev_timeout;
BEGIN
    INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
    SELECT x.id, old_status, x.new_status, x.reason,
           heartbeat.event_at(x.new_status, x.reason, x.last_connected_at, x.disconnected_at,
                              x.created_at, x.connection_timeout_seconds, ev_timeout, ev_at)
      FROM (SELECT s.*, heartbeat.event_reason(old_status, s.new_status, s.last_connected_at, s.disconnected_at) AS reason
              FROM (SELECT wa.id, wa.last_connected_at, wa.disconnected_at, wa.created_at, wa.connection_timeout_seconds,
                           heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                               wa.created_at, wa.connection_timeout_seconds,
                                               ev_at, ev_stale, ev_horizon) AS new_status
                      FROM public.workspace_agents wa
                     WHERE wa.id = agent) s
             WHERE s.new_status <> old_status) x;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM heartbeat.publish_events();
    END IF;
    RETURN n;
END
$record$;
REVOKE ALL ON FUNCTION heartbeat.record_change(uuid, text, timestamptz, interval, timestamptz) FROM PUBLIC;

-- The end of a merge call: sweep when the call is a transaction of its own (a
-- plain SELECT, pg_cron, the client's merger; or a transaction a procedure
-- began after a COMMIT, as heartbeat.merge_loop() does), never waiting for the
-- lock and not while a backlog drains; then publish what was recorded. Inside a
-- longer transaction it does not sweep: the sweep's exclusive lock would be held
-- until that transaction ends.
-- Returns the events the sweep recorded, and whether statuses are swept up to
-- now (this sweep ran, or one ran less than a second ago): the client then
-- needs no sweep of its own.
CREATE FUNCTION heartbeat.merge_epilogue(more boolean, OUT swept_events bigint, OUT swept boolean)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $epilogue$
BEGIN
    swept_events := 0;
    swept := false;
    IF NOT more AND pg_catalog.transaction_timestamp() >= pg_catalog.statement_timestamp() THEN
        swept_events := heartbeat.sweep_events(false);
        swept := swept_events IS NOT NULL
                 OR EXISTS (SELECT 1 FROM heartbeat.event_state e
                             WHERE e.last_sweep_at > pg_catalog.clock_timestamp() - interval '1 second');
        swept_events := COALESCE(swept_events, 0);
    END IF;
    PERFORM heartbeat.publish_events();
END
$epilogue$;
REVOKE ALL ON FUNCTION heartbeat.merge_epilogue(boolean) FROM PUBLIC;

-- The new signatures replace those of sql/010.
DROP FUNCTION heartbeat.merge_prelude(integer);
CREATE FUNCTION heartbeat.apply_snapshots(
    batch           heartbeat.snapshot[],
    ev_at           timestamptz,
    ev_timeout      interval,
    ev_horizon      timestamptz,
    OUT agents_updated  bigint,
    OUT skipped_stale   bigint,
    OUT skipped_unknown bigint,
    OUT deferred_locked bigint,
    OUT dead_lettered   bigint,
    OUT status_events   bigint
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
    ev_stale    timestamptz := ev_at - ev_timeout;   -- 'connected' needs a heartbeat since then
BEGIN
    agents_updated := 0; skipped_stale := 0; skipped_unknown := 0; deferred_locked := 0; dead_lettered := 0;
    status_events := 0;
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
            -- the status before, from the row as locked
            SELECT wa.id, heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                              wa.created_at, wa.connection_timeout_seconds,
                                              ev_at, ev_stale, ev_horizon) AS old_status
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
            RETURNING wa.id, l.old_status, wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                      wa.created_at, wa.connection_timeout_seconds
        ), earlier_first AS (
            UPDATE public.workspace_agents AS wa
               SET first_connected_at = t.first_connected_at
              FROM targets t
              JOIN lockable l ON l.id = t.agent_id
             WHERE wa.id = t.agent_id
               AND NOT t.newer
               AND t.first_connected_at < COALESCE(wa.first_connected_at, 'infinity')
            RETURNING wa.id, l.old_status, wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                      wa.created_at, wa.connection_timeout_seconds
        ), events AS (
            INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
            SELECT c.id, c.old_status, c.new_status, c.reason,
                   heartbeat.event_at(c.new_status, c.reason, c.last_connected_at, c.disconnected_at,
                                      c.created_at, c.connection_timeout_seconds, ev_timeout, ev_at)
              FROM (SELECT x.*, heartbeat.event_reason(x.old_status, x.new_status, x.last_connected_at, x.disconnected_at) AS reason
                      FROM (SELECT u.*, heartbeat.status_at(u.first_connected_at, u.last_connected_at, u.disconnected_at,
                                                           u.created_at, u.connection_timeout_seconds,
                                                           ev_at, ev_stale, ev_horizon) AS new_status
                              FROM (SELECT * FROM updated UNION ALL SELECT * FROM earlier_first) u) x
                     WHERE x.old_status <> x.new_status) c
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
               (SELECT pg_catalog.count(*) FROM earlier_first),
               (SELECT pg_catalog.count(*) FROM events)
          INTO n_known, agents_updated, deferred_locked, n_earlier, status_events;
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
    left_half := heartbeat.apply_snapshots(batch[1:half], ev_at, ev_timeout, ev_horizon);
    right_half := heartbeat.apply_snapshots(batch[half + 1:n_batch], ev_at, ev_timeout, ev_horizon);
    agents_updated  := left_half.agents_updated  + right_half.agents_updated;
    skipped_stale   := left_half.skipped_stale   + right_half.skipped_stale;
    skipped_unknown := left_half.skipped_unknown + right_half.skipped_unknown;
    deferred_locked := left_half.deferred_locked + right_half.deferred_locked;
    dead_lettered   := left_half.dead_lettered   + right_half.dead_lettered;
    status_events   := left_half.status_events   + right_half.status_events;
END
$apply$;
REVOKE ALL ON FUNCTION heartbeat.apply_snapshots(heartbeat.snapshot[], timestamptz, interval, timestamptz) FROM PUBLIC;

CREATE FUNCTION heartbeat.merge_part(
    part            integer,
    relname         name,
    budget          integer,
    min_interval    interval,
    horizon         timestamptz,
    merger          text,
    ev_at           timestamptz,
    ev_timeout      interval,
    ev_horizon      timestamptz
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
    res.skipped_invalid := 0; res.deferred_locked := 0; res.dead_lettered := 0; res.status_events := 0;
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
            -- the steady path: snapshots that do not change the agent's status (every
            -- status is evaluated at the sweep's instant $3, heartbeat.event_clock())
            UPDATE public.workspace_agents AS wa
               SET first_connected_at        = LEAST(wa.first_connected_at, n.first_connected_at),
                   last_connected_at         = n.last_connected_at,
                   last_connected_replica_id = n.last_connected_replica_id,
                   disconnected_at           = n.disconnected_at,
                   updated_at                = n.updated_at
              FROM newest n
             WHERE wa.id = n.agent_id
               AND wa.updated_at < n.updated_at
               AND heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                       wa.created_at, wa.connection_timeout_seconds, $3, $6, $5)
                 = heartbeat.status_at(LEAST(wa.first_connected_at, n.first_connected_at), n.last_connected_at,
                                       n.disconnected_at, wa.created_at, wa.connection_timeout_seconds, $3, $6, $5)
            RETURNING wa.id
        ), counts AS (
            SELECT k.n_consumed, k.n_invalid,
                   (SELECT pg_catalog.count(*) FROM newest) AS n_newest,
                   (SELECT pg_catalog.count(*) FROM updated) AS n_updated
              FROM (SELECT pg_catalog.count(*) AS n_consumed,
                           pg_catalog.count(*) FILTER (WHERE NOT c.valid) AS n_invalid
                      FROM consumed c) k
            OFFSET 0
        ), rest AS MATERIALIZED (
            -- what the steady path left: unknown or stale agents, an earlier first_connected_at,
            -- a change of status (only looked at when some agent was left: the steady state skips it)
            SELECT n.* FROM newest n
             WHERE (SELECT c.n_newest > c.n_updated FROM counts c)
               AND NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
        ), known AS MATERIALIZED (
            -- the rows to change, locked, with their status before (from the row as locked). NOWAIT:
            -- the steady path above already holds row locks taken in id order; waiting here for more
            -- (a second pass, in id order again) could deadlock with disconnect_replica, which locks
            -- in id order too. A locked row sends the merge to the slow path (55P03), which defers it.
            SELECT r.*, (o.updated_at < r.updated_at) AS newer,
                   heartbeat.status_at(o.first_connected_at, o.last_connected_at, o.disconnected_at,
                                       o.created_at, o.connection_timeout_seconds, $3, $6, $5) AS old_status
              FROM rest r
              JOIN public.workspace_agents o ON o.id = r.agent_id
             WHERE o.updated_at < r.updated_at
                OR r.first_connected_at < COALESCE(o.first_connected_at, 'infinity')
               FOR NO KEY UPDATE OF o NOWAIT
        ), changed AS (
            -- a newer snapshot, or only an earlier first_connected_at (a snapshot too old to
            -- apply still tells when the agent first connected)
            UPDATE public.workspace_agents AS wa
               SET first_connected_at        = LEAST(wa.first_connected_at, k.first_connected_at),
                   last_connected_at         = CASE WHEN k.newer THEN k.last_connected_at ELSE wa.last_connected_at END,
                   last_connected_replica_id = CASE WHEN k.newer THEN k.last_connected_replica_id
                                                    ELSE wa.last_connected_replica_id END,
                   disconnected_at           = CASE WHEN k.newer THEN k.disconnected_at ELSE wa.disconnected_at END,
                   updated_at                = CASE WHEN k.newer THEN k.updated_at ELSE wa.updated_at END
              FROM known k
             WHERE wa.id = k.agent_id
            RETURNING wa.id, k.newer, k.old_status,
                      heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                          wa.created_at, wa.connection_timeout_seconds, $3, $6, $5) AS new_status,
                      wa.last_connected_at, wa.disconnected_at, wa.created_at, wa.connection_timeout_seconds
        ), events AS (
            INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
            SELECT x.id, x.old_status, x.new_status, x.reason,
                   heartbeat.event_at(x.new_status, x.reason, x.last_connected_at, x.disconnected_at,
                                      x.created_at, x.connection_timeout_seconds, $4, $3)
              FROM (SELECT c.*, heartbeat.event_reason(c.old_status, c.new_status, c.last_connected_at,
                                                       c.disconnected_at) AS reason
                      FROM changed c
                     WHERE c.old_status <> c.new_status) x
            RETURNING 1
        )
        SELECT c.n_consumed, c.n_invalid, c.n_newest,
               c.n_updated + (SELECT pg_catalog.count(*) FROM changed ch WHERE ch.newer),
               CASE WHEN c.n_newest > c.n_updated THEN
                   (SELECT pg_catalog.count(*) FROM rest r
                     WHERE NOT EXISTS (SELECT 1 FROM public.workspace_agents wa
                                        WHERE wa.id = r.agent_id))
               ELSE 0 END,
               (SELECT pg_catalog.count(*) FROM events)
          FROM counts c
        $fast$, relname)
          INTO res.rows_consumed, res.skipped_invalid, n_agents, res.agents_updated, res.skipped_unknown,
               res.status_events
         USING horizon, budget, ev_at, ev_timeout, ev_horizon, ev_at - ev_timeout;
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
            slow := heartbeat.apply_snapshots(batch, ev_at, ev_timeout, ev_horizon);
            res.agents_updated  := slow.agents_updated;
            res.skipped_stale   := slow.skipped_stale;
            res.skipped_unknown := slow.skipped_unknown;
            res.deferred_locked := slow.deferred_locked;
            res.dead_lettered   := slow.dead_lettered;
            res.status_events   := slow.status_events;
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
REVOKE ALL ON FUNCTION heartbeat.merge_part(integer, name, integer, interval, timestamptz, text,
                                            timestamptz, interval, timestamptz) FROM PUBLIC;

CREATE FUNCTION heartbeat.merge_prelude(
    max_rows integer, OUT budget integer, OUT horizon timestamptz,
    OUT ev_at timestamptz, OUT ev_timeout interval, OUT ev_horizon timestamptz
)
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
    -- the instant statuses are evaluated at (the event-state lock, shared, until commit)
    SELECT c.at, c.inactive_timeout, c.horizon INTO ev_at, ev_timeout, ev_horizon FROM heartbeat.event_clock() c;
END
$prelude$;
REVOKE ALL ON FUNCTION heartbeat.merge_prelude(integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION heartbeat.merge_agent_connections(
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
    ep      record;
BEGIN
    pre := heartbeat.merge_prelude(max_rows);
    SELECT pg_catalog.count(*) INTO n_parts FROM heartbeat.staging_parts();
    total := ROW(0, 0, 0, 0, 0, 0, false, 0, n_parts, 0, 0, 0, '{}', false, NULL, NULL, NULL, 0, false)::heartbeat.merge_result;
    FOR p IN SELECT * FROM heartbeat.staging_parts() LOOP
        r := heartbeat.merge_part(p.part, p.relname,
                                  GREATEST(1, pg_catalog.ceil(pre.budget::numeric / n_parts)::integer),
                                  min_interval, pre.horizon, merger, pre.ev_at, pre.ev_timeout, pre.ev_horizon);
        total.rows_consumed   := total.rows_consumed   + r.rows_consumed;
        total.agents_updated  := total.agents_updated  + r.agents_updated;
        total.skipped_stale   := total.skipped_stale   + r.skipped_stale;
        total.skipped_unknown := total.skipped_unknown + r.skipped_unknown;
        total.skipped_invalid := total.skipped_invalid + r.skipped_invalid;
        total.deferred_locked := total.deferred_locked + r.deferred_locked;
        total.dead_lettered   := total.dead_lettered   + r.dead_lettered;
        total.status_events   := total.status_events   + r.status_events;
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
    ep := heartbeat.merge_epilogue(total.more);
    total.status_events := total.status_events + ep.swept_events;
    total.status_swept := ep.swept;
    total.duration := pg_catalog.clock_timestamp() - started;
    RETURN NEXT total;
END
$merge$;

CREATE OR REPLACE FUNCTION heartbeat.merge_staging_part(
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
    res         heartbeat.merge_result;
    ep          record;
BEGIN
    pre := heartbeat.merge_prelude(max_rows);
    SELECT s.relname INTO part_name FROM heartbeat.staging_parts() s WHERE s.part = merge_staging_part.part;
    IF part_name IS NULL THEN
        SELECT pg_catalog.count(*) INTO n_parts FROM heartbeat.staging_parts();
        RAISE EXCEPTION 'heartbeat.merge_staging_part: staging has parts 0 to %, not %', n_parts - 1, part
            USING ERRCODE = '22023';
    END IF;
    res := heartbeat.merge_part(part, part_name, pre.budget, min_interval, pre.horizon, merger,
                                pre.ev_at, pre.ev_timeout, pre.ev_horizon);
    ep := heartbeat.merge_epilogue(res.more);
    res.status_events := res.status_events + ep.swept_events;
    res.status_swept := ep.swept;
    RETURN NEXT res;
END
$merge_one$;

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
DECLARE
    clk         record;
    old_status  text;
    applied     boolean;
BEGIN
    PERFORM heartbeat.assert_definer();
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_agent: agent_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    PERFORM heartbeat.check_times('heartbeat.disconnect_agent', $2, $3, $5, $6);
    clk := heartbeat.event_clock();
    -- the row as it is before, locked (at most lock_timeout)
    SELECT heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at, wa.created_at,
                               wa.connection_timeout_seconds, clk.at, clk.stale_before, clk.horizon)
      INTO old_status
      FROM public.workspace_agents wa WHERE wa.id = $1
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;

    UPDATE public.workspace_agents AS wa
       SET disconnected_at           = $2,
           updated_at                = $3,
           last_connected_replica_id = COALESCE($4, wa.last_connected_replica_id),
           first_connected_at        = LEAST(wa.first_connected_at, $5),
           last_connected_at         = COALESCE($6, wa.last_connected_at)
     WHERE wa.id = $1
       AND wa.updated_at < $3;
    applied := FOUND;
    IF NOT applied AND $5 IS NOT NULL THEN
        -- too old to apply, but it may still know an earlier first connection
        UPDATE public.workspace_agents AS wa
           SET first_connected_at = $5
         WHERE wa.id = $1
           AND $5 < COALESCE(wa.first_connected_at, 'infinity');
    END IF;
    PERFORM heartbeat.record_change($1, old_status, clk.at, clk.inactive_timeout, clk.horizon);
    RETURN applied;
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
-- Never a nested loop: the replica's rows were just written (its statistics say one row),
-- and staging can hold many dead pages between vacuums; a nested-loop anti-join then scans
-- staging once per victim (12 s for 10,000 agents, measured), holding their row locks.
-- Hash joins make it one pass over each (0.35 s).
SET enable_nestloop = off
AS $disconnect_replica$
DECLARE
    n       bigint;
    n_ev    bigint;
    clk     record;
BEGIN
    PERFORM heartbeat.assert_definer();
    IF $1 IS NULL OR $2 IS NULL OR $3 IS NULL THEN
        RAISE EXCEPTION 'heartbeat.disconnect_replica: replica_id, disconnected_at and updated_at must not be NULL'
            USING ERRCODE = '22004';  -- null_value_not_allowed
    END IF;
    PERFORM heartbeat.check_times('heartbeat.disconnect_replica', $2, $3);
    clk := heartbeat.event_clock();

    FOR attempt IN 1 .. 5 LOOP
        BEGIN
            WITH victims AS MATERIALIZED (
                SELECT wa.id,
                       heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                           wa.created_at, wa.connection_timeout_seconds,
                                           clk.at, clk.stale_before, clk.horizon) AS old_status
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
            ), disconnected AS (
                UPDATE public.workspace_agents AS wa
                   SET disconnected_at = $2,
                       updated_at      = $3
                  FROM victims v
                 WHERE wa.id = v.id
                   -- re-checked on the row as locked: it may have changed meanwhile
                   AND wa.last_connected_replica_id = $1
                   AND (wa.disconnected_at IS NULL OR wa.disconnected_at < wa.last_connected_at)
                   AND wa.updated_at < $3
                RETURNING wa.id, v.old_status, wa.last_connected_at, wa.disconnected_at, wa.created_at,
                          wa.connection_timeout_seconds,
                          heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                              wa.created_at, wa.connection_timeout_seconds,
                                              clk.at, clk.stale_before, clk.horizon) AS new_status
            ), events AS (
                INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
                SELECT x.id, x.old_status, x.new_status, x.reason,
                       heartbeat.event_at(x.new_status, x.reason, x.last_connected_at, x.disconnected_at,
                                          x.created_at, x.connection_timeout_seconds, clk.inactive_timeout, clk.at)
                  FROM (SELECT d.*, heartbeat.event_reason(d.old_status, d.new_status, d.last_connected_at,
                                                           d.disconnected_at) AS reason
                          FROM disconnected d
                         WHERE d.old_status <> d.new_status) x
                RETURNING 1
            )
            SELECT (SELECT pg_catalog.count(*) FROM disconnected), (SELECT pg_catalog.count(*) FROM events)
              INTO n, n_ev;
            IF n_ev > 0 THEN
                PERFORM heartbeat.publish_events();
            END IF;
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

DROP FUNCTION heartbeat.merge_part(integer, name, integer, interval, timestamptz, text);
DROP FUNCTION heartbeat.apply_snapshots(heartbeat.snapshot[]);

-- agent_status(): the same rules, now the one definition heartbeat.status_at()
-- (at now(), with the horizon heartbeat.clock_horizon()).
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
DECLARE
    horizon timestamptz := heartbeat.clock_horizon();
BEGIN
    PERFORM heartbeat.assert_definer();
    IF $1 IS NULL OR $1 <= interval '0' THEN
        RAISE EXCEPTION 'heartbeat.agent_status: inactive_timeout must be a positive interval, not %',
            COALESCE($1::text, 'NULL')
            USING ERRCODE = '22023';  -- invalid_parameter_value
    END IF;
    RETURN QUERY
    SELECT wa.id,
           heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at, wa.created_at,
                               wa.connection_timeout_seconds, pg_catalog.now(), pg_catalog.now() - $1, horizon),
           wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
           wa.last_connected_replica_id, wa.updated_at
      FROM public.workspace_agents wa
     WHERE $2 IS NULL OR wa.id = ANY ($2);
END
$agent_status$;
