/**
 * `node --import tsx bench/experiments/cluster.ts`: starts a cluster with the
 * bench's settings, prints its URL, and keeps it until SIGINT/SIGTERM (then
 * destroys it). For the experiments in this folder (psql -f ...).
 */
import { startCluster } from '../../test/support/cluster.ts';
import { BENCH_SETTINGS } from '../run.ts';

const cluster = await startCluster({ settings: BENCH_SETTINGS });
console.log(cluster.url('postgres'));
const stop = (): void => {
  void cluster.destroy().finally(() => process.exit(0));
};
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
setInterval(() => {}, 1 << 30);
