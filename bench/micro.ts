/**
 * Client micro-benchmarks of HeartbeatStager: the cost of one stage() call
 * (median over batches of 5,000 calls, in this thread's CPU time; new agents and repeat agents) and the heap
 * held per pending agent (heap delta after staging N distinct agents, measured
 * after forced garbage collections). The stager points at a real database but
 * never flushes during the measurement (huge interval and batch size).
 */
import { randomUUID } from 'node:crypto';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { silentLogger } from '../src/logger.ts';
import { HeartbeatStager } from '../src/stager.ts';
import { quantile } from './staleness.ts';

export interface MicroResult {
  stageNsMedianNewAgent: number;
  stageNsP99NewAgent: number;
  stageNsMedianRepeatAgent: number;
  heapBytesPerPendingAgent: number;
  agents: number;
}

function gc(): () => void {
  const existing = (globalThis as { gc?: () => void }).gc;
  if (existing) return existing;
  setFlagsFromString('--expose-gc');
  return runInNewContext('gc') as () => void;
}

export async function runMicro(url: string, agents = 200_000): Promise<MicroResult> {
  const collect = gc();
  const ids = Array.from({ length: agents }, () => randomUUID());
  const replica = randomUUID();
  const first = new Date();
  const options = { logger: silentLogger, flushIntervalMs: 3_600_000, maxBatchSize: 1e9 };
  const timeBatches = (stager: HeartbeatStager, batch: number): number[] => {
    const per: number[] = [];
    const at = new Date();
    for (let start = 0; start + batch <= agents; start += batch) {
      // this thread's CPU time, not wall time: on a shared machine waiting for a core is not stage()'s cost
      const t = process.cpuUsage();
      for (let i = start; i < start + batch; i++) {
        stager.stage({ agentId: ids[i]!, firstConnectedAt: first, lastConnectedAt: at, lastConnectedReplicaId: replica, updatedAt: at });
      }
      const d = process.cpuUsage(t);
      per.push(((d.user + d.system) * 1000) / batch);
    }
    return per.sort((a, b) => a - b);
  };
  // warm up the JIT on a throwaway stager
  const warm = new HeartbeatStager({ connectionString: url }, options);
  timeBatches(warm, 5000);
  timeBatches(warm, 5000);
  await warm.close();

  const stager = new HeartbeatStager({ connectionString: url }, options);
  const newAgent = timeBatches(stager, 5000);
  const repeat = timeBatches(stager, 5000);
  await stager.close();

  // heap per pending agent
  collect();
  collect();
  const before = process.memoryUsage().heapUsed;
  const held = new HeartbeatStager({ connectionString: url }, options);
  const at = new Date();
  for (let i = 0; i < agents; i++) {
    held.stage({ agentId: ids[i]!, firstConnectedAt: first, lastConnectedAt: at, lastConnectedReplicaId: replica, updatedAt: at });
  }
  collect();
  collect();
  const after = process.memoryUsage().heapUsed;
  const perAgent = (after - before) / agents;
  await held.close();
  return {
    stageNsMedianNewAgent: Math.round(quantile(newAgent, 0.5)),
    stageNsP99NewAgent: Math.round(quantile(newAgent, 0.99)),
    stageNsMedianRepeatAgent: Math.round(quantile(repeat, 0.5)),
    heapBytesPerPendingAgent: Math.round(perAgent),
    agents,
  };
}
