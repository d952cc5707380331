-- Who may do what, tried as real roles; and the attack of a table owner who plants a
-- trigger, a CHECK function, a rule and an index expression on workspace_agents to
-- get the rights of pg-heartbeat's SECURITY DEFINER functions: they run as the
-- unprivileged heartbeat_definer, so `rolsuper` never flips.
\set VERBOSITY terse
CREATE ROLE regress_hb_app LOGIN IN ROLE heartbeat_writer;
CREATE ROLE regress_hb_reader LOGIN IN ROLE heartbeat_reader;
CREATE ROLE regress_hb_owner LOGIN IN ROLE heartbeat_writer;
GRANT CREATE ON SCHEMA public TO regress_hb_owner;
CREATE FUNCTION pg_temp.agent(c text) RETURNS uuid LANGUAGE sql AS $$ SELECT ('00000000-0000-4000-8000-0000000000f' || c)::uuid $$;
INSERT INTO public.workspace_agents (id, updated_at) VALUES (pg_temp.agent('1'), now() - interval '1 hour');

-- a writer (logged in as itself): stages, merges, disconnects, reads status; nothing else
\c - regress_hb_app
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
VALUES ('00000000-0000-4000-8000-0000000000f1', now(), now());
SELECT agents_updated FROM heartbeat.merge_agent_connections();
SELECT heartbeat.disconnect_agent('00000000-0000-4000-8000-0000000000f1', now(), now());
SELECT count(*) > 0 AS reads_status FROM heartbeat.status;
SELECT * FROM public.workspace_agents;
DELETE FROM heartbeat.agent_connection_staging;
SELECT * FROM heartbeat.agent_connection_staging_p0;
UPDATE heartbeat.settings SET max_rows_per_merge = 1;
DELETE FROM heartbeat.dead_letters;
SELECT heartbeat.set_staging_parts(2);
SELECT heartbeat.retry_dead_letters();
SELECT heartbeat.apply_privileges();
SELECT * FROM heartbeat.merge_part(0, 'agent_connection_staging_p0', 10, NULL, now(), NULL, now(), NULL, now());
SET ROLE heartbeat_definer;

-- a reader: status only
\c - regress_hb_reader
SELECT count(*) > 0 AS reads_status FROM heartbeat.status;
SELECT count(*) AS agents FROM heartbeat.agent_status(agent_ids => ARRAY['00000000-0000-4000-8000-0000000000f1'::uuid]);
INSERT INTO heartbeat.agent_connection_staging (agent_id, updated_at) VALUES ('00000000-0000-4000-8000-0000000000f1', now());
SELECT * FROM heartbeat.merge_agent_connections();

-- the attack: the application role owns the table and plants code on it
\c - postgres
ALTER TABLE public.workspace_agents OWNER TO regress_hb_owner;
\c - regress_hb_owner
CREATE TABLE public.regress_seen (who name, how text);
CREATE FUNCTION public.regress_pwn(how text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.regress_seen VALUES (current_user, how);
    BEGIN
        EXECUTE 'ALTER ROLE regress_hb_owner SUPERUSER';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;  -- not a superuser: the escalation failed, the attack carries on quietly
    END;
    RETURN true;
END $$;
GRANT INSERT ON public.regress_seen TO PUBLIC;
CREATE FUNCTION public.regress_pwn_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.regress_pwn('trigger');
    RETURN NEW;
END $$;
CREATE TRIGGER regress_pwn BEFORE UPDATE ON public.workspace_agents FOR EACH ROW EXECUTE FUNCTION public.regress_pwn_trigger();
ALTER TABLE public.workspace_agents ADD CONSTRAINT regress_pwn CHECK (public.regress_pwn('check'));
CREATE RULE regress_pwn AS ON UPDATE TO public.workspace_agents DO ALSO SELECT public.regress_pwn('rule');
-- the writer's disconnect and the merge run the planted code ...
\c - regress_hb_app
SELECT heartbeat.disconnect_agent('00000000-0000-4000-8000-0000000000f1', now(), now());
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, updated_at)
VALUES ('00000000-0000-4000-8000-0000000000f1', now(), now());
-- (the merge cannot run at all while the table has a DO ALSO rule: PostgreSQL refuses rules on
-- data-modifying WITH queries; it fails as a whole and the staged row stays for the next merge)
SELECT agents_updated, dead_lettered FROM heartbeat.merge_agent_connections();
\c - regress_hb_owner
DROP RULE regress_pwn ON public.workspace_agents;
\c - regress_hb_app
SELECT agents_updated, dead_lettered FROM heartbeat.merge_agent_connections();
\c - postgres
-- ... as heartbeat_definer, which cannot make anyone a superuser
SELECT DISTINCT who, how FROM public.regress_seen ORDER BY how;
SELECT rolname, rolsuper FROM pg_roles WHERE rolname = 'regress_hb_owner';

-- the refusal: with heartbeat_definer privileged, a table that runs others' code is refused
ALTER ROLE heartbeat_definer CREATEROLE;
SELECT heartbeat.check_privilege_model();
-- and the functions refuse to run with the rights of a privileged role
\c - regress_hb_app
SELECT heartbeat.disconnect_agent('00000000-0000-4000-8000-0000000000f1', now(), now());
\c - postgres
ALTER ROLE heartbeat_definer NOCREATEROLE;
SELECT heartbeat.check_privilege_model();

-- clean up: the table back to its owner, the roles gone
ALTER TABLE public.workspace_agents DROP CONSTRAINT regress_pwn;
DROP TRIGGER regress_pwn ON public.workspace_agents;
ALTER TABLE public.workspace_agents OWNER TO CURRENT_USER;
DROP TABLE public.regress_seen;
DROP FUNCTION public.regress_pwn_trigger();
DROP FUNCTION public.regress_pwn(text);
REVOKE CREATE ON SCHEMA public FROM regress_hb_owner;
DROP ROLE regress_hb_app;
DROP ROLE regress_hb_reader;
DROP ROLE regress_hb_owner;
