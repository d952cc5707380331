-- Installing pg_heartbeat: the roles once per cluster (sql/roles.sql), the
-- application's table (sql/001, or your own with the same columns), then
-- CREATE EXTENSION. What it installs, who owns what, and who may do what.
-- (make installcheck exports PG_HEARTBEAT_SQL, the sql/ directory)
\set sqldir `echo "$PG_HEARTBEAT_SQL"`
\set ECHO none
\set QUIET on
\i :sqldir/roles.sql
BEGIN;
\i :sqldir/001_workspace_agents.sql
COMMIT;
\set QUIET off
\set ECHO all
CREATE EXTENSION pg_heartbeat;
SELECT extversion FROM pg_extension WHERE extname = 'pg_heartbeat';

-- every member, by kind
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS member
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_heartbeat')
 ORDER BY 1;

-- the application's table is not a member: pg_dump keeps dumping it with its rows
SELECT count(*) AS workspace_agents_is_member
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.objid = 'public.workspace_agents'::regclass;

-- staging: a hash-partitioned parent of 4 UNLOGGED parts, nothing that slows COPY
SELECT c.relname, c.relkind, c.relpersistence, pg_get_expr(c.relpartbound, c.oid) AS bound,
       (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid) AS indexes,
       (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid) AS triggers
  FROM pg_class c
 WHERE c.relnamespace = 'heartbeat'::regnamespace AND c.relname LIKE 'agent_connection_staging%'
 ORDER BY 1;

-- the SECURITY DEFINER functions run as heartbeat_definer, with a pinned search_path
SELECT p.oid::regprocedure::text AS function, pg_get_userbyid(p.proowner) AS owner, p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'heartbeat'::regnamespace AND p.prosecdef
 ORDER BY 1;

-- heartbeat_definer is an unprivileged NOLOGIN role, member of no role
SELECT rolname, rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,
       (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) AS member_of
  FROM pg_roles r
 WHERE rolname IN ('heartbeat_definer', 'heartbeat_writer', 'heartbeat_reader')
 ORDER BY 1;

-- EXECUTE: nothing for PUBLIC; the entry points for writers; status for readers
SELECT p.oid::regprocedure::text AS function,
       has_function_privilege('heartbeat_writer', p.oid, 'EXECUTE') AS writer,
       has_function_privilege('heartbeat_reader', p.oid, 'EXECUTE') AS reader,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public
  FROM pg_proc p
 WHERE p.pronamespace = 'heartbeat'::regnamespace
 ORDER BY 1;

-- tables: the writer inserts into staging (COPY) and reads status; nothing for PUBLIC
SELECT c.oid::regclass::text AS relation,
       has_table_privilege('heartbeat_writer', c.oid, 'INSERT') AS writer_insert,
       has_table_privilege('heartbeat_writer', c.oid, 'SELECT') AS writer_select,
       has_table_privilege('heartbeat_writer', c.oid, 'DELETE') AS writer_delete,
       has_table_privilege('heartbeat_reader', c.oid, 'SELECT') AS reader_select,
       has_table_privilege('public', c.oid, 'SELECT,INSERT,UPDATE,DELETE') AS public
  FROM pg_class c
 WHERE c.relnamespace = 'heartbeat'::regnamespace AND c.relkind IN ('r', 'p', 'v')
 ORDER BY 1;

SELECT heartbeat.check_privilege_model();
