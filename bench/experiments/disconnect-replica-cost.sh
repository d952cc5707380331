#!/usr/bin/env bash
# The cost of sql/021 (disconnect_replica() also stages disconnects for connections through the
# replica that are still staged): the 1.6 function (sql/020, installed beside it under another
# name) against today's, alternately in one run, each call rolled back so every call sees the same
# rows. Usage: bench/experiments/disconnect-replica-cost.sh [DATABASE_URL of a server you can
# create a database on] (default postgres://postgres@127.0.0.1:5432/postgres). Prints psql timings.
set -euo pipefail
cd "$(dirname "$0")/../.."
U="${1:-postgres://postgres@127.0.0.1:5432/postgres}"
DB=hb_disconnect_replica_cost
psql "$U" -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
D="${U%/*}/$DB"
psql "$D" -q -f sql/roles.sql
node --import tsx src/cli/main.ts migrate --database-url "$D" >/dev/null
# the 1.6 function, under another name
sed -e '/^SET LOCAL lock_timeout/d' -e 's/heartbeat\.disconnect_replica(/heartbeat.disconnect_replica_16(/' \
  sql/020_disconnect_replica_lock_order.sql | psql "$D" -q
psql "$D" -q <<'SQL'
ALTER FUNCTION heartbeat.disconnect_replica_16(uuid, timestamptz, timestamptz) OWNER TO heartbeat_definer;
-- 100,000 agents connected through replica A; 100,000 others connected through B with a heartbeat
-- each staged (B's flush); 10,000 disconnected agents reconnected through A, staged
INSERT INTO public.workspace_agents (id, updated_at, last_connected_at, last_connected_replica_id)
SELECT gen_random_uuid(), now() - interval '1 minute', now() - interval '1 minute', 'aaaaaaaa-0000-4000-8000-000000000000'
  FROM generate_series(1, 100000);
INSERT INTO public.workspace_agents (id, updated_at, last_connected_at, last_connected_replica_id)
SELECT gen_random_uuid(), now() - interval '1 minute', now() - interval '1 minute', 'bbbbbbbb-0000-4000-8000-000000000000'
  FROM generate_series(1, 100000);
INSERT INTO public.workspace_agents (id, updated_at, last_connected_at, disconnected_at, last_connected_replica_id)
SELECT gen_random_uuid(), now() - interval '50 seconds', now() - interval '1 minute', now() - interval '50 seconds', 'aaaaaaaa-0000-4000-8000-000000000000'
  FROM generate_series(1, 10000);
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, last_connected_replica_id, updated_at)
SELECT id, now() - interval '10 seconds', last_connected_replica_id, now() - interval '10 seconds'
  FROM public.workspace_agents WHERE last_connected_replica_id = 'bbbbbbbb-0000-4000-8000-000000000000';
INSERT INTO heartbeat.agent_connection_staging (agent_id, last_connected_at, last_connected_replica_id, updated_at)
SELECT id, now() - interval '10 seconds', last_connected_replica_id, now() - interval '10 seconds'
  FROM public.workspace_agents WHERE disconnected_at IS NOT NULL;
VACUUM ANALYZE public.workspace_agents;
SQL
for i in 1 2 3; do
  for f in disconnect_replica_16 disconnect_replica; do
    printf '%s ' "$f"
    psql "$D" -qAt -c '\timing on' -c 'BEGIN' \
      -c "SELECT heartbeat.$f('aaaaaaaa-0000-4000-8000-000000000000', now(), now())" -c 'ROLLBACK' | grep -E '^[0-9]+$|Time' | tr '\n' ' ' | sed -n 's/.*\(Time: [0-9.]* ms\) \([0-9]*\) Time: \([0-9.]* ms\).*/\2 rows, \3/p'; echo
  done
done
psql "$U" -qc "DROP DATABASE $DB"
