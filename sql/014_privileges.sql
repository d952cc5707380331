-- pg-heartbeat 014: the privilege model (docs/security.md).
--
-- Who may do what:
--   heartbeat_writer   INSERT (COPY) into staging; EXECUTE the merge, the
--                      disconnects, staging_epoch(), agent_status(); read status.
--                      Any member may write heartbeats and disconnects for ANY
--                      agent: there is no per-agent authorisation.
--   heartbeat_reader   read status (heartbeat.status, part_status(), agent_status()).
--   heartbeat_definer  owns every SECURITY DEFINER function of the schema, so they
--                      run with its rights: SELECT and UPDATE of the connection
--                      columns of public.workspace_agents, and pg-heartbeat's own
--                      tables. NOLOGIN, no attributes, member of no role: a
--                      trigger, CHECK function, rule or index expression on
--                      workspace_agents that runs inside the merge runs as this
--                      role, and can do no more than it.
--   the owner          the role that ran the migrations (or CREATE EXTENSION):
--                      owns the tables, the schema and the functions that run with
--                      the caller's rights (set_staging_parts, schedule_merge, ...).
--
-- heartbeat.apply_privileges() sets all of this (idempotent; later migrations
-- call it again after replacing functions) and then heartbeat.check_privilege_model()
-- refuses a setup that breaks it.
SET LOCAL lock_timeout = '10s';

DROP FUNCTION heartbeat.reject_future(timestamptz, text);  -- replaced by heartbeat.check_times()

-- Raises unless the privilege model holds:
--   * every SECURITY DEFINER function of the schema is owned by heartbeat_definer;
--   * heartbeat_definer is not a superuser and has no rights the owner of
--     public.workspace_agents lacks (role attributes, role memberships) while the
--     table (or, for a view, its base tables) runs code owned by another role:
--     a trigger, rule, CHECK constraint, index expression, policy, generated
--     column or CHECK of a column's domain calling a function that is not
--     pg_catalog's.
CREATE FUNCTION heartbeat.check_privilege_model()
RETURNS void
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $check$
DECLARE
    definer     oid := (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'heartbeat_definer');
    table_oid   oid := pg_catalog.to_regclass('public.workspace_agents');
    owner_oid   oid;
    wrong       text;
    extra       text[];
    foreign_fn  text[];
BEGIN
    IF definer IS NULL THEN
        RAISE EXCEPTION 'pg-heartbeat: the role heartbeat_definer does not exist (apply sql/roles.sql)'
            USING ERRCODE = '42704';
    END IF;
    SELECT pg_catalog.string_agg(p.oid::regprocedure::text || ' (owner '
                                 || pg_catalog.pg_get_userbyid(p.proowner) || ')', ', ')
      INTO wrong
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = 'heartbeat'::regnamespace AND p.prosecdef
       AND p.proowner <> definer;
    IF wrong IS NOT NULL THEN
        RAISE EXCEPTION 'pg-heartbeat: SECURITY DEFINER functions not owned by heartbeat_definer: %', wrong
            USING ERRCODE = '42501',
                  HINT = 'Run pg-heartbeat migrate again, or SELECT heartbeat.apply_privileges(); as the owner of the schema.';
    END IF;
    IF table_oid IS NULL THEN
        RETURN;
    END IF;
    SELECT c.relowner INTO owner_oid FROM pg_catalog.pg_class c WHERE c.oid = table_oid;

    -- rights heartbeat_definer has and the table's owner has not
    SELECT pg_catalog.array_agg(x) INTO extra FROM (
        SELECT a.attr AS x
          FROM pg_catalog.pg_roles d, pg_catalog.pg_roles o,
               LATERAL (VALUES ('SUPERUSER', d.rolsuper, o.rolsuper), ('CREATEROLE', d.rolcreaterole, o.rolcreaterole),
                               ('CREATEDB', d.rolcreatedb, o.rolcreatedb), ('REPLICATION', d.rolreplication, o.rolreplication),
                               ('BYPASSRLS', d.rolbypassrls, o.rolbypassrls)) AS a(attr, def, own)
         WHERE d.oid = definer AND o.oid = owner_oid AND a.def AND NOT a.own
        UNION ALL
        -- any membership (NOINHERIT too: SET ROLE reaches it), unless the owner has it as well
        SELECT 'member of ' || r.rolname
          FROM pg_catalog.pg_roles r
         WHERE r.oid <> definer
           AND pg_catalog.pg_has_role(definer, r.oid, 'MEMBER')
           AND NOT pg_catalog.pg_has_role(owner_oid, r.oid, 'MEMBER')
    ) s;
    IF extra IS NULL THEN
        RETURN;
    END IF;

    -- code that runs when the merge reads or updates the table: functions referenced by the
    -- table's (and for a view its base tables') triggers, rules, constraints, indexes, policies, defaults
    WITH RECURSIVE rels(oid) AS (
        SELECT table_oid
        UNION
        SELECT d.refobjid
          FROM rels, pg_catalog.pg_rewrite rw
          JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass
                                      AND d.objid = rw.oid
         WHERE rw.ev_class = rels.oid
           AND d.refclassid = 'pg_catalog.pg_class'::regclass
           AND d.refobjid <> rels.oid
    ), types(typid) AS (
        -- the columns' types, and what those are built on: a domain's CHECK runs on every assignment
        SELECT a.atttypid FROM pg_catalog.pg_attribute a, rels
         WHERE a.attrelid = rels.oid AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT x.typid FROM types, pg_catalog.pg_type t,
               LATERAL (VALUES (t.typbasetype), (t.typelem)) AS x(typid)
         WHERE t.oid = types.typid AND x.typid <> 0
    ), attached(classid, objid) AS (
        SELECT 'pg_catalog.pg_trigger'::regclass::oid, t.oid FROM pg_catalog.pg_trigger t, rels
         WHERE t.tgrelid = rels.oid AND NOT t.tgisinternal
        UNION ALL
        SELECT 'pg_catalog.pg_rewrite'::regclass::oid, rw.oid FROM pg_catalog.pg_rewrite rw, rels
         WHERE rw.ev_class = rels.oid
        UNION ALL
        SELECT 'pg_catalog.pg_constraint'::regclass::oid, c.oid FROM pg_catalog.pg_constraint c, rels
         WHERE c.conrelid = rels.oid
        UNION ALL
        SELECT 'pg_catalog.pg_constraint'::regclass::oid, c.oid FROM pg_catalog.pg_constraint c, types
         WHERE c.contypid = types.typid
        UNION ALL
        SELECT 'pg_catalog.pg_class'::regclass::oid, i.indexrelid FROM pg_catalog.pg_index i, rels
         WHERE i.indrelid = rels.oid
        UNION ALL
        SELECT 'pg_catalog.pg_policy'::regclass::oid, po.oid FROM pg_catalog.pg_policy po, rels
         WHERE po.polrelid = rels.oid
        UNION ALL
        SELECT 'pg_catalog.pg_attrdef'::regclass::oid, ad.oid FROM pg_catalog.pg_attrdef ad, rels
         WHERE ad.adrelid = rels.oid
    ), functions AS (
        SELECT t.tgfoid AS fn FROM pg_catalog.pg_trigger t JOIN attached a ON a.objid = t.oid
         WHERE a.classid = 'pg_catalog.pg_trigger'::regclass::oid
        UNION
        SELECT d.refobjid FROM attached a JOIN pg_catalog.pg_depend d
            ON d.classid = a.classid AND d.objid = a.objid
         WHERE d.refclassid = 'pg_catalog.pg_proc'::regclass
    )
    SELECT pg_catalog.array_agg(DISTINCT p.oid::regprocedure::text || ' (owner '
                                || pg_catalog.pg_get_userbyid(p.proowner) || ')')
      INTO foreign_fn
      FROM functions f JOIN pg_catalog.pg_proc p ON p.oid = f.fn
     WHERE p.pronamespace <> 'pg_catalog'::regnamespace
       AND p.proowner <> definer;
    IF foreign_fn IS NOT NULL THEN
        RAISE EXCEPTION 'pg-heartbeat refuses this setup: heartbeat_definer has rights the owner of public.workspace_agents (%) lacks (%), and the table runs functions owned by others inside the merge: %',
            pg_catalog.pg_get_userbyid(owner_oid), pg_catalog.array_to_string(extra, ', '), pg_catalog.array_to_string(foreign_fn, ', ')
            USING ERRCODE = '42501',
                  HINT = 'heartbeat_definer must stay an unprivileged NOLOGIN role: REVOKE what was granted to it (docs/security.md).';
    END IF;
END
$check$;
REVOKE ALL ON FUNCTION heartbeat.check_privilege_model() FROM PUBLIC;

-- Grants what each role needs, hands every SECURITY DEFINER function to
-- heartbeat_definer, and checks the result. Run by the owner of the schema.
-- This is the one list of pg-heartbeat's privileges: a migration that adds or
-- replaces a function replaces this function too and calls it again (the check
-- at the end fails on a SECURITY DEFINER function left out).
CREATE FUNCTION heartbeat.apply_privileges()
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
                              heartbeat.assert_definer(), heartbeat.apply_snapshots(heartbeat.snapshot[]),
                              heartbeat.merge_part(integer, name, integer, interval, timestamptz, text),
                              heartbeat.merge_prelude(integer), heartbeat.staging_parts(),
                              heartbeat.check_times(text, timestamptz[])
       TO heartbeat_definer;

    -- writers and readers read pg-heartbeat's own tables (status runs with the caller's rights)
    GRANT SELECT ON heartbeat.agent_connection_staging, heartbeat.merge_state, heartbeat.merge_skips,
                    heartbeat.staging_epoch, heartbeat.dead_letters, heartbeat.settings, heartbeat.status
       TO heartbeat_writer, heartbeat_reader;
    GRANT EXECUTE ON FUNCTION heartbeat.merge_status(), heartbeat.part_status(), heartbeat.staging_parts(),
                              heartbeat.valid_time(timestamptz, timestamptz), heartbeat.clock_horizon(),
                              heartbeat.agent_status(interval, uuid[])
       TO heartbeat_writer, heartbeat_reader;
    -- writers write: COPY into staging, the merge, the disconnects, the staging epoch
    GRANT INSERT ON heartbeat.agent_connection_staging TO heartbeat_writer;
    GRANT EXECUTE ON FUNCTION heartbeat.merge_agent_connections(integer, interval, text),
                              heartbeat.merge_staging_part(integer, integer, interval, text),
                              heartbeat.disconnect_agent(uuid, timestamptz, timestamptz, uuid, timestamptz, timestamptz),
                              heartbeat.disconnect_replica(uuid, timestamptz, timestamptz),
                              heartbeat.staging_epoch()
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
    REVOKE CREATE ON SCHEMA heartbeat FROM heartbeat_definer;

    PERFORM heartbeat.check_privilege_model();
END
$apply$;
REVOKE ALL ON FUNCTION heartbeat.apply_privileges() FROM PUBLIC;

SELECT heartbeat.apply_privileges();
