/**
 * The ceiling: the largest fleet a strategy sustains at the real rate.
 * Method: probes at growing sizes (start, then x1.5 while sustained), then
 * bisection between the last sustained and the first failed size until they
 * are within 15% of each other. A probe is a normal phase (warm-up, then a
 * shorter measured window); "sustained" is PhaseResult.sustained (applied >=
 * 97% of offered, no growing backlog, staleness p99 < 10 s). Shared-machine
 * noise can fail a single probe, so the answer is a lower bound.
 */
import type { Fleet } from './load.ts';
import { type PhaseEnv, type PhaseResult, runPhase } from './phase.ts';
import type { Strategy } from './strategies/types.ts';

export interface CeilingResult {
  strategy: string;
  /** Largest sustained fleet (0 when even the first probe failed). */
  ceiling: number;
  probes: PhaseResult[];
}

export interface CeilingHooks {
  prepare(n: number): Promise<{ fleet: Fleet; env: PhaseEnv; done(): Promise<void> }>;
  log(line: string): void;
}

export async function searchCeiling(strategy: Strategy, start: number, hooks: CeilingHooks, maxProbes = 6): Promise<CeilingResult> {
  const probes: PhaseResult[] = [];
  let good = 0;
  let bad = Infinity;
  let n = start;
  while (probes.length < maxProbes) {
    const { fleet, env, done } = await hooks.prepare(n);
    let r: PhaseResult;
    try {
      r = await runPhase(strategy, fleet, env);
    } finally {
      await done();
    }
    probes.push(r);
    hooks.log(`  ceiling ${strategy.key}: ${n} agents -> ${r.sustained ? 'sustained' : 'not sustained'} ` +
      `(applied ${Math.round(r.appliedPerS)}/${Math.round(r.offeredPerS)} per s, p99 ${(r.staleness.p99Ms / 1000).toFixed(1)} s)`);
    if (r.sustained) good = Math.max(good, n);
    else bad = Math.min(bad, n);
    if (bad === Infinity) n = Math.round(n * 1.5);
    else if (good === 0) n = Math.round(n / 1.5);
    else if (bad / good > 1.15) n = Math.round(Math.sqrt(good * bad));
    else break;
    n = Math.round(n / 10_000) * 10_000 || 10_000;
  }
  return { strategy: strategy.key, ceiling: good, probes };
}
