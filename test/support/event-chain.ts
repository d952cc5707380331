/**
 * The transition oracle of status events: for each agent, its events (in id order) must chain —
 * each one starts from the status the previous one ended at, and changes it — starting from the
 * agent's status before them, and the last must end at the status its row has now at the sweep's
 * instant (heartbeat.event_state.swept_through). A missed, doubled or reordered transition breaks it.
 */
import type pg from 'pg';

/** Problems found (empty: the events match). `before(id)`: the agent's status before its first event. */
export async function eventChainProblems(
  pool: pg.Pool,
  agentIds: string[],
  before: (agentId: string) => string,
  afterId = 0,
): Promise<{ problems: string[]; events: number; reasons: Set<string> }> {
  const { rows: events } = await pool.query<{ agent_id: string; from_status: string; to_status: string; reason: string }>(
    `SELECT agent_id, from_status, to_status, reason FROM heartbeat.status_events
      WHERE id > $1 AND agent_id = ANY ($2::uuid[]) ORDER BY id`,
    [afterId, agentIds],
  );
  const { rows: now } = await pool.query<{ id: string; status: string }>(
    `SELECT wa.id, heartbeat.status_at(wa.first_connected_at, wa.last_connected_at, wa.disconnected_at, wa.created_at,
                                       wa.connection_timeout_seconds, e.swept_through, e.swept_through - e.swept_timeout,
                                       e.swept_through + s.max_clock_skew) AS status
       FROM public.workspace_agents wa, heartbeat.event_state e, heartbeat.settings s
      WHERE wa.id = ANY ($1::uuid[])`,
    [agentIds],
  );
  const current = new Map(agentIds.map((id) => [id, before(id)]));
  const problems: string[] = [];
  const reasons = new Set<string>();
  for (const e of events) {
    const was = current.get(e.agent_id);
    if (e.from_status !== was) problems.push(`${e.agent_id}: an event from ${e.from_status} while it was ${was} (a missed or doubled transition)`);
    if (e.to_status === e.from_status) problems.push(`${e.agent_id}: an event that changes nothing (${e.from_status})`);
    reasons.add(e.reason);
    current.set(e.agent_id, e.to_status);
  }
  for (const { id, status } of now) {
    if (current.get(id) !== status) problems.push(`${id}: its events end at ${current.get(id)}, its row says ${status}`);
  }
  return { problems, events: events.length, reasons };
}
