-- Stages :rows heartbeats of distinct random agents (what the stagers COPY in
-- one merge interval), stamped now(): psql -v rows=333333 -f stage-sample.sql
INSERT INTO heartbeat.agent_connection_staging
       (agent_id, first_connected_at, last_connected_at, last_connected_replica_id, disconnected_at, updated_at)
SELECT id, timestamptz '2026-01-01', clock_timestamp(), '6f1c0d7e-8a43-4d8e-9f5b-2b9a1c3d4e5f'::uuid, NULL, clock_timestamp()
  FROM public.workspace_agents TABLESAMPLE BERNOULLI (100.0 * :rows / 1000000)
 LIMIT :rows;
