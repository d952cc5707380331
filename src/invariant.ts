/**
 * The timing invariant that keeps a live agent 'connected':
 *
 *   flush interval + heartbeat interval + merge interval < inactive timeout
 *
 * An agent heartbeats every `heartbeatIntervalMs`; the stager holds an update
 * up to `flushIntervalMs` before COPYing it; the merge runs every
 * `mergeIntervalMs`. In the worst case a heartbeat reaches workspace_agents
 * that long after the previous one did, and heartbeat.agent_status() calls the
 * agent 'disconnected' once last_connected_at is older than the inactive
 * timeout. Defaults: 5 s + 15 s + 5 s = 25 s < 30 s. (With flushes and merges
 * aligned on one grid the real worst case is lower, heartbeat + flush interval +
 * flushLeadMs + the merge's jitter offset; the check keeps the plain sum, which
 * also holds for flushes and merges that are not aligned.)
 */
export interface TimingOptions {
  /** How often each agent heartbeats (default 15 000 ms). */
  heartbeatIntervalMs?: number;
  /** The stager's flush interval (default 5 000 ms). */
  flushIntervalMs?: number;
  /** How often the merge runs, including jitter (default 5 000 ms). */
  mergeIntervalMs?: number;
  /** agent_status()'s inactive timeout (default 30 000 ms). */
  inactiveTimeoutMs?: number;
}

export interface TimingCheck {
  ok: boolean;
  /** flush + heartbeat + merge, in ms: the worst-case age of last_connected_at for a live agent. */
  worstCaseMs: number;
  inactiveTimeoutMs: number;
  /** A one-line explanation when the invariant is broken. */
  message?: string;
}

export const TIMING_DEFAULTS = {
  heartbeatIntervalMs: 15_000,
  flushIntervalMs: 5_000,
  mergeIntervalMs: 5_000,
  inactiveTimeoutMs: 30_000,
} as const;

/** Checks flush + heartbeat + merge < inactive timeout (missing values take the defaults). */
export function checkTimingInvariant(options: TimingOptions = {}): TimingCheck {
  const flush = options.flushIntervalMs ?? TIMING_DEFAULTS.flushIntervalMs;
  const heartbeat = options.heartbeatIntervalMs ?? TIMING_DEFAULTS.heartbeatIntervalMs;
  const merge = options.mergeIntervalMs ?? TIMING_DEFAULTS.mergeIntervalMs;
  const timeout = options.inactiveTimeoutMs ?? TIMING_DEFAULTS.inactiveTimeoutMs;
  for (const [name, value] of Object.entries({ flush, heartbeat, merge, timeout })) {
    if (!Number.isFinite(value) || value < 0) throw new RangeError(`checkTimingInvariant: ${name} must be a non-negative number of ms`);
  }
  const worstCaseMs = flush + heartbeat + merge;
  if (worstCaseMs < timeout) return { ok: true, worstCaseMs, inactiveTimeoutMs: timeout };
  return {
    ok: false,
    worstCaseMs,
    inactiveTimeoutMs: timeout,
    message:
      `flush interval ${flush} ms + heartbeat interval ${heartbeat} ms + merge interval ${merge} ms = ${worstCaseMs} ms ` +
      `is not below the inactive timeout ${timeout} ms: live agents will flap to 'disconnected'; ` +
      'merge or flush more often, or raise the inactive timeout',
  };
}
