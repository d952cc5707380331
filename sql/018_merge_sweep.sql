-- pg-heartbeat 018: the merge sweeps when its caller says the call is a transaction of its own.
--
-- heartbeat.merge_epilogue() (sql/016) sweeps at the end of a merge only when the call is a
-- transaction of its own, and judged that by statement_timestamp() = transaction_timestamp(): true
-- for a plain SELECT sent with the simple query protocol (psql, pg_cron), false with the extended
-- protocol (parameters: node-postgres, psycopg, pgx...), where Bind sets a later statement time
-- than Parse began the transaction at. The client then ran heartbeat.sweep_status() as a second
-- statement after every merge. Now a caller that knows (pg-heartbeat's merger, mergeNow() on a pool)
-- says so in the same statement, transaction-locally:
--     SELECT ... FROM heartbeat.merge_agent_connections(..., CASE WHEN pg_catalog.set_config(
--         'heartbeat.merge_in_own_transaction', 'on', true) = 'on' THEN $3 END)
-- and may ask for fewer sweeps with 'heartbeat.sweep_min_gap' (an interval; default 1 second):
-- replicas merging every 5 s then sweep about once per interval between them, not once each.
-- Never set the flag inside a transaction you keep open: the sweep holds the event-state lock
-- exclusively until the transaction ends.
SET LOCAL lock_timeout = '10s';

CREATE OR REPLACE FUNCTION heartbeat.merge_epilogue(more boolean, OUT swept_events bigint, OUT swept boolean)
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $epilogue$
DECLARE
    own boolean := pg_catalog.transaction_timestamp() >= pg_catalog.statement_timestamp()
                   OR pg_catalog.current_setting('heartbeat.merge_in_own_transaction', true) = 'on';
    gap interval := interval '1 second';
BEGIN
    swept_events := 0;
    swept := false;
    BEGIN
        gap := GREATEST(gap, NULLIF(pg_catalog.current_setting('heartbeat.sweep_min_gap', true), '')::interval);
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR syntax_error THEN
        NULL;  -- not an interval: the default
    END;
    IF NOT more AND own THEN
        IF EXISTS (SELECT 1 FROM heartbeat.event_state e WHERE e.last_sweep_at > pg_catalog.clock_timestamp() - gap) THEN
            swept := true;   -- another merger swept that recently
        ELSE
            swept_events := heartbeat.sweep_events(false);
            swept := swept_events IS NOT NULL;
            swept_events := COALESCE(swept_events, 0);
        END IF;
    END IF;
    PERFORM heartbeat.publish_events();
END
$epilogue$;
