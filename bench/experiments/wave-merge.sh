#!/bin/bash
# Experiment: the connect-wave merge of today (sql/016 merge_part, parts 0 and 1) against the prototype of
# wave-merge.sql (parts 2 and 3) on the same rows: N agents disconnected an hour ago, each heartbeating now
# (N/4 staged rows per part, every one a status change), three rounds. Run on a migrated database:
#   WAVE_TRUNCATE_OK=1 bench/experiments/wave-merge.sh postgres://postgres@127.0.0.1:5432/plancheck 200000
# It TRUNCATEs public.workspace_agents and staging: only on a throwaway database, and only with WAVE_TRUNCATE_OK=1.
set -euo pipefail
U=${1:?usage: WAVE_TRUNCATE_OK=1 wave-merge.sh URL N}; N=${2:?usage: WAVE_TRUNCATE_OK=1 wave-merge.sh URL N}
[ "${WAVE_TRUNCATE_OK:-}" = 1 ] || { echo "refusing: this TRUNCATEs public.workspace_agents in $U; set WAVE_TRUNCATE_OK=1 on a throwaway database" >&2; exit 2; }
psql "$U" -qAt -f "$(dirname "$0")/wave-merge.sql"
reset() {
psql "$U" -qAt -c "TRUNCATE heartbeat.agent_connection_staging" -c "TRUNCATE heartbeat.status_events_pending" \
  -c "UPDATE public.workspace_agents SET first_connected_at = now() - interval '2 hours', last_connected_at = now() - interval '1 hour', disconnected_at = now() - interval '59 minutes', updated_at = now() - interval '59 minutes'" \
  -c "VACUUM ANALYZE public.workspace_agents" \
  -c "INSERT INTO heartbeat.agent_connection_staging (agent_id, first_connected_at, last_connected_at, updated_at) SELECT id, now() - interval '2 hours', now() - interval '1 second', now() - interval '1 second' FROM public.workspace_agents" \
  -c "CHECKPOINT"
}
psql "$U" -qAt -c "TRUNCATE public.workspace_agents" -c "INSERT INTO public.workspace_agents (id, updated_at) SELECT gen_random_uuid(), now() - interval '3 hours' FROM generate_series(1, $N)"
for round in 1 2 3; do
  reset
  echo "round $round current merge_part (parts 0,1):"
  psql "$U" -qAt -c "\timing on" -c "SELECT rows_consumed, agents_updated, status_events, deferred_locked FROM heartbeat.merge_staging_part(0, 1000000)" -c "SELECT rows_consumed, agents_updated, status_events FROM heartbeat.merge_staging_part(1, 1000000)" | tr '\n' ' '; echo
  echo "round $round prototype (parts 2,3):"
  psql "$U" -qAt -c "\timing on" -c "BEGIN" -c "SELECT * FROM public.wave_merge('agent_connection_staging_p2', 1000000)" -c "SELECT heartbeat.publish_events()" -c "COMMIT" -c "BEGIN" -c "SELECT * FROM public.wave_merge('agent_connection_staging_p3', 1000000)" -c "SELECT heartbeat.publish_events()" -c "COMMIT" | tr '\n' ' '; echo
  psql "$U" -qAt -c "SELECT to_status, count(*) FROM heartbeat.status_events GROUP BY 1" -c "SELECT count(*) FILTER (WHERE disconnected_at < last_connected_at) AS connected, count(*) FROM public.workspace_agents" | tr '\n' ' '; echo
done
