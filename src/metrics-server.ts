/**
 * serveMetrics(): a minimal node:http server for Prometheus: GET /metrics is
 * the registry's exposition, GET /healthz says the process is serving. A scrape
 * that fails answers 500 with one line (and is logged); nothing a client sends
 * or a collector throws can crash the process or stop the merger beside it.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { InvalidOptionError } from './errors.ts';
import { consoleLogger, toLogger, type Logger } from './logger.ts';
import { durationOption } from './options.ts';
import { safeLogger } from './safe-logger.ts';

/** What serveMetrics() needs of a prom-client Registry. */
export interface MetricsSource {
  metrics(): Promise<string> | string;
  readonly contentType: string;
}

export interface MetricsServerOptions {
  /** TCP port; 0 picks a free one (see `port` on the result). Default 9187. */
  port?: number;
  /**
   * Address to listen on. Default 127.0.0.1: metrics are not published to the network unless you
   * say so ('0.0.0.0' in a container, or where Prometheus scrapes from another host).
   */
  host?: string;
  /** A scrape that takes longer is answered 503 (default 10 000 ms). */
  scrapeTimeoutMs?: number;
  /** Where failed scrapes and server errors are reported. Default: stderr. */
  logger?: Logger;
}

export interface MetricsServer extends AsyncDisposable {
  readonly host: string;
  readonly port: number;
  /** `http://host:port/metrics` */
  readonly url: string;
  /** Stops listening and closes open connections. Idempotent. */
  close(): Promise<void>;
}

/** Serves `registry` on http://host:port/metrics (and /healthz); resolves once listening. */
export async function serveMetrics(registry: MetricsSource, options: MetricsServerOptions = {}): Promise<MetricsServer> {
  if (!registry || typeof registry.metrics !== 'function') throw new InvalidOptionError('registry', 'must be a prom-client Registry');
  const port = options.port ?? 9187;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new InvalidOptionError('port', `must be a TCP port from 0 to 65535, got ${String(port)}`);
  const host = options.host ?? '127.0.0.1';
  if (typeof host !== 'string' || host === '') throw new InvalidOptionError('host', 'must be an address or host name');
  const scrapeTimeoutMs = durationOption(options.scrapeTimeoutMs, 'scrapeTimeoutMs', 10_000);
  const logger = safeLogger(toLogger(options.logger ?? consoleLogger));

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    if (path === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      return;
    }
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
      return;
    }
    let timer: NodeJS.Timeout | undefined;
    try {
      const body = await Promise.race([
        Promise.resolve().then(() => registry.metrics()),
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(Object.assign(new Error(`scrape did not finish within ${scrapeTimeoutMs} ms`), { status: 503 })), scrapeTimeoutMs);
        }),
      ]);
      res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? undefined : body);
    } catch (err) {
      const status = (err as { status?: number }).status ?? 500;
      logger.warn('metrics scrape failed', { error: err });
      if (!res.headersSent) res.writeHead(status, { 'content-type': 'text/plain' });
      res.end(`scrape failed: ${err instanceof Error ? err.message : String(err)}\n`);
    } finally {
      clearTimeout(timer);
    }
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      logger.warn('metrics request failed', { error: err });
      res.destroy();
    });
  });
  server.on('clientError', (_err, socket) => socket.destroy());
  await new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once('error', onError);
    server.listen(port, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  // after listening, a server error is reported, never thrown
  server.on('error', (err) => logger.error('metrics server error', { error: err }));
  server.unref();
  const address = server.address() as AddressInfo;
  const shownHost = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    return closing;
  };
  return {
    host: address.address,
    port: address.port,
    url: `http://${shownHost}:${address.port}/metrics`,
    close,
    [Symbol.asyncDispose]: close,
  };
}
