-- pg-heartbeat 001: the agents table.
--
-- Created only when the application does not already have one. An existing
-- public.workspace_agents (for example the reference system's, with many more
-- columns) is left untouched; we only check that the columns pg-heartbeat
-- writes exist with the right types, so a mismatch fails here, at migration
-- time, with a clear message instead of at the first merge.
--
-- There is deliberately no index on the connection columns: the merge updates
-- only non-indexed columns, so its updates can be HOT (heap-only tuples), and
-- fillfactor 70 leaves room on each page for the new versions. For an existing
-- table, consider: ALTER TABLE public.workspace_agents SET (fillfactor = 70);
-- (applies to pages written afterwards; VACUUM FULL or pg_repack rewrites the rest).
SET LOCAL lock_timeout = '10s';

CREATE TABLE IF NOT EXISTS public.workspace_agents (
    id                          uuid        PRIMARY KEY,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL,
    first_connected_at          timestamptz NULL,
    last_connected_at           timestamptz NULL,
    disconnected_at             timestamptz NULL,
    last_connected_replica_id   uuid        NULL,
    connection_timeout_seconds  integer     NOT NULL DEFAULT 0
) WITH (fillfactor = 70);

DO $check$
DECLARE
    wanted  text[] := ARRAY[
        'id:uuid', 'created_at:timestamp with time zone', 'updated_at:timestamp with time zone',
        'first_connected_at:timestamp with time zone', 'last_connected_at:timestamp with time zone',
        'disconnected_at:timestamp with time zone', 'last_connected_replica_id:uuid',
        'connection_timeout_seconds:integer'];
    missing text[];
BEGIN
    SELECT pg_catalog.array_agg(w ORDER BY w) INTO missing
      FROM pg_catalog.unnest(wanted) AS w
     WHERE NOT EXISTS (
        SELECT 1
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = 'public.workspace_agents'::pg_catalog.regclass
           AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||)
               pg_catalog.format_type(a.atttypid, NULL) OPERATOR(pg_catalog.=) w);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'public.workspace_agents exists but lacks columns pg-heartbeat needs: %', missing
            USING ERRCODE = '42703',
                  HINT = 'Add the missing columns (name:type) or let pg-heartbeat create the table.';
    END IF;
END
$check$;
