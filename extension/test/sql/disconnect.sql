-- Disconnects: direct, guarded like the merge (only strictly newer), never undone by an
-- older staged heartbeat; every timestamp validated.
CREATE FUNCTION pg_temp.agent(c text) RETURNS uuid LANGUAGE sql AS $$ SELECT ('00000000-0000-4000-8000-0000000000d' || c)::uuid $$;
CREATE FUNCTION pg_temp.t(s int) RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2026-02-01 00:00:00+00'::timestamptz + s * interval '1 second' $$;
CREATE FUNCTION pg_temp.rejected(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
    RETURN 'rejected: ' || SQLSTATE;  -- the message names the time and the horizon (not stable across runs)
END $$;
INSERT INTO public.workspace_agents (id, updated_at, first_connected_at, last_connected_at, last_connected_replica_id)
SELECT pg_temp.agent(n), pg_temp.t(0), pg_temp.t(0), pg_temp.t(0), '11111111-1111-4111-8111-111111111111'
  FROM unnest(ARRAY['1', '2', '3', '4', '5']) AS n;

-- applied when newer; false when not (and for an unknown agent)
SELECT heartbeat.disconnect_agent(pg_temp.agent('1'), pg_temp.t(10), pg_temp.t(10)) AS applied;
SELECT heartbeat.disconnect_agent(pg_temp.agent('1'), pg_temp.t(5), pg_temp.t(5)) AS older;
SELECT heartbeat.disconnect_agent(pg_temp.agent('1'), pg_temp.t(10), pg_temp.t(10)) AS same;
SELECT heartbeat.disconnect_agent('99999999-9999-4999-8999-999999999999', pg_temp.t(10), pg_temp.t(10)) AS unknown;
-- a heartbeat staged before the disconnect cannot revive the agent
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
VALUES (pg_temp.agent('1'), pg_temp.t(8), pg_temp.t(8));
SELECT agents_updated, skipped_stale FROM heartbeat.merge_agent_connections();
SELECT last_connected_at, disconnected_at, updated_at FROM public.workspace_agents WHERE id = pg_temp.agent('1');
-- a stale disconnect still tells an earlier first connection; the replica and last connection it knows
SELECT heartbeat.disconnect_agent(pg_temp.agent('1'), pg_temp.t(1), pg_temp.t(1), NULL, pg_temp.t(-100)) AS stale;
SELECT heartbeat.disconnect_agent(pg_temp.agent('2'), pg_temp.t(20), pg_temp.t(20),
                                  '22222222-2222-4222-8222-222222222222', NULL, pg_temp.t(19)) AS with_facts;
SELECT right(id::text, 1) AS agent, first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id
  FROM public.workspace_agents WHERE id IN (pg_temp.agent('1'), pg_temp.agent('2')) ORDER BY id;

-- every timestamp is validated: NULLs where required, not finite, before 1970, too far ahead
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_agent(NULL, now(), now())$$);
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_agent(pg_temp.agent('3'), 'infinity', now())$$);
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_agent(pg_temp.agent('3'), now(), now(), NULL, '-infinity')$$);
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_agent(pg_temp.agent('3'), '4713-01-01 BC', now(), NULL, '-infinity')$$);
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_agent(pg_temp.agent('3'), now(), now(), NULL, NULL, '1969-07-20')$$);
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_agent(pg_temp.agent('3'), now() + interval '1 day', now() + interval '1 day')$$);
SELECT pg_temp.rejected($$SELECT heartbeat.disconnect_replica('11111111-1111-4111-8111-111111111111', '294276-12-31', now())$$);
SELECT first_connected_at, disconnected_at FROM public.workspace_agents WHERE id = pg_temp.agent('3');

-- disconnect_replica: every agent still connected through the replica, in one statement; not
-- one whose newer connection through another replica is staged but not merged yet
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, last_connected_replica_id, updated_at)
VALUES (pg_temp.agent('4'), pg_temp.t(30), '33333333-3333-4333-8333-333333333333', pg_temp.t(30));
SELECT heartbeat.disconnect_replica('11111111-1111-4111-8111-111111111111', pg_temp.t(40), pg_temp.t(40)) AS disconnected;
SELECT right(id::text, 1) AS agent, disconnected_at, updated_at FROM public.workspace_agents
 WHERE id IN (pg_temp.agent('3'), pg_temp.agent('4'), pg_temp.agent('5')) ORDER BY id;
SELECT agents_updated FROM heartbeat.merge_agent_connections();
SELECT right(id::text, 1) AS agent, last_connected_at, last_connected_replica_id, disconnected_at
  FROM public.workspace_agents WHERE id = pg_temp.agent('4');
