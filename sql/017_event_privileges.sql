-- pg-heartbeat 017: the privileges of the status events (sql/015, sql/016).
--
-- heartbeat.apply_privileges() again (sql/014 has the model), with what 1.3 added:
--   heartbeat_reader, heartbeat_writer   read the events: status_events_after(),
--                      status_events_head(), SELECT on status_events and
--                      event_state (a consumer needs no writer's rights)
--   heartbeat_writer   EXECUTE heartbeat.sweep_status()
--   heartbeat_definer  owns sweep_status(); writes the event tables; runs the
--                      helpers of 015 and 016 (and the new signatures of
--                      apply_snapshots() and merge_part())
SET LOCAL lock_timeout = '10s';

CREATE OR REPLACE FUNCTION heartbeat.apply_privileges()
RETURNS void
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $apply$
DECLARE
    p record;
BEGIN
    -- nothing for PUBLIC: a function created later executable by anyone until this runs again
    REVOKE ALL ON SCHEMA heartbeat FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA heartbeat FROM PUBLIC;
    REVOKE ALL ON ALL PROCEDURES IN SCHEMA heartbeat FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA heartbeat FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA heartbeat FROM PUBLIC;
    GRANT USAGE ON SCHEMA heartbeat TO heartbeat_definer, heartbeat_writer, heartbeat_reader;

    -- heartbeat_definer: the target columns, pg-heartbeat's own tables and helper functions.
    -- The table may not exist yet: CREATE EXTENSION before the application's table (pg_dump
    -- restores in that order, and restores these column grants with the table itself).
    IF pg_catalog.to_regclass('public.workspace_agents') IS NULL THEN
        RAISE NOTICE 'pg-heartbeat: public.workspace_agents does not exist yet: after creating it, run SELECT heartbeat.apply_privileges();';
    ELSE
        BEGIN
            GRANT SELECT (id, created_at, updated_at, first_connected_at, last_connected_at, disconnected_at,
                          last_connected_replica_id, connection_timeout_seconds),
                  UPDATE (updated_at, first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id)
               ON public.workspace_agents TO heartbeat_definer;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'pg-heartbeat: % cannot grant heartbeat_definer access to public.workspace_agents: %', CURRENT_USER, SQLERRM
                USING ERRCODE = '42501',
                      HINT = 'Run the migrations (or CREATE EXTENSION) as the owner of public.workspace_agents or a superuser, or GRANT the columns listed in sql/014 to heartbeat_definer WITH GRANT OPTION first.';
        END;
    END IF;
    GRANT SELECT, INSERT, DELETE ON heartbeat.agent_connection_staging TO heartbeat_definer;
    FOR p IN SELECT s.relname FROM heartbeat.staging_parts() s LOOP
        EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON heartbeat.%I TO heartbeat_definer', p.relname);
    END LOOP;
    GRANT SELECT, INSERT, UPDATE ON heartbeat.merge_state, heartbeat.merge_skips, heartbeat.staging_epoch TO heartbeat_definer;
    GRANT SELECT, INSERT, DELETE ON heartbeat.dead_letters TO heartbeat_definer;
    GRANT SELECT ON heartbeat.settings TO heartbeat_definer;
    GRANT EXECUTE ON FUNCTION heartbeat.clock_horizon(), heartbeat.valid_time(timestamptz, timestamptz),
                              heartbeat.assert_definer(), heartbeat.apply_snapshots(heartbeat.snapshot[], timestamptz, interval, timestamptz),
                              heartbeat.merge_part(integer, name, integer, interval, timestamptz, text,
                                                   timestamptz, interval, timestamptz),
                              heartbeat.merge_prelude(integer), heartbeat.staging_parts(),
                              heartbeat.check_times(text, timestamptz[])
       TO heartbeat_definer;
    -- status events (1.3): the definer records, sweeps, publishes and purges them
    GRANT SELECT, INSERT, DELETE ON heartbeat.status_events_pending, heartbeat.status_events TO heartbeat_definer;
    GRANT SELECT, UPDATE ON heartbeat.event_state TO heartbeat_definer;
    GRANT USAGE ON SEQUENCE heartbeat.status_event_id TO heartbeat_definer;
    GRANT EXECUTE ON FUNCTION
        heartbeat.status_at(timestamptz, timestamptz, timestamptz, timestamptz, integer, timestamptz, timestamptz, timestamptz),
        heartbeat.event_reason(text, text, timestamptz, timestamptz),
        heartbeat.event_at(text, text, timestamptz, timestamptz, timestamptz, integer, interval, timestamptz),
        heartbeat.event_clock(), heartbeat.event_lock_briefly(), heartbeat.publish_events(), heartbeat.purge_events(),
        heartbeat.sweep_events(boolean), heartbeat.record_change(uuid, text, timestamptz, interval, timestamptz),
        heartbeat.merge_epilogue(boolean)
       TO heartbeat_definer;

    -- writers and readers read pg-heartbeat's own tables (status runs with the caller's rights)
    GRANT SELECT ON heartbeat.agent_connection_staging, heartbeat.merge_state, heartbeat.merge_skips,
                    heartbeat.staging_epoch, heartbeat.dead_letters, heartbeat.settings, heartbeat.status,
                    heartbeat.status_events, heartbeat.event_state
       TO heartbeat_writer, heartbeat_reader;
    GRANT EXECUTE ON FUNCTION heartbeat.merge_status(), heartbeat.part_status(), heartbeat.staging_parts(),
                              heartbeat.valid_time(timestamptz, timestamptz), heartbeat.clock_horizon(),
                              heartbeat.agent_status(interval, uuid[]),
                              heartbeat.status_events_after(bigint, integer), heartbeat.status_events_head(),
                              heartbeat.status_at(timestamptz, timestamptz, timestamptz, timestamptz, integer,
                                                  timestamptz, timestamptz, timestamptz)
       TO heartbeat_writer, heartbeat_reader;
    -- writers write: COPY into staging, the merge, the disconnects, the staging epoch
    GRANT INSERT ON heartbeat.agent_connection_staging TO heartbeat_writer;
    GRANT EXECUTE ON FUNCTION heartbeat.merge_agent_connections(integer, interval, text),
                              heartbeat.merge_staging_part(integer, integer, interval, text),
                              heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz),
                              heartbeat.disconnect_replica(uuid, timestamptz, timestamptz),
                              heartbeat.staging_epoch(), heartbeat.sweep_status()
       TO heartbeat_writer;

    -- every SECURITY DEFINER function to heartbeat_definer (a non-superuser owner
    -- may only hand a function to a role with CREATE on its schema: for the moment)
    GRANT CREATE ON SCHEMA heartbeat TO heartbeat_definer;
    ALTER FUNCTION heartbeat.merge_agent_connections(integer, interval, text) OWNER TO heartbeat_definer;
    ALTER FUNCTION heartbeat.merge_staging_part(integer, integer, interval, text) OWNER TO heartbeat_definer;
    ALTER FUNCTION heartbeat.staging_epoch() OWNER TO heartbeat_definer;
    ALTER FUNCTION heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz) OWNER TO heartbeat_definer;
    ALTER FUNCTION heartbeat.disconnect_replica(uuid, timestamptz, timestamptz) OWNER TO heartbeat_definer;
    ALTER FUNCTION heartbeat.agent_status(interval, uuid[]) OWNER TO heartbeat_definer;
    ALTER FUNCTION heartbeat.sweep_status() OWNER TO heartbeat_definer;
    REVOKE CREATE ON SCHEMA heartbeat FROM heartbeat_definer;

    PERFORM heartbeat.check_privilege_model();
END
$apply$;
REVOKE ALL ON FUNCTION heartbeat.apply_privileges() FROM PUBLIC;

SELECT heartbeat.apply_privileges();
