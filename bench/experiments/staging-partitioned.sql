-- Experiment: staging split by hash of agent_id into 2 UNLOGGED partitions,
-- each consumed by its own merge function (the v2 merge, merge-v2.sql, bound
-- to one partition, with its own advisory lock), so two backends merge in
-- parallel on disjoint sets of agents. Clients still COPY into
-- heartbeat.agent_connection_staging (now the partitioned parent: COPY routes
-- rows). Applied by the bench variant pg-heartbeat-part2 on top of the
-- migrated database.
DROP TABLE heartbeat.agent_connection_staging;
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

CREATE UNLOGGED TABLE heartbeat.agent_connection_staging_p0
    PARTITION OF heartbeat.agent_connection_staging FOR VALUES WITH (MODULUS 2, REMAINDER 0)
    WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
          autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000,
          autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0,
          autovacuum_analyze_threshold = 100000);

CREATE UNLOGGED TABLE heartbeat.agent_connection_staging_p1
    PARTITION OF heartbeat.agent_connection_staging FOR VALUES WITH (MODULUS 2, REMAINDER 1)
    WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
          autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000,
          autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0,
          autovacuum_analyze_threshold = 100000);

-- One merge function per partition, from one template (format(): %1$s the
-- partition number, %2$s its advisory lock key 100 + n; literal percent signs doubled).
DO $do$
BEGIN
    FOR part IN 0..1 LOOP
        EXECUTE pg_catalog.format($tpl$
CREATE OR REPLACE FUNCTION heartbeat.merge_agent_connections_p%1$s()
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
SET work_mem = '128MB'
AS $merge$
#variable_conflict use_column
DECLARE
    started     timestamptz := pg_catalog.clock_timestamp();
    horizon     timestamptz;
    n_agents    bigint;
    n_candidate bigint;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'heartbeat.merge_agent_connections() must run in a READ COMMITTED transaction, not %%',
            pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = '25001';  -- active_sql_transaction
    END IF;

    -- One merge at a time, database-wide. The lock is transaction-scoped (safe
    -- behind a transaction pooler) and never waited for.
    IF NOT pg_catalog.pg_try_advisory_xact_lock(1751474802, %2$s) THEN
        rows_consumed := 0; agents_updated := 0; skipped_stale := 0; skipped_unknown := 0;
        skipped_invalid := 0; deferred_locked := 0; skipped_concurrent := true;
        RETURN NEXT;
        RETURN;
    END IF;
    skipped_concurrent := false;
    deferred_locked := 0;
    horizon := pg_catalog.statement_timestamp() + COALESCE(
        NULLIF(pg_catalog.current_setting('heartbeat.max_clock_skew', true), '')::interval,
        interval '5 minutes');

    BEGIN
        -- Fast path: one statement; waits at most lock_timeout for row locks.
        WITH consumed AS (
            DELETE FROM heartbeat.agent_connection_staging_p%1$s
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
        )
        -- v2: consumed is counted in one pass, and the unknown-agent anti join
        -- (a hash of every updated id) runs only when some agent was not updated
        -- (an initplan inside CASE is evaluated lazily).
        SELECT s.n_consumed, s.n_invalid, s.n_newest, s.n_updated,
               CASE WHEN s.n_newest > s.n_updated THEN
                   (SELECT count(*) FROM newest n
                     WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.id = n.agent_id)
                       AND NOT EXISTS (SELECT 1 FROM public.workspace_agents wa WHERE wa.id = n.agent_id))
               ELSE 0 END
          FROM (SELECT k.n_consumed, k.n_invalid,
                       (SELECT count(*) FROM newest) AS n_newest,
                       (SELECT count(*) FROM updated) AS n_updated
                  FROM (SELECT count(*) AS n_consumed,
                               count(*) FILTER (WHERE c.agent_id IS NULL OR c.updated_at IS NULL
                                                   OR c.updated_at > horizon) AS n_invalid
                          FROM consumed c) k
                OFFSET 0) s
          INTO rows_consumed, skipped_invalid, n_agents, agents_updated, skipped_unknown;
        skipped_stale := n_agents - agents_updated - skipped_unknown;
    EXCEPTION WHEN lock_not_available THEN
        -- Slow path: some workspace_agents row is locked by another transaction
        -- (the fast path's work was rolled back with its subtransaction). Update
        -- every row we can lock now and put the snapshots of the locked agents
        -- back into staging, so one busy row never stalls the whole fleet.
        WITH consumed AS (
            DELETE FROM heartbeat.agent_connection_staging_p%1$s
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
        ), candidates AS (
            SELECT n.*
              FROM newest n
              JOIN public.workspace_agents wa ON wa.id = n.agent_id
             WHERE wa.updated_at < n.updated_at
        ), lockable AS (
            SELECT wa.id
              FROM public.workspace_agents wa
              JOIN candidates c ON wa.id = c.agent_id
               FOR NO KEY UPDATE OF wa SKIP LOCKED
        ), updated AS (
            UPDATE public.workspace_agents AS wa
               SET first_connected_at        = LEAST(wa.first_connected_at, c.first_connected_at),
                   last_connected_at         = c.last_connected_at,
                   last_connected_replica_id = c.last_connected_replica_id,
                   disconnected_at           = c.disconnected_at,
                   updated_at                = c.updated_at
              FROM candidates c
              JOIN lockable l ON l.id = c.agent_id
             WHERE wa.id = c.agent_id
               AND wa.updated_at < c.updated_at
            RETURNING wa.id
        ), restaged AS (
            INSERT INTO heartbeat.agent_connection_staging_p%1$s
                   (agent_id, first_connected_at, last_connected_at,
                    last_connected_replica_id, disconnected_at, updated_at)
            SELECT c.agent_id, c.first_connected_at, c.last_connected_at,
                   c.last_connected_replica_id, c.disconnected_at, c.updated_at
              FROM candidates c
             WHERE NOT EXISTS (SELECT 1 FROM lockable l WHERE l.id = c.agent_id)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM consumed),
               (SELECT count(*) FROM consumed c
                 WHERE c.agent_id IS NULL OR c.updated_at IS NULL OR c.updated_at > horizon),
               (SELECT count(*) FROM newest),
               (SELECT count(*) FROM candidates),
               (SELECT count(*) FROM updated),
               (SELECT count(*) FROM restaged),
               (SELECT count(*) FROM newest n
                 WHERE NOT EXISTS (SELECT 1 FROM public.workspace_agents wa WHERE wa.id = n.agent_id))
          INTO rows_consumed, skipped_invalid, n_agents, n_candidate, agents_updated,
               deferred_locked, skipped_unknown;
        skipped_stale := n_agents - n_candidate - skipped_unknown;
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
$tpl$, part, 100 + part);
    END LOOP;
END
$do$;
