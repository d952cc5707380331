/**
 * Internal observation of a stager's COPYs and a merger's ticks, for the
 * metrics (histograms need every event, not a counter read at scrape time).
 * Not part of the public API: the public hooks stay onFlush / onMerge. A
 * listener that throws is dropped silently: metrics must never break a COPY or
 * a merge.
 */
import type { MergeReport } from './merger.ts';

export type Observation =
  | { kind: 'copy'; rows: number; durationMs: number }
  | { kind: 'merge'; report: MergeReport };

type Listener = (observation: Observation) => void;

const listeners = new WeakMap<object, Set<Listener>>();

/** Calls `listener` with every observation `source` reports; returns the unsubscribe function. */
export function observe(source: object, listener: Listener): () => void {
  let set = listeners.get(source);
  if (!set) listeners.set(source, (set = new Set()));
  set.add(listener);
  return () => void set.delete(listener);
}

/** Reports an observation of `source` to its listeners; never throws. */
export function notify(source: object, observation: Observation): void {
  const set = listeners.get(source);
  if (!set) return;
  for (const listener of set) {
    try {
      listener(observation);
    } catch {
      // a metric that cannot be recorded is not worth failing a COPY or a merge for
    }
  }
}
