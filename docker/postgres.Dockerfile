# PostgreSQL with pg_cron, for docker-compose.yml. The official image's apt source
# is apt.postgresql.org, which packages pg_cron for every major as
# postgresql-<major>-cron (pg_cron 1.6 here: seconds schedules work). The image
# sets PG_MAJOR. pg_cron itself is preloaded by the compose service's command.
FROM postgres:17-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}-cron" \
 && rm -rf /var/lib/apt/lists/*
# Runs once, when the data volume is first initialised, in POSTGRES_DB
# (which must be cron.database_name).
COPY initdb/ /docker-entrypoint-initdb.d/
