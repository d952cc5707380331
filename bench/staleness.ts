/**
 * Staleness: the time from handing a heartbeat to the strategy (stage(), the
 * UPDATE call, Add()) to that heartbeat, or a newer one of the same agent,
 * being visible in public.workspace_agents. Measured on a fixed random sample
 * of agents: every `pollMs` one query reads the sample's updated_at and
 * resolves every outstanding heartbeat it covers. Resolution is about pollMs
 * plus the query time. Heartbeats still not visible when the phase ends are
 * counted with their age at that moment (a lower bound), so a strategy that
 * falls behind cannot hide it by never landing them.
 */
import type pg from 'pg';
import type { HeartbeatSink } from './load.ts';

const SQL = '/*bench*/ SELECT id::text AS id, (extract(epoch FROM updated_at) * 1000)::float8 AS ms FROM public.workspace_agents WHERE id = ANY($1::uuid[])';

export interface StalenessResult {
  samples: number;
  /** Of which not yet visible at the end of the phase (counted with their age then). */
  unresolved: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Probe queries run (excluded from the statement counts). */
  queries: number;
}

export class StalenessProbe implements HeartbeatSink {
  readonly #ids: string[];
  readonly #sampled: Map<number, string>;
  /** agent id -> outstanding (updated ms, offered perf ms) pairs */
  readonly #outstanding = new Map<string, Array<[number, number]>>();
  readonly #samples: number[] = [];
  #recording = false;
  #stopped = false;
  #queries = 0;
  #loop: Promise<void> | null = null;

  constructor(ids: string[], sampleSize: number) {
    this.#ids = ids;
    this.#sampled = new Map();
    const n = Math.min(sampleSize, ids.length);
    while (this.#sampled.size < n) {
      const i = Math.floor(Math.random() * ids.length);
      this.#sampled.set(i, ids[i]!);
    }
  }

  offer(index: number, at: Date): void {
    if (!this.#recording) return;
    const id = this.#sampled.get(index);
    if (id === undefined) return;
    let list = this.#outstanding.get(id);
    if (!list) this.#outstanding.set(id, (list = []));
    list.push([at.getTime(), performance.now()]);
  }

  /** Starts recording heartbeats offered from now on and polling for them. */
  start(client: pg.ClientBase, pollMs = 200): void {
    this.#recording = true;
    this.#loop = (async () => {
      while (!this.#stopped) {
        const started = performance.now();
        if (this.#outstanding.size > 0) {
          const { rows } = await client.query<{ id: string; ms: number }>(SQL, [[...this.#outstanding.keys()]]);
          this.#queries++;
          const now = performance.now();
          for (const row of rows) {
            const list = this.#outstanding.get(row.id);
            if (!list) continue;
            const left = list.filter(([updated, offered]) => {
              if (updated > row.ms) return true;
              this.#samples.push(now - offered);
              return false;
            });
            if (left.length) this.#outstanding.set(row.id, left);
            else this.#outstanding.delete(row.id);
          }
        }
        const wait = pollMs - (performance.now() - started);
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      }
    })();
  }

  async stop(): Promise<StalenessResult> {
    this.#recording = false;
    this.#stopped = true;
    await this.#loop?.catch(() => {});
    const now = performance.now();
    let unresolved = 0;
    for (const list of this.#outstanding.values()) {
      for (const [, offered] of list) {
        this.#samples.push(now - offered);
        unresolved++;
      }
    }
    const sorted = Float64Array.from(this.#samples).sort();
    return {
      samples: sorted.length,
      unresolved,
      p50Ms: Math.round(quantile(sorted, 0.5)),
      p99Ms: Math.round(quantile(sorted, 0.99)),
      maxMs: Math.round(sorted.length ? sorted[sorted.length - 1]! : NaN),
      queries: this.#queries,
    };
  }
}

export function quantile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i]!;
}
