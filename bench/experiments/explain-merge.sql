-- EXPLAIN (ANALYZE, BUFFERS) of the merge's fast path (sql/004_merge.sql, as
-- of this writing) on what is staged now, rolled back so it can be repeated:
--   psql -v rows=333333 -f stage-sample.sql -f explain-merge.sql
-- SET work_mem before it to compare (the merge runs with the session's).
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
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
             WHERE c.agent_id IS NOT NULL AND c.updated_at IS NOT NULL AND c.updated_at <= now() + interval '5 minutes'
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
        )
        SELECT (SELECT count(*) FROM consumed),
               (SELECT count(*) FROM consumed c
                 WHERE c.agent_id IS NULL OR c.updated_at IS NULL OR c.updated_at > now() + interval '5 minutes'),
               (SELECT count(*) FROM newest),
               (SELECT count(*) FROM updated),
               (SELECT count(*) FROM newest n
                 WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
                   AND NOT EXISTS (SELECT 1 FROM public.workspace_agents wa WHERE wa.id = n.agent_id));
ROLLBACK;
