-- The merge rules (docs/merge-rules.md), on fixed agents and fixed times.
-- Agents: a..h. Staged rows go in with INSERT and with COPY (what clients send).
INSERT INTO public.workspace_agents (id, updated_at, created_at)
SELECT ('00000000-0000-4000-8000-00000000000' || n)::uuid, '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00'
  FROM unnest(ARRAY['a', 'b', 'c', 'd', 'e', 'f']) AS n;
CREATE FUNCTION pg_temp.agent(c text) RETURNS uuid LANGUAGE sql AS $$ SELECT ('00000000-0000-4000-8000-00000000000' || c)::uuid $$;
CREATE FUNCTION pg_temp.t(s int) RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2026-01-01 00:00:00+00'::timestamptz + s * interval '1 second' $$;
CREATE FUNCTION pg_temp.merge() RETURNS TABLE (rows_consumed bigint, agents_updated bigint, skipped_stale bigint,
    skipped_unknown bigint, skipped_invalid bigint, deferred_locked bigint, dead_lettered bigint, more boolean)
LANGUAGE sql AS $$
    SELECT rows_consumed, agents_updated, skipped_stale, skipped_unknown, skipped_invalid, deferred_locked, dead_lettered, more
      FROM heartbeat.merge_agent_connections()
$$;
CREATE FUNCTION pg_temp.rows() RETURNS TABLE (agent text, first_connected_at timestamptz, last_connected_at timestamptz,
    disconnected_at timestamptz, last_connected_replica_id uuid, updated_at timestamptz)
LANGUAGE sql AS $$
    SELECT right(id::text, 1), first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id, updated_at
      FROM public.workspace_agents ORDER BY id
$$;

-- newest snapshot per agent wins; first_connected_at is the earliest of all
INSERT INTO heartbeat.agent_connection_staging VALUES
    (pg_temp.agent('a'), pg_temp.t(1), pg_temp.t(1), NULL, NULL, pg_temp.t(1)),
    (pg_temp.agent('a'), pg_temp.t(2), pg_temp.t(3), '11111111-1111-4111-8111-111111111111', NULL, pg_temp.t(3)),
    (pg_temp.agent('a'), pg_temp.t(0), pg_temp.t(2), NULL, NULL, pg_temp.t(2));
-- ties on updated_at: a disconnect wins, then the later last_connected_at, then the greater replica id
COPY heartbeat.agent_connection_staging FROM stdin;
00000000-0000-4000-8000-00000000000b	\N	2026-01-01 00:00:05+00	\N	\N	2026-01-01 00:00:10+00
00000000-0000-4000-8000-00000000000b	\N	2026-01-01 00:00:04+00	\N	2026-01-01 00:00:09+00	2026-01-01 00:00:10+00
00000000-0000-4000-8000-00000000000c	\N	2026-01-01 00:00:05+00	\N	\N	2026-01-01 00:00:10+00
00000000-0000-4000-8000-00000000000c	\N	2026-01-01 00:00:06+00	\N	\N	2026-01-01 00:00:10+00
00000000-0000-4000-8000-00000000000d	\N	2026-01-01 00:00:06+00	11111111-1111-4111-8111-111111111111	\N	2026-01-01 00:00:10+00
00000000-0000-4000-8000-00000000000d	\N	2026-01-01 00:00:06+00	22222222-2222-4222-8222-222222222222	\N	2026-01-01 00:00:10+00
\.
SELECT * FROM pg_temp.merge();
SELECT * FROM pg_temp.rows();

-- only strictly newer snapshots apply: an equal or older one never overwrites (re-merging is a no-op),
-- but a stale snapshot still tells an earlier first connection
INSERT INTO heartbeat.agent_connection_staging VALUES
    (pg_temp.agent('a'), NULL, pg_temp.t(100), NULL, NULL, pg_temp.t(3)),
    (pg_temp.agent('b'), pg_temp.t(-50), pg_temp.t(1), NULL, NULL, pg_temp.t(2));
SELECT * FROM pg_temp.merge();
SELECT * FROM pg_temp.rows() WHERE agent IN ('a', 'b');

-- NULL means NULL: a newer snapshot without a replica or connection time clears them
INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES (pg_temp.agent('a'), pg_temp.t(20));
SELECT * FROM pg_temp.merge();
SELECT * FROM pg_temp.rows() WHERE agent = 'a';

-- unknown agents are counted and discarded; invalid rows too: no agent_id, no updated_at,
-- a time that is not finite, before 1970, or beyond heartbeat.clock_horizon()
INSERT INTO heartbeat.agent_connection_staging VALUES
    ('99999999-9999-4999-8999-999999999999', NULL, pg_temp.t(30), NULL, NULL, pg_temp.t(30)),
    (NULL, NULL, pg_temp.t(30), NULL, NULL, pg_temp.t(30)),
    (pg_temp.agent('e'), NULL, pg_temp.t(30), NULL, NULL, NULL),
    (pg_temp.agent('e'), NULL, 'infinity', NULL, NULL, pg_temp.t(30)),
    (pg_temp.agent('e'), '-infinity', pg_temp.t(30), NULL, NULL, pg_temp.t(30)),
    (pg_temp.agent('e'), NULL, pg_temp.t(30), NULL, '1969-12-31 23:59:59+00', pg_temp.t(30)),
    (pg_temp.agent('e'), NULL, '294276-12-31', NULL, NULL, pg_temp.t(30)),
    (pg_temp.agent('e'), NULL, pg_temp.t(30), NULL, NULL, now() + interval '1 day'),
    (pg_temp.agent('f'), NULL, pg_temp.t(30), NULL, NULL, pg_temp.t(30));
SELECT * FROM pg_temp.merge();
SELECT * FROM pg_temp.rows() WHERE agent IN ('e', 'f');

-- a snapshot the user's table rejects (a CHECK here; a FOREIGN KEY or a trigger alike) goes to
-- heartbeat.dead_letters with the error; every other agent is applied by the same merge
ALTER TABLE public.workspace_agents ADD CONSTRAINT regress_no_2025
    CHECK (last_connected_at IS NULL OR last_connected_at >= '2026-01-01 00:00:00+00');
INSERT INTO heartbeat.agent_connection_staging VALUES
    (pg_temp.agent('c'), NULL, '2025-06-01 00:00:00+00', NULL, NULL, pg_temp.t(40)),
    (pg_temp.agent('d'), NULL, pg_temp.t(40), NULL, NULL, pg_temp.t(40)),
    (pg_temp.agent('f'), NULL, pg_temp.t(40), NULL, NULL, pg_temp.t(40));
SELECT * FROM pg_temp.merge();
SELECT right(agent_id::text, 1) AS agent, last_connected_at, updated_at, sqlstate, message FROM heartbeat.dead_letters;
SELECT * FROM pg_temp.rows() WHERE agent IN ('c', 'd', 'f');
-- after the cause is fixed, the owner puts them back; the next merge applies them
ALTER TABLE public.workspace_agents DROP CONSTRAINT regress_no_2025;
SELECT heartbeat.retry_dead_letters() AS retried;
SELECT * FROM pg_temp.merge();
SELECT * FROM pg_temp.rows() WHERE agent = 'c';

-- bounded: max_rows caps what one call consumes; `more` says call again
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
SELECT pg_temp.agent('f'), pg_temp.t(50 + g), pg_temp.t(50 + g) FROM generate_series(1, 10) AS g;
SELECT rows_consumed, agents_updated, more FROM heartbeat.merge_agent_connections(max_rows => 8);
-- and again until nothing is left
DO $$
DECLARE
    calls int := 0;
    r record;
BEGIN
    LOOP
        SELECT * INTO r FROM heartbeat.merge_agent_connections(max_rows => 8);
        calls := calls + 1;
        EXIT WHEN NOT r.more;
    END LOOP;
    RAISE NOTICE 'drained in % more call(s)', calls;
END $$;
SELECT count(*) AS staged FROM heartbeat.agent_connection_staging;
SELECT * FROM pg_temp.rows() WHERE agent = 'f';

-- only READ COMMITTED
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT * FROM heartbeat.merge_agent_connections();
ROLLBACK;
