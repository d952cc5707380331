/** `pg-heartbeat merger --metrics-port`: the merger's and the database's metrics on their own registry, served over HTTP. */
import type pg from 'pg';
import { MetricsUnavailableError } from '../errors.ts';
import { consoleLogger } from '../logger.ts';
import type { Merger } from '../merger.ts';
import { registerHeartbeatMetrics } from '../metrics.ts';
import { serveMetrics } from '../metrics-server.ts';

export interface RunningMetrics {
  url: string;
  close(): Promise<void>;
}

/** prom-client, or a one-line MetricsUnavailableError (npm install prom-client): checked before anything else starts. */
export async function requirePromClient(): Promise<typeof import('prom-client')> {
  try {
    return await import('prom-client');
  } catch (err) {
    throw new MetricsUnavailableError(err);
  }
}

export async function startMetrics(options: { merger: Merger; pool: pg.Pool; port: number; host: string | undefined }): Promise<RunningMetrics> {
  const prom = await requirePromClient();
  const registry = new prom.Registry();
  const metrics = await registerHeartbeatMetrics(registry, { merger: options.merger, database: { pool: options.pool }, logger: consoleLogger });
  prom.collectDefaultMetrics({ register: registry }); // process_cpu_seconds_total, nodejs_heap_size_used_bytes, ...
  try {
    const server = await serveMetrics(registry, { port: options.port, host: options.host, logger: consoleLogger });
    return {
      url: server.url,
      close: async () => {
        await server.close();
        await metrics.unregister();
      },
    };
  } catch (err) {
    await metrics.unregister();
    throw err;
  }
}
