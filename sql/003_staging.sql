-- pg-heartbeat 003: the staging table that clients COPY into.
--
-- UNLOGGED: no WAL for staged rows (they are lost on a crash by design: at most
-- what was staged since the last merge; the client keeps nothing it has already
-- copied). No indexes, no constraints, no defaults, no triggers: nothing that
-- slows COPY. The merge validates rows instead of the table rejecting them, so a
-- bad row written here by hand is skipped and counted, never blocking a batch.
--
-- The merge consumes rows with DELETE, so dead tuples accumulate between
-- vacuums; the autovacuum settings below make vacuum run after every few
-- thousand deleted rows, without cost-based sleeping, which keeps the table a
-- steady few pages even under sustained load.
SET LOCAL lock_timeout = '10s';

CREATE UNLOGGED TABLE heartbeat.agent_connection_staging (
    agent_id                    uuid,
    first_connected_at          timestamptz,
    last_connected_at           timestamptz,
    last_connected_replica_id   uuid,
    disconnected_at             timestamptz,
    updated_at                  timestamptz
) WITH (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 100000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 100000
);

REVOKE ALL ON heartbeat.agent_connection_staging FROM PUBLIC;
GRANT INSERT ON heartbeat.agent_connection_staging TO heartbeat_writer;

-- One row describing the last merge (not a growing log): read by heartbeat.status.
-- UNLOGGED because it is an observation, not data: after a crash it simply
-- says that no merge has run yet.
CREATE UNLOGGED TABLE heartbeat.merge_state (
    singleton           boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    last_merge_at       timestamptz,
    last_duration       interval,
    rows_consumed       bigint,
    agents_updated      bigint,
    skipped_stale       bigint,
    skipped_unknown     bigint,
    skipped_invalid     bigint,
    deferred_locked     bigint,
    merges_total        bigint      NOT NULL DEFAULT 0
);
INSERT INTO heartbeat.merge_state (singleton) VALUES (true);
REVOKE ALL ON heartbeat.merge_state FROM PUBLIC;
