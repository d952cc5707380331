-- Experiment (not installed by anything): the merge of one part when most of its rows change status
-- (a connect wave: every agent's first heartbeat, or all of them reconnecting after an outage).
--
-- Today's merge (sql/016 merge_part) tries the steady UPDATE first (an index lookup per row, which in a
-- wave updates nothing), then, for what is left, an anti-join against what it updated, a lock pass
-- (FOR NO KEY UPDATE NOWAIT: another index lookup, a tuple lock and its WAL record per row), the
-- UPDATE (a third lookup) and the unknown-agent count (a fourth). This prototype reads every staged
-- agent's row once (one index lookup, no lock: the status before and the row's ctid), then updates by
-- ctid (a parameterized TID scan, in id order like the steady UPDATE). A row changed by another
-- transaction between the read and the update fails `wa.ctid = t.tid` when the UPDATE re-checks the
-- newest version (EvalPlanQual), so it is skipped, never updated with a stale status before: the
-- caller compares n_changed with n_applies and, when they differ, rolls the statement back and takes
-- the slow path (as a lock timeout does today). Same counts as merge_part: agents_updated = n_updated,
-- skipped_unknown = n_newest - n_found, skipped_stale = n_newest - n_updated - skipped_unknown.
--
-- Not yet in sql/: it needs the mode switch (a part whose last merge changed the status of most of
-- its agents, merge_state) and the 40001 round trip to the slow path. Measured by
-- bench/experiments/wave-merge.sh (docs/benchmark.md, "A cheaper connect wave").
-- prototype: the merge of a part when most rows change status (a connect wave), one lookup pass + TID update
CREATE OR REPLACE FUNCTION public.wave_merge(relname name, budget int)
RETURNS TABLE (n_consumed bigint, n_invalid bigint, n_newest bigint, n_found bigint, n_applies bigint, n_changed bigint, n_updated bigint, n_events bigint)
LANGUAGE plpgsql AS $f$
DECLARE
  c record;
BEGIN
  SELECT x.at, x.inactive_timeout, x.horizon INTO c FROM heartbeat.event_clock() x;
  RETURN QUERY EXECUTE format($q$
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
    ), targets AS MATERIALIZED (
        SELECT n.*, o.ctid AS tid, (o.updated_at < n.updated_at) AS newer,
               (o.updated_at < n.updated_at
                OR n.first_connected_at < COALESCE(o.first_connected_at, 'infinity')) AS applies,
               heartbeat.status_at(o.first_connected_at, o.last_connected_at, o.disconnected_at,
                                   o.created_at, o.connection_timeout_seconds, $3, $6, $5) AS old_status
          FROM newest n
          JOIN public.workspace_agents o ON o.id = n.agent_id
    ), changed AS (
        UPDATE public.workspace_agents AS wa
           SET first_connected_at        = LEAST(wa.first_connected_at, t.first_connected_at),
               last_connected_at         = CASE WHEN t.newer THEN t.last_connected_at ELSE wa.last_connected_at END,
               last_connected_replica_id = CASE WHEN t.newer THEN t.last_connected_replica_id
                                                ELSE wa.last_connected_replica_id END,
               disconnected_at           = CASE WHEN t.newer THEN t.disconnected_at ELSE wa.disconnected_at END,
               updated_at                = CASE WHEN t.newer THEN t.updated_at ELSE wa.updated_at END
          FROM targets t
         WHERE wa.ctid = t.tid AND t.applies
        RETURNING wa.id, t.newer, t.old_status,
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
    SELECT (SELECT count(*) FROM consumed), (SELECT count(*) FROM consumed WHERE NOT valid),
           (SELECT count(*) FROM newest), (SELECT count(*) FROM targets),
           (SELECT count(*) FROM targets WHERE applies), (SELECT count(*) FROM changed),
           (SELECT count(*) FROM changed WHERE newer), (SELECT count(*) FROM events)
  $q$, relname) USING heartbeat.clock_horizon(), budget, c.at, c.inactive_timeout, c.horizon, c.at - c.inactive_timeout;
END
$f$;
