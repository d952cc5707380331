-- Runs once, in POSTGRES_DB, when the data volume is first initialised (the
-- official image's /docker-entrypoint-initdb.d). pg_cron must be created in the
-- database named by cron.database_name, which docker-compose.yml sets to POSTGRES_DB.
CREATE EXTENSION IF NOT EXISTS pg_cron;
