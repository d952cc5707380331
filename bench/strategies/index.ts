/** Every strategy the bench knows, by key. Experimental variants live in bench/experiments/variants.ts. */
import { naiveStrategy } from './naive.ts';
import { pgHeartbeatStrategy } from './pg-heartbeat.ts';
import { referenceStrategy } from './reference.ts';
import type { Strategy } from './types.ts';
import { experimentalStrategies } from '../experiments/variants.ts';

export const DEFAULT_STRATEGIES = ['naive', 'reference', 'pg-heartbeat', 'reference-x3', 'pg-heartbeat-x3', 'pg-heartbeat-logged'];

export function allStrategies(): Map<string, Strategy> {
  const list: Strategy[] = [
    naiveStrategy(8),
    referenceStrategy(),
    pgHeartbeatStrategy({ key: 'pg-heartbeat', label: '(c) pg-heartbeat defaults: stage() + binary COPY, merge every 5 s' }),
    referenceStrategy({ replicas: 3 }),
    referenceStrategy({ ownFlushConnection: true }),
    pgHeartbeatStrategy({ key: 'pg-heartbeat-x3', label: '(d) pg-heartbeat, 3 replicas (own stager + pool + merge loop each)', replicas: 3 }),
    pgHeartbeatStrategy({
      key: 'pg-heartbeat-logged',
      label: '(e) pg-heartbeat with LOGGED (durable) staging',
      prepareSql: ['ALTER TABLE heartbeat.agent_connection_staging SET LOGGED'],
    }),
    ...experimentalStrategies(),
  ];
  return new Map(list.map((s) => [s.key, s]));
}
