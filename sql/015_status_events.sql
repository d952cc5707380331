-- pg-heartbeat 015: status changes as events (docs/events.md).
--
-- A transition between the statuses of heartbeat.agent_status() ('connecting',
-- 'connected', 'disconnected', 'timeout') becomes one row of
-- heartbeat.status_events, with a reason:
--   first_heartbeat     connecting | timeout -> connected
--   reconnect           disconnected -> connected
--   disconnect          connected -> disconnected: heartbeat.disconnect_agent(),
--                       heartbeat.disconnect_replica(), or a staged disconnect
--   inactivity          connected -> disconnected: no heartbeat within
--                       heartbeat.settings.inactive_timeout
--   connection_timeout  connecting -> timeout (connection_timeout_seconds)
--
-- Where they are detected:
--   * the merge and the direct writes compare each row before and after, in
--     the statement that changes it (the merge's steady path, where the
--     status does not change, only evaluates two CASE expressions per row);
--   * the sweep, heartbeat.sweep_status(), records the time-based ones. Every
--     status is evaluated at one instant, heartbeat.event_state.swept_through:
--     the sweep moves it forward (taking the event-state lock exclusively) and
--     records every agent whose status differs between the old and the new
--     instant; merges and direct writes hold the same lock shared and compare
--     before and after at the current instant. So the events of an agent always
--     describe its status at the sweep instants, and each transition is
--     recorded once, whatever runs concurrently. The merge sweeps at its end
--     when it runs in a transaction of its own (pg_cron, the client's merger,
--     a plain SELECT), never waiting for the lock; startMerger() also calls
--     sweep_status() after each merge. An episode shorter than the time between
--     two sweeps (about one merge interval) is not seen.
--
-- Ids are published in commit order: producers write heartbeat.status_events_pending
-- in their own transaction; heartbeat.publish_events() moves those rows into
-- heartbeat.status_events under an exclusive lock held to commit, numbering them
-- from a sequence. A reader that has seen id N never later finds a new event
-- with an id <= N, so "id > the last one seen" resumes without loss. After
-- publishing, NOTIFY pg_heartbeat_status_events, '<highest id>' (sent at commit).
--
-- Reading: heartbeat.status_events_after(after_id, max_events) and
-- heartbeat.status_events_head(), granted to heartbeat_reader and heartbeat_writer.
-- Retention: heartbeat.settings.event_retention (default 7 days); the sweep
-- purges older events, 10,000 at most per sweep, and status_events_after()
-- raises HBP01 for a reader that asks for events already purged.
SET LOCAL lock_timeout = '10s';

ALTER TABLE heartbeat.settings
    -- no heartbeat for this long: 'connected' becomes 'disconnected' (the default of agent_status())
    ADD COLUMN inactive_timeout interval NOT NULL DEFAULT interval '30 seconds'
        CHECK (inactive_timeout > interval '0'),
    -- status events are kept this long
    ADD COLUMN event_retention  interval NOT NULL DEFAULT interval '7 days'
        CHECK (event_retention >= interval '1 minute');

-- The status of an agent's row at instant `at`: the one definition, used by
-- agent_status(), the merge, the direct writes and the sweep. A plain SQL
-- expression, inlined into the statements that use it: STABLE, not IMMUTABLE,
-- because timestamptz - interval is STABLE (PostgreSQL does not inline an
-- IMMUTABLE function whose body is not). A last_connected_at beyond `horizon` is
-- no evidence of life.
CREATE FUNCTION heartbeat.status_at(
    first_connected_at          timestamptz,
    last_connected_at           timestamptz,
    disconnected_at             timestamptz,
    created_at                  timestamptz,
    connection_timeout_seconds  integer,
    at                          timestamptz,
    stale_before                timestamptz,   -- at - the inactive timeout
    horizon                     timestamptz
) RETURNS text
LANGUAGE sql
STABLE
PARALLEL SAFE
AS $status_at$
    SELECT CASE
               WHEN first_connected_at IS NULL THEN
                   CASE WHEN connection_timeout_seconds OPERATOR(pg_catalog.>) 0
                             AND created_at OPERATOR(pg_catalog.<)
                                 (at OPERATOR(pg_catalog.-) (connection_timeout_seconds
                                     OPERATOR(pg_catalog.*) '1 second'::pg_catalog.interval))
                        THEN 'timeout' ELSE 'connecting' END
               WHEN last_connected_at IS NULL OR disconnected_at OPERATOR(pg_catalog.>=) last_connected_at
                   THEN 'disconnected'
               WHEN last_connected_at OPERATOR(pg_catalog.<) stale_before
                   THEN 'disconnected'
               WHEN last_connected_at OPERATOR(pg_catalog.>) horizon
                   THEN 'disconnected'
               ELSE 'connected'
           END
$status_at$;
REVOKE ALL ON FUNCTION heartbeat.status_at(timestamptz, timestamptz, timestamptz, timestamptz, integer,
                                           timestamptz, timestamptz, timestamptz) FROM PUBLIC;

-- Why an agent went from `from_status` to `to_status`, given its row after the change.
CREATE FUNCTION heartbeat.event_reason(
    from_status text, to_status text, last_connected_at timestamptz, disconnected_at timestamptz
) RETURNS text
LANGUAGE sql
IMMUTABLE
PARALLEL SAFE
AS $reason$
    SELECT CASE to_status
               WHEN 'connected' THEN CASE WHEN from_status = 'disconnected' THEN 'reconnect' ELSE 'first_heartbeat' END
               WHEN 'timeout' THEN 'connection_timeout'
               WHEN 'disconnected' THEN
                   CASE WHEN disconnected_at IS NOT NULL
                             AND (last_connected_at IS NULL OR disconnected_at OPERATOR(pg_catalog.>=) last_connected_at)
                        THEN 'disconnect' ELSE 'inactivity' END
               ELSE 'changed'
           END
$reason$;
REVOKE ALL ON FUNCTION heartbeat.event_reason(text, text, timestamptz, timestamptz) FROM PUBLIC;

-- When a transition took effect, given the row after it and the instant it was seen at.
CREATE FUNCTION heartbeat.event_at(
    to_status text, reason text, last_connected_at timestamptz, disconnected_at timestamptz,
    created_at timestamptz, connection_timeout_seconds integer, inactive_timeout interval, seen_at timestamptz
) RETURNS timestamptz
LANGUAGE sql
STABLE
PARALLEL SAFE
AS $event_at$
    SELECT CASE
               WHEN to_status = 'connected' THEN COALESCE(last_connected_at, seen_at)
               WHEN reason = 'disconnect' THEN disconnected_at
               WHEN reason = 'inactivity' THEN
                   LEAST(COALESCE(last_connected_at OPERATOR(pg_catalog.+) inactive_timeout, seen_at), seen_at)
               WHEN reason = 'connection_timeout' THEN
                   created_at OPERATOR(pg_catalog.+) (connection_timeout_seconds OPERATOR(pg_catalog.*) '1 second'::pg_catalog.interval)
               ELSE seen_at
           END
$event_at$;
REVOKE ALL ON FUNCTION heartbeat.event_at(text, text, timestamptz, timestamptz, timestamptz, integer, interval, timestamptz) FROM PUBLIC;

-- The published events. LOGGED: they survive a crash, and a consumer resumes after the last id it saw.
CREATE TABLE heartbeat.status_events (
    id              bigint      PRIMARY KEY,
    agent_id        uuid        NOT NULL,
    from_status     text        NOT NULL,
    to_status       text        NOT NULL,
    reason          text        NOT NULL,
    at              timestamptz NOT NULL,   -- when the transition took effect
    recorded_at     timestamptz NOT NULL,   -- when the statement that found it ran
    published_at    timestamptz NOT NULL    -- when it was numbered (retention counts from here)
);
REVOKE ALL ON heartbeat.status_events FROM PUBLIC;
CREATE SEQUENCE heartbeat.status_event_id AS bigint;
REVOKE ALL ON SEQUENCE heartbeat.status_event_id FROM PUBLIC;

-- Events recorded by transactions that have not published them yet.
CREATE TABLE heartbeat.status_events_pending (
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    agent_id        uuid        NOT NULL,
    from_status     text        NOT NULL,
    to_status       text        NOT NULL,
    reason          text        NOT NULL,
    at              timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    xid             xid8        NOT NULL DEFAULT pg_catalog.pg_current_xact_id()
);
REVOKE ALL ON heartbeat.status_events_pending FROM PUBLIC;

-- The sweep's state: the instant every status is evaluated at, and the retention horizon.
CREATE TABLE heartbeat.event_state (
    singleton       boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    swept_through   timestamptz NOT NULL,   -- statuses are evaluated at this instant
    swept_timeout   interval    NOT NULL,   -- the inactive_timeout that instant was evaluated with
    last_sweep_at   timestamptz,            -- when a sweep last ran (NULL: never)
    purged_through  bigint      NOT NULL DEFAULT 0   -- every event with id <= this was purged
);
INSERT INTO heartbeat.event_state (swept_through, swept_timeout)
SELECT pg_catalog.now(), s.inactive_timeout FROM heartbeat.settings s;
REVOKE ALL ON heartbeat.event_state FROM PUBLIC;

-- The instant statuses are evaluated at, for a merge or a direct write: takes the
-- event-state lock shared (until the end of the transaction; the sweep takes it
-- exclusively), then reads it. Outside READ COMMITTED the row is read FOR SHARE,
-- so that a sweep committed after the transaction's snapshot fails it with 40001
-- instead of recording a transition twice.
CREATE FUNCTION heartbeat.event_clock(
    OUT at timestamptz, OUT inactive_timeout interval, OUT horizon timestamptz, OUT stale_before timestamptz
)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $clock$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(1751474802, 3);
    IF pg_catalog.current_setting('transaction_isolation') = 'read committed' THEN
        SELECT e.swept_through, e.swept_timeout INTO at, inactive_timeout FROM heartbeat.event_state e;
    ELSE
        SELECT e.swept_through, e.swept_timeout INTO at, inactive_timeout FROM heartbeat.event_state e FOR SHARE;
    END IF;
    horizon := at + (SELECT s.max_clock_skew FROM heartbeat.settings s);
    stale_before := at - inactive_timeout;
END
$clock$;
REVOKE ALL ON FUNCTION heartbeat.event_clock() FROM PUBLIC;

-- Numbers the pending events and publishes them: under an exclusive lock held
-- until commit, so ids become visible in order. Waits at most 500 ms for the lock
-- (another transaction publishing, about to commit); on a timeout the rows stay
-- pending and the next publication takes them (the next sweep, within one merge
-- interval). Outside READ COMMITTED only this transaction's own rows are taken.
-- Returns how many were published.
CREATE FUNCTION heartbeat.publish_events()
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '500ms'
AS $publish$
DECLARE
    n       bigint;
    top     bigint;
    own     boolean := pg_catalog.current_setting('transaction_isolation') <> 'read committed';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM heartbeat.status_events_pending) THEN
        RETURN 0;
    END IF;
    BEGIN
        PERFORM pg_catalog.pg_advisory_xact_lock(1751474802, 4);
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    WITH moved AS (
        DELETE FROM heartbeat.status_events_pending p
         WHERE NOT own OR p.xid = pg_catalog.pg_current_xact_id()
        RETURNING p.*
    ), numbered AS (
        INSERT INTO heartbeat.status_events AS e
               (id, agent_id, from_status, to_status, reason, at, recorded_at, published_at)
        SELECT pg_catalog.nextval('heartbeat.status_event_id'), m.agent_id, m.from_status, m.to_status,
               m.reason, m.at, m.recorded_at, pg_catalog.clock_timestamp()
          FROM (SELECT * FROM moved ORDER BY moved.seq OFFSET 0) m
        RETURNING e.id
    )
    SELECT pg_catalog.count(*), pg_catalog.max(x.id) INTO n, top FROM numbered x;
    IF n > 0 THEN
        PERFORM pg_catalog.pg_notify('pg_heartbeat_status_events', top::text);
    END IF;
    RETURN n;
END
$publish$;
REVOKE ALL ON FUNCTION heartbeat.publish_events() FROM PUBLIC;

-- Purges events older than the retention, at most 10,000 per call.
CREATE FUNCTION heartbeat.purge_events()
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $purge$
DECLARE
    cutoff  timestamptz := pg_catalog.now() - (SELECT s.event_retention FROM heartbeat.settings s);
    bound   bigint;
    n       bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM (SELECT e.published_at FROM heartbeat.status_events e ORDER BY e.id LIMIT 1) o
                    WHERE o.published_at < cutoff) THEN
        RETURN 0;
    END IF;
    SELECT pg_catalog.max(o.id) INTO bound
      FROM (SELECT e.id, e.published_at FROM heartbeat.status_events e ORDER BY e.id LIMIT 10000) o
     WHERE o.published_at < cutoff;
    DELETE FROM heartbeat.status_events e WHERE e.id <= bound;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE heartbeat.event_state SET purged_through = GREATEST(purged_through, bound);
    RETURN n;
END
$purge$;
REVOKE ALL ON FUNCTION heartbeat.purge_events() FROM PUBLIC;

-- The event-state lock, exclusively, waiting at most 250 ms in the queue: merges and
-- direct writes hold it shared for a statement each, so the queue drains quickly, and
-- the new ones that queue behind this request wait no longer than that.
CREATE FUNCTION heartbeat.event_lock_briefly()
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '250ms'
AS $lock$
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(1751474802, 3);
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END
$lock$;
REVOKE ALL ON FUNCTION heartbeat.event_lock_briefly() FROM PUBLIC;

-- The sweep: moves the evaluation instant to now and records every agent whose
-- status differs between the two instants (inactivity, connection timeouts),
-- then purges and publishes. `wait`: queue for the event-state lock (three times
-- 250 ms at most, or 2 s when the last sweep is more than 10 s old) instead of
-- skipping when merges or direct writes hold it. Skips when the last sweep ran less than
-- one second ago. Returns the events it recorded (NULL when skipped).
CREATE FUNCTION heartbeat.sweep_events(wait boolean)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $sweep$
DECLARE
    st      record;
    t1      timestamptz;
    tmo1    interval;
    skew    interval;
    n       bigint;
    got     boolean := false;
    -- the window, computed once (per row, each subtraction would be evaluated again)
    stale0  timestamptz;
    stale1  timestamptz;
    future0 timestamptz;
    retimed boolean;
BEGIN
    SELECT e.swept_through, e.last_sweep_at INTO st FROM heartbeat.event_state e;
    IF st.last_sweep_at > pg_catalog.clock_timestamp() - interval '1 second' THEN
        RETURN NULL;
    END IF;
    got := pg_catalog.pg_try_advisory_xact_lock(1751474802, 3);
    IF NOT got AND wait THEN
        -- never queue behind merges for long (a waiting exclusive request holds up new shared ones);
        -- between tries, let what queued behind us through
        FOR i IN 1 .. 3 LOOP
            got := heartbeat.event_lock_briefly();
            EXIT WHEN got;
            PERFORM pg_catalog.pg_sleep(0.02);
        END LOOP;
        IF NOT got AND st.swept_through < pg_catalog.clock_timestamp() - interval '10 seconds' THEN
            -- starved: wait in the queue, at most 2 s
            BEGIN
                PERFORM pg_catalog.pg_advisory_xact_lock(1751474802, 3);  -- the caller's lock_timeout (2 s)
                got := true;
            EXCEPTION WHEN lock_not_available THEN
                got := false;
            END;
        END IF;
    END IF;
    IF NOT got THEN
        RETURN NULL;
    END IF;
    -- holding the lock: no merge or direct write is between reading the instant and changing a row
    SELECT e.swept_through, e.swept_timeout, e.last_sweep_at INTO st FROM heartbeat.event_state e;
    t1 := pg_catalog.clock_timestamp();
    IF st.last_sweep_at > t1 - interval '1 second' OR t1 <= st.swept_through THEN
        RETURN NULL;
    END IF;
    SELECT s.inactive_timeout, s.max_clock_skew INTO tmo1, skew FROM heartbeat.settings s;
    stale0 := st.swept_through - tmo1;
    stale1 := t1 - tmo1;
    future0 := st.swept_through + skew;
    retimed := st.swept_timeout <> tmo1;

    INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
    SELECT x.id, x.s0, x.s1, x.reason,
           heartbeat.event_at(x.s1, x.reason, x.last_connected_at, x.disconnected_at, x.created_at,
                              x.connection_timeout_seconds, tmo1, t1)
      FROM (SELECT wa.id, wa.last_connected_at, wa.disconnected_at, wa.created_at, wa.connection_timeout_seconds,
                   a.s0, a.s1, heartbeat.event_reason(a.s0, a.s1, wa.last_connected_at, wa.disconnected_at) AS reason
              FROM public.workspace_agents wa,
                   LATERAL (SELECT heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                                       wa.created_at, wa.connection_timeout_seconds,
                                                       st.swept_through, st.swept_through - st.swept_timeout,
                                                       future0) AS s0,
                                   heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                                       wa.created_at, wa.connection_timeout_seconds,
                                                       t1, t1 - tmo1, t1 + skew) AS s1) a
             -- what can change with time alone (cheap comparisons first; everything when the timeout changed)
             WHERE (retimed
                    OR (wa.first_connected_at IS NULL AND wa.connection_timeout_seconds > 0)
                    OR (wa.last_connected_at >= stale0 AND wa.last_connected_at < stale1)
                    OR wa.last_connected_at > future0)
               AND a.s0 <> a.s1) x;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE heartbeat.event_state SET swept_through = t1, swept_timeout = tmo1, last_sweep_at = t1;
    PERFORM heartbeat.purge_events();
    PERFORM heartbeat.publish_events();
    RETURN n;
END
$sweep$;
REVOKE ALL ON FUNCTION heartbeat.sweep_events(boolean) FROM PUBLIC;

-- The sweep for callers: what startMerger() runs after each merge, and what a
-- scheduler of its own should run after heartbeat.merge_agent_connections()
-- when that does not run in a transaction of its own. READ COMMITTED only (the
-- sweep must see what was committed while it waited for its lock). Returns the
-- events recorded, NULL when it skipped (swept less than a second ago, or merges
-- held the lock).
CREATE FUNCTION heartbeat.sweep_status()
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $sweep_status$
BEGIN
    PERFORM heartbeat.assert_definer();
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'heartbeat.sweep_status() must run in a READ COMMITTED transaction, not %',
            pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = '25001',
                  HINT = 'BEGIN ISOLATION LEVEL READ COMMITTED; SELECT heartbeat.sweep_status(); COMMIT;';
    END IF;
    RETURN heartbeat.sweep_events(true);
END
$sweep_status$;

-- Events after `after_id`, in id order, at most `max_events`. Raises HBP01 when
-- events after `after_id` were purged (the reader has lost some). One snapshot:
-- a purge either happened before it (HBP01) or not at all.
CREATE FUNCTION heartbeat.status_events_after(after_id bigint, max_events integer DEFAULT 1000)
RETURNS TABLE (
    id              bigint,
    agent_id        uuid,
    from_status     text,
    to_status       text,
    reason          text,
    at              timestamptz,
    recorded_at     timestamptz
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $after$
DECLARE
    purged bigint;
BEGIN
    IF after_id IS NULL OR after_id < 0 OR max_events IS NULL OR max_events < 1 THEN
        RAISE EXCEPTION 'heartbeat.status_events_after: after_id must be >= 0 and max_events >= 1, not % and %',
            COALESCE(after_id::text, 'NULL'), COALESCE(max_events::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    SELECT e.purged_through INTO purged FROM heartbeat.event_state e;
    IF after_id < purged THEN
        RAISE EXCEPTION 'heartbeat.status_events_after: events after % were purged (retention); the oldest kept follows %',
            after_id, purged
            USING ERRCODE = 'HBP01',
                  HINT = 'Events were lost to this reader: resync from heartbeat.agent_status(), then read after heartbeat.status_events_head().';
    END IF;
    RETURN QUERY
    SELECT e.id, e.agent_id, e.from_status, e.to_status, e.reason, e.at, e.recorded_at
      FROM heartbeat.status_events e
     WHERE e.id > after_id
     ORDER BY e.id
     LIMIT max_events;
END
$after$;
REVOKE ALL ON FUNCTION heartbeat.status_events_after(bigint, integer) FROM PUBLIC;

-- The highest published id (0 when none): read after it to watch from now on.
CREATE FUNCTION heartbeat.status_events_head()
RETURNS bigint
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $head$
    SELECT GREATEST(COALESCE((SELECT pg_catalog.max(e.id) FROM heartbeat.status_events e), 0),
                    (SELECT s.purged_through FROM heartbeat.event_state s))
$head$;
REVOKE ALL ON FUNCTION heartbeat.status_events_head() FROM PUBLIC;
