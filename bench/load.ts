/**
 * The simulated fleet: N agents, each heartbeating once every `periodMs`
 * (15 s by default) at a random phase, so the fleet offers N / 15 heartbeats
 * per second, spread evenly over time at the real rate. A heartbeat is handed
 * to the strategy under test as (agent index, timestamp); the sampled agents'
 * heartbeats are also handed to the staleness prober.
 */
export interface HeartbeatSink {
  /** One heartbeat of agent `index` taken at `at` (epoch ms). Must not block. */
  offer(index: number, at: Date): void;
}

export interface Fleet {
  ids: string[];
  /** The order agents heartbeat in within each period (a random permutation: random phase per agent). */
  order: Uint32Array;
}

export function makeFleet(ids: string[]): Fleet {
  const order = new Uint32Array(ids.length);
  for (let i = 0; i < order.length; i++) order[i] = i;
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    const t = order[i]!;
    order[i] = order[j]!;
    order[j] = t;
  }
  return { ids, order };
}

export interface LoadGenerator {
  /** Heartbeats offered so far. */
  readonly offered: number;
  stop(): void;
}

/**
 * Offers heartbeats at `fleet.ids.length / periodMs` per ms, in ticks of
 * `tickMs`. A late tick catches up (the rate over any second stays real).
 */
export function startLoad(fleet: Fleet, periodMs: number, sinks: HeartbeatSink[], tickMs = 20): LoadGenerator {
  const n = fleet.ids.length;
  const perMs = n / periodMs;
  const started = performance.now();
  let cursor = 0;
  let offered = 0;
  const tick = (): void => {
    const due = Math.floor((performance.now() - started) * perMs) - offered;
    if (due <= 0) return;
    const at = new Date();
    for (let k = 0; k < due; k++) {
      const index = fleet.order[cursor]!;
      cursor = cursor + 1 === n ? 0 : cursor + 1;
      for (const sink of sinks) sink.offer(index, at);
    }
    offered += due;
  };
  const timer = setInterval(tick, tickMs);
  return {
    get offered() {
      return offered;
    },
    stop() {
      clearInterval(timer);
    },
  };
}
