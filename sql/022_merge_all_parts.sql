-- pg-heartbeat 022: a merge over every part is one statement when the backlog is small.
--
-- heartbeat.merge_agent_connections() merged the parts of staging one after another, each
-- with its own statement built by EXECUTE format(): parsed and planned anew for every part of
-- every call (about 1 ms each), with its own lock, bookkeeping row and fixed costs. A small
-- fleet paid that once per part for a few hundred rows each (10,000 agents, 4 parts: an empty
-- merge cost 14.3 ms on CPU, 9.8 ms now). Now the call first tries heartbeat.merge_all_parts(): every part's lock
-- (never waiting), then one static statement over the partitioned parent, planned once per
-- session, that consumes every staged row its snapshot sees when they are no more than the
-- call's budget. It falls back to the part-by-part merge of sql/016 (unchanged) when
--   * a part is locked by another merger ('busy'), or another merger merged a part within
--     min_interval ('recent'): the per-part merge skips exactly those parts, as before;
--   * more rows are staged than the budget ('backlog'): each part gets its share, as before;
--   * a row lock could not be taken within lock_timeout, or a deadlock ('locked'): the
--     per-part merges then wait at most 100 ms for row locks (the call already waited
--     lock_timeout once) and defer what is still locked (slow path);
--   * a snapshot could not be applied, a constraint or trigger of the user's table ('error'):
--     the per-part merges find the offending part again and dead-letter its rows (slow path).
-- The statement's work is rolled back before any fallback (a subtransaction), so nothing is
-- consumed twice. Rules, lock order and results are those of the per-part merge:
--   * rows are locked part by part, in id order within a part (the order disconnect_replica()
--     takes them, sql/020): the snapshots are sorted by (part, agent_id) and joined by a
--     nested loop (hash and merge joins are off for this function);
--   * merge_state gets one row per part, with that part's own counts; every part of the call
--     has the same last_merge_at and last_duration (those of the call).
-- Signature and results of merge_agent_connections() are unchanged.
SET LOCAL lock_timeout = '10s';

CREATE FUNCTION heartbeat.merge_all_parts(
    part_nos        integer[],     -- heartbeat.staging_parts().part, in order
    part_rels       oid[],         -- heartbeat.staging_parts().relid, same order
    row_budget      integer,
    min_gap         interval,      -- min_interval of the call
    time_horizon    timestamptz,
    merger_name     text,
    ev_at           timestamptz,
    ev_timeout      interval,
    ev_horizon      timestamptz,
    OUT res         heartbeat.merge_result,
    OUT fallback    text           -- NULL: merged; else why the caller must merge part by part
)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
-- rows are locked in the order the snapshots are sorted in (part, then id), as a nested loop
-- over them takes them; never a hash or merge join, whatever staging's statistics say
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $merge_all$
DECLARE
    started     timestamptz := pg_catalog.clock_timestamp();
    snap_at     timestamptz;
    ev_stale    timestamptz := ev_at - ev_timeout;
    n_parts     integer := pg_catalog.cardinality(part_nos);
    p           integer;
    n_agents    bigint;
    by_part     record;
BEGIN
    res.rows_consumed := 0; res.agents_updated := 0; res.skipped_stale := 0; res.skipped_unknown := 0;
    res.skipped_invalid := 0; res.deferred_locked := 0; res.dead_lettered := 0; res.status_events := 0;
    res.skipped_concurrent := false; res.parts := n_parts; res.parts_merged := 0;
    res.parts_skipped_concurrent := 0; res.parts_skipped_recent := 0; res.parts_more := '{}'; res.more := false;

    IF min_gap IS NOT NULL AND EXISTS (
        SELECT 1 FROM heartbeat.merge_state ms
         WHERE ms.part = ANY (part_nos)
           AND ms.last_merge_at > started - min_gap
           AND ms.drained_through >= ms.last_merge_at
           AND ms.merged_by IS DISTINCT FROM merger_name) THEN
        fallback := 'recent';
        RETURN;
    END IF;
    FOREACH p IN ARRAY part_nos LOOP
        IF NOT pg_catalog.pg_try_advisory_xact_lock(1751474803, p) THEN
            fallback := 'busy';  -- the parts locked so far stay locked: the per-part merge takes them again
            RETURN;
        END IF;
    END LOOP;

    snap_at := pg_catalog.clock_timestamp();  -- the statement's snapshot is taken after this
    BEGIN
        WITH seen AS (
            -- the rows this snapshot sees, up to one more than the budget: the DELETE below
            -- (same snapshot) takes them all, or none when they are more than the budget
            SELECT pg_catalog.count(*) AS n
              FROM (SELECT 1 FROM heartbeat.agent_connection_staging AS t LIMIT row_budget + 1) t
        ), consumed AS (
            DELETE FROM heartbeat.agent_connection_staging AS s
             WHERE (SELECT seen.n FROM seen) <= row_budget
            RETURNING pg_catalog.array_position(part_rels, s.tableoid::oid) AS pi,
                      s.agent_id, s.first_connected_at, s.last_connected_at,
                      s.last_connected_replica_id, s.disconnected_at, s.updated_at,
                      (s.agent_id IS NOT NULL AND s.updated_at IS NOT NULL
                       AND heartbeat.valid_time(s.updated_at, time_horizon)
                       AND heartbeat.valid_time(s.first_connected_at, time_horizon)
                       AND heartbeat.valid_time(s.last_connected_at, time_horizon)
                       AND heartbeat.valid_time(s.disconnected_at, time_horizon)) AS valid
        ), newest AS (
            -- an agent's rows are all in one part (staging is partitioned by agent_id)
            SELECT DISTINCT ON (c.pi, c.agent_id)
                   c.pi, c.agent_id, c.last_connected_at, c.last_connected_replica_id,
                   c.disconnected_at, c.updated_at,
                   pg_catalog.min(c.first_connected_at) OVER w AS first_connected_at
              FROM consumed c
             WHERE c.valid
            WINDOW w AS (PARTITION BY c.pi, c.agent_id
                         ORDER BY c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                                  c.last_connected_at DESC NULLS LAST,
                                  c.last_connected_replica_id DESC NULLS LAST
                         ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
             ORDER BY c.pi, c.agent_id, c.updated_at DESC, c.disconnected_at DESC NULLS LAST,
                      c.last_connected_at DESC NULLS LAST, c.last_connected_replica_id DESC NULLS LAST
        ), updated AS (
            -- the steady path: snapshots that do not change the agent's status (sql/016)
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
                                       wa.created_at, wa.connection_timeout_seconds, ev_at, ev_stale, ev_horizon)
                 = heartbeat.status_at(LEAST(wa.first_connected_at, n.first_connected_at), n.last_connected_at,
                                       n.disconnected_at, wa.created_at, wa.connection_timeout_seconds,
                                       ev_at, ev_stale, ev_horizon)
            RETURNING wa.id, n.pi
        ), counts AS (
            SELECT (SELECT pg_catalog.count(*) FROM newest) AS n_newest,
                   (SELECT pg_catalog.count(*) FROM updated) AS n_updated
            OFFSET 0
        ), rest AS MATERIALIZED (
            -- what the steady path left (only looked at when some agent was left)
            -- (NOT IN: a hashed subplan, one pass over each; a NOT EXISTS anti-join would be a
            -- nested loop here, with hash joins off: every left agent against every updated one)
            SELECT n.* FROM newest n
             WHERE (SELECT c.n_newest > c.n_updated FROM counts c)
               AND n.agent_id NOT IN (SELECT u.id FROM updated u)
        ), known AS MATERIALIZED (
            -- the rows to change, locked NOWAIT, with their status before (sql/016)
            SELECT r.*, (o.updated_at < r.updated_at) AS newer,
                   heartbeat.status_at(o.first_connected_at, o.last_connected_at, o.disconnected_at,
                                       o.created_at, o.connection_timeout_seconds, ev_at, ev_stale, ev_horizon) AS old_status
              FROM rest r
              JOIN public.workspace_agents o ON o.id = r.agent_id
             WHERE o.updated_at < r.updated_at
                OR r.first_connected_at < COALESCE(o.first_connected_at, 'infinity')
               FOR NO KEY UPDATE OF o NOWAIT
        ), changed AS (
            UPDATE public.workspace_agents AS wa
               SET first_connected_at        = LEAST(wa.first_connected_at, k.first_connected_at),
                   last_connected_at         = CASE WHEN k.newer THEN k.last_connected_at ELSE wa.last_connected_at END,
                   last_connected_replica_id = CASE WHEN k.newer THEN k.last_connected_replica_id
                                                    ELSE wa.last_connected_replica_id END,
                   disconnected_at           = CASE WHEN k.newer THEN k.disconnected_at ELSE wa.disconnected_at END,
                   updated_at                = CASE WHEN k.newer THEN k.updated_at ELSE wa.updated_at END
              FROM known k
             WHERE wa.id = k.agent_id
            RETURNING wa.id, k.pi, k.newer, k.old_status,
                      heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at,
                                          wa.created_at, wa.connection_timeout_seconds, ev_at, ev_stale, ev_horizon) AS new_status,
                      wa.last_connected_at, wa.disconnected_at, wa.created_at, wa.connection_timeout_seconds
        ), events AS (
            INSERT INTO heartbeat.status_events_pending (agent_id, from_status, to_status, reason, at)
            SELECT x.id, x.old_status, x.new_status, x.reason,
                   heartbeat.event_at(x.new_status, x.reason, x.last_connected_at, x.disconnected_at,
                                      x.created_at, x.connection_timeout_seconds, ev_timeout, ev_at)
              FROM (SELECT c.*, heartbeat.event_reason(c.old_status, c.new_status, c.last_connected_at,
                                                       c.disconnected_at) AS reason
                      FROM changed c
                     WHERE c.old_status <> c.new_status) x
            RETURNING 1
        ), unknown AS (
            SELECT r.pi FROM rest r
             WHERE NOT EXISTS (SELECT 1 FROM public.workspace_agents wa WHERE wa.id = r.agent_id)
        )
        -- per part, in part_nos' order: consumed, invalid, newest (agents), applied, unknown
        SELECT (SELECT seen.n FROM seen) AS n_seen,
               pg_catalog.array_agg(COALESCE(cn.n, 0) ORDER BY i.i) AS consumed,
               pg_catalog.array_agg(COALESCE(cn.n_invalid, 0) ORDER BY i.i) AS invalid,
               pg_catalog.array_agg(COALESCE(nw.n, 0) ORDER BY i.i) AS agents,
               pg_catalog.array_agg(COALESCE(up.n, 0) + COALESCE(ch.n, 0) ORDER BY i.i) AS applied,
               pg_catalog.array_agg(COALESCE(un.n, 0) ORDER BY i.i) AS unknown,
               (SELECT pg_catalog.count(*) FROM events) AS n_events
          FROM pg_catalog.generate_subscripts(part_rels, 1) AS i(i)
          LEFT JOIN (SELECT c.pi, pg_catalog.count(*) AS n, pg_catalog.count(*) FILTER (WHERE NOT c.valid) AS n_invalid
                       FROM consumed c GROUP BY c.pi) cn ON cn.pi = i.i
          LEFT JOIN (SELECT n.pi, pg_catalog.count(*) AS n FROM newest n GROUP BY n.pi) nw ON nw.pi = i.i
          LEFT JOIN (SELECT u.pi, pg_catalog.count(*) AS n FROM updated u GROUP BY u.pi) up ON up.pi = i.i
          LEFT JOIN (SELECT c.pi, pg_catalog.count(*) AS n FROM changed c WHERE c.newer GROUP BY c.pi) ch ON ch.pi = i.i
          LEFT JOIN (SELECT u.pi, pg_catalog.count(*) AS n FROM unknown u GROUP BY u.pi) un ON un.pi = i.i
          INTO by_part;
    EXCEPTION
        WHEN lock_not_available OR deadlock_detected THEN
            fallback := 'locked';
            RETURN;
        WHEN data_exception OR integrity_constraint_violation OR with_check_option_violation OR raise_exception THEN
            fallback := 'error';
            RETURN;
    END;
    IF by_part.n_seen IS NULL OR by_part.n_seen > row_budget THEN
        fallback := 'backlog';  -- nothing was consumed
        RETURN;
    END IF;

    SELECT pg_catalog.sum(x.consumed), pg_catalog.sum(x.invalid), pg_catalog.sum(x.agents),
           pg_catalog.sum(x.applied), pg_catalog.sum(x.unknown)
      INTO res.rows_consumed, res.skipped_invalid, n_agents, res.agents_updated, res.skipped_unknown
      FROM ROWS FROM (pg_catalog.unnest(by_part.consumed), pg_catalog.unnest(by_part.invalid),
                      pg_catalog.unnest(by_part.agents), pg_catalog.unnest(by_part.applied),
                      pg_catalog.unnest(by_part.unknown)) AS x(consumed, invalid, agents, applied, unknown);
    res.skipped_stale := n_agents - res.agents_updated - res.skipped_unknown;
    res.status_events := by_part.n_events;
    res.parts_merged := n_parts;
    res.more := res.rows_consumed >= row_budget;
    IF res.more THEN
        res.parts_more := part_nos;
    END IF;
    res.duration := pg_catalog.clock_timestamp() - started;
    INSERT INTO heartbeat.merge_state AS ms
           (part, last_merge_at, last_duration, drained_through, rows_consumed, agents_updated, skipped_stale,
            skipped_unknown, skipped_invalid, deferred_locked, dead_lettered, merges_total, merged_by)
    SELECT part_nos[i], started, res.duration, CASE WHEN NOT res.more THEN snap_at END,
           by_part.consumed[i], by_part.applied[i], by_part.agents[i] - by_part.applied[i] - by_part.unknown[i],
           by_part.unknown[i], by_part.invalid[i], 0, 0, 1, merger_name
      FROM pg_catalog.generate_subscripts(part_nos, 1) AS i
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
END
$merge_all$;
REVOKE ALL ON FUNCTION heartbeat.merge_all_parts(integer[], oid[], integer, interval, timestamptz, text,
                                                 timestamptz, interval, timestamptz) FROM PUBLIC;

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
    n_parts integer;
    nos     integer[];
    rels    oid[];
    names   name[];
    started timestamptz := pg_catalog.clock_timestamp();
    ep      record;
    one     record;
BEGIN
    pre := heartbeat.merge_prelude(max_rows);
    -- the parts, read once (staging always has at least one; the prelude's lock keeps them until commit)
    SELECT pg_catalog.array_agg(s.part ORDER BY s.part), pg_catalog.array_agg(s.relid::oid ORDER BY s.part),
           pg_catalog.array_agg(s.relname ORDER BY s.part)
      INTO nos, rels, names FROM heartbeat.staging_parts() s;
    n_parts := pg_catalog.cardinality(nos);
    one := heartbeat.merge_all_parts(nos, rels, pre.budget, min_interval, pre.horizon, merger,
                                     pre.ev_at, pre.ev_timeout, pre.ev_horizon);
    IF one.fallback IS NULL THEN
        total := one.res;
    ELSE
        IF one.fallback = 'locked' THEN
            -- this call already waited lock_timeout for a row lock: the part merges below defer
            -- what is still locked (until this function returns; its SET clause restores it)
            PERFORM pg_catalog.set_config('lock_timeout', '100ms', true);
        END IF;
        total := ROW(0, 0, 0, 0, 0, 0, false, 0, n_parts, 0, 0, 0, '{}', false, NULL, NULL, NULL, 0, false)::heartbeat.merge_result;
        FOR i IN 1 .. n_parts LOOP
            r := heartbeat.merge_part(nos[i], names[i],
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
        total.skipped_concurrent := total.parts_skipped_concurrent = n_parts;
    END IF;
    ep := heartbeat.merge_epilogue(total.more);
    total.status_events := total.status_events + ep.swept_events;
    total.status_swept := ep.swept;
    total.duration := pg_catalog.clock_timestamp() - started;
    RETURN NEXT total;
END
$merge$;

-- merge_agent_connections() runs as heartbeat_definer (sql/014's model): it calls the new helper
GRANT EXECUTE ON FUNCTION heartbeat.merge_all_parts(integer[], oid[], integer, interval, timestamptz, text,
                                                    timestamptz, interval, timestamptz)
   TO heartbeat_definer;
