/**
 * The floor under stage(): what 200,000 agents cost per call with NO validation at all — the update
 * literal, a snapshot object and one Map lookup/update (CPU time per call, after warm-up).
 * `node --import tsx bench/experiments/stage-floor.ts`. Compare with bench/micro-cli.ts (the real stage()).
 */
import { randomUUID } from 'node:crypto';
const N = 200_000;
const ids = Array.from({ length: N }, () => randomUUID());
const replica = randomUUID();
const first = new Date();
const m = new Map<string, { agentId: string; first: number; last: number; replica: string | null; disconnected: number; updated: number }>();
for (let r = 0; r < 6; r++) {
  const at = new Date(Date.now() - 60000 + r);
  const c0 = process.cpuUsage();
  for (let i = 0; i < N; i++) {
    const u = { agentId: ids[i]!, firstConnectedAt: first, lastConnectedAt: at, lastConnectedReplicaId: replica, updatedAt: at };
    const s = { agentId: u.agentId, first: u.firstConnectedAt.getTime(), last: u.lastConnectedAt.getTime(), replica: u.lastConnectedReplicaId, disconnected: NaN, updated: u.updatedAt.getTime() };
    const k = m.get(s.agentId);
    if (k === undefined) m.set(s.agentId, s); else if (s.updated > k.updated) { k.last = s.last; k.updated = s.updated; }
  }
  const c = process.cpuUsage(c0);
  console.log(r, ((c.user + c.system) * 1000 / N).toFixed(0), 'ns per call (floor: literal + snapshot + Map, no validation)');
}
