/**
 * A TCP proxy for fault tests that can make connections go silent.
 *
 *   const proxy = await startFreezeProxy(cluster.port);
 *   const client = new pg.Client({ connectionString: proxy.url(db.url) });
 *   ...
 *   proxy.freeze();            // every existing connection goes silent; new ones still work
 *   await proxy.freezeAfter(4e6); // ...once some connection has sent 4 MB more to the server (mid-COPY)
 *   proxy.freeze({ newConnections: true }); // ...and new ones are accepted but never forwarded (blackhole)
 *   proxy.thaw();              // the network heals: held bytes are delivered, forwarding resumes
 *   proxy.reset();             // every existing connection gets a TCP RST (ECONNRESET at the client)
 *   await proxy.close();       // in after(): destroys everything (idempotent)
 *
 * What a frozen connection looks like: the proxy stops reading from both of
 * its sockets and forwards nothing, in either direction: no data, no FIN, no
 * RST; both sockets stay open. The client sees a peer that never answers (its
 * query never completes, no 'error', no 'end'), the server sees an idle client
 * (the bytes the client sent after freeze() never reach it). That is what a
 * half-open connection, a failover that moved a VIP, or a NAT table that
 * dropped the entry looks like to application code.
 *
 * One difference from a real network partition: the proxy's kernel still ACKs
 * what the client sends (until the socket buffers fill) and answers TCP
 * keepalive probes, so neither TCP keepalives (pg `keepAlive`, the server's
 * tcp_keepalives_*) nor TCP_USER_TIMEOUT (tcp_user_timeout) ever detect a
 * frozen connection. Only application-level timeouts do (pg
 * `query_timeout` / `connectionTimeoutMillis`, the library's own timers).
 * A kernel-level partition would need netfilter rules; this proxy does not touch them.
 *
 * The proxy honours backpressure (it stops reading a side while the other
 * side's socket buffer is full), so a freeze stops a stream (a COPY) where it
 * is: the server has only what the socket buffers held.
 *
 * thaw(): bytes that arrived while frozen are held (not dropped) and delivered
 * in order, as TCP retransmission would after a short partition; a FIN or a
 * close that happened on one side while frozen is passed on after the held
 * bytes. Connections accepted during a blackhole are connected to the target
 * at thaw() (their startup bytes are delivered then). If a test wants the
 * "never comes back" case it simply never thaws and calls close() at the end.
 */
import { connect, createServer, type Socket } from 'node:net';

export interface FreezeOptions {
  /** Also blackhole connections accepted from now on until thaw(): accepted, never forwarded. Default false. */
  newConnections?: boolean;
}

export interface FreezeProxy {
  /** The proxy's port on 127.0.0.1. */
  readonly port: number;
  readonly targetPort: number;
  /** `url` (a postgres:// connection string) with its host and port replaced by the proxy's. */
  url(url: string): string;
  /** Silences every existing connection (both directions); with `newConnections`, later ones too. */
  freeze(options?: FreezeOptions): void;
  /**
   * Arms a freeze (of every existing connection) for the moment one connection has forwarded `bytes`
   * more from its client to the server: a freeze at a known point inside a long stream (a COPY), with
   * no race against the stream finishing. Resolves when it froze.
   */
  freezeAfter(bytes: number): Promise<void>;
  /** Resumes every frozen connection (held bytes are delivered first) and stops blackholing new ones. */
  thaw(): void;
  /** Aborts every existing connection with a TCP RST towards the client (and closes its upstream side). */
  reset(): void;
  /** Sends connections made from now on to another port (a failover that moved the address); existing ones stay as they are. */
  retarget(port: number): void;
  /** Client connections currently open through the proxy (frozen or not). */
  readonly connections: number;
  /** Of those, how many are frozen. */
  readonly frozenConnections: number;
  /** Connections accepted since start. */
  readonly accepted: number;
  /** Destroys every connection and stops listening. Idempotent. */
  close(): Promise<void>;
}

type Side = 'client' | 'upstream';

interface Pair {
  client: Socket;
  upstream: Socket | undefined;
  frozen: boolean;
  /** What arrived while frozen, in order: bytes, or null for an end-of-stream (FIN). */
  held: { from: Side; chunk: Buffer | null }[];
  /** A side that closed (fully) while frozen: passed on at thaw(). */
  closedWhileFrozen: Side | undefined;
  done: boolean;
}

export async function startFreezeProxy(targetPort: number, targetHost = '127.0.0.1'): Promise<FreezeProxy> {
  const pairs = new Set<Pair>();
  let target = targetPort;
  let blackhole = false;
  let accepted = 0;
  let closed = false;
  /** freezeAfter(): bytes still to forward client-to-server per connection, and what to call when it froze. */
  let trigger: { bytes: number; sent: WeakMap<Pair, number>; fire: () => void } | undefined;

  const other = (pair: Pair, side: Side): Socket | undefined => (side === 'client' ? pair.upstream : pair.client);

  const finish = (pair: Pair): void => {
    if (pair.done) return;
    pair.done = true;
    pairs.delete(pair);
    pair.client.destroy();
    pair.upstream?.destroy();
  };

  const deliver = (pair: Pair, from: Side, chunk: Buffer | null): void => {
    const to = other(pair, from);
    if (!to || to.destroyed) return;
    if (chunk === null) {
      to.end();
      return;
    }
    // backpressure, as TCP has it: stop reading the sender while the receiver's buffer is full, so a
    // freeze stops the flow at once (not after everything already read was queued for the other side)
    if (!to.write(chunk)) {
      const source = from === 'client' ? pair.client : pair.upstream;
      source?.pause();
      to.once('drain', () => {
        if (!pair.frozen && !pair.done) source?.resume();
      });
    }
  };

  const wire = (pair: Pair, side: Side, socket: Socket): void => {
    socket.on('data', (chunk: Buffer) => {
      if (pair.frozen) pair.held.push({ from: side, chunk });
      else deliver(pair, side, chunk);
      if (trigger && side === 'client' && !pair.frozen) {
        const sent = (trigger.sent.get(pair) ?? 0) + chunk.length;
        trigger.sent.set(pair, sent);
        if (sent >= trigger.bytes) trigger.fire();
      }
    });
    socket.on('end', () => {
      if (pair.frozen) pair.held.push({ from: side, chunk: null });
      else deliver(pair, side, null);
    });
    socket.on('error', () => {}); // 'close' follows
    socket.on('close', () => {
      if (pair.frozen) pair.closedWhileFrozen ??= side;
      else finish(pair);
    });
  };

  const connectUpstream = (pair: Pair): void => {
    const upstream = connect({ host: targetHost, port: target, allowHalfOpen: true });
    upstream.setNoDelay(true);
    pair.upstream = upstream;
    wire(pair, 'upstream', upstream);
  };

  const freezePair = (pair: Pair): void => {
    pair.frozen = true;
    pair.client.pause();
    pair.upstream?.pause();
  };

  const thawPair = (pair: Pair): void => {
    if (!pair.frozen || pair.done) return;
    pair.frozen = false;
    if (!pair.upstream && pair.closedWhileFrozen !== 'client') connectUpstream(pair);
    for (const { from, chunk } of pair.held.splice(0)) deliver(pair, from, chunk);
    if (pair.closedWhileFrozen) {
      // let the delivered bytes and FIN go out before tearing down
      const to = other(pair, pair.closedWhileFrozen);
      if (to && !to.destroyed && to.writableLength > 0) to.end(() => finish(pair));
      else finish(pair);
      return;
    }
    pair.client.resume();
    pair.upstream?.resume();
  };

  const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
    accepted++;
    if (closed) {
      client.destroy();
      return;
    }
    client.setNoDelay(true);
    const pair: Pair = { client, upstream: undefined, frozen: blackhole, held: [], closedWhileFrozen: undefined, done: false };
    pairs.add(pair);
    wire(pair, 'client', client);
    if (pair.frozen) return; // stays paused (pauseOnConnect): accepted, never read, never forwarded
    connectUpstream(pair);
    client.resume();
  });
  server.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  if (!address || typeof address !== 'object') throw new Error('freeze proxy: no address');
  const port = address.port;

  return {
    port,
    targetPort,
    url(url: string): string {
      const u = new URL(url);
      u.hostname = '127.0.0.1';
      u.port = String(port);
      return u.toString();
    },
    freeze(options: FreezeOptions = {}): void {
      for (const pair of pairs) freezePair(pair);
      if (options.newConnections) blackhole = true;
    },
    freezeAfter(bytes: number): Promise<void> {
      return new Promise<void>((resolve) => {
        trigger = {
          bytes,
          sent: new WeakMap(),
          fire: () => {
            trigger = undefined;
            for (const pair of pairs) freezePair(pair);
            resolve();
          },
        };
      });
    },
    thaw(): void {
      blackhole = false;
      for (const pair of [...pairs]) thawPair(pair);
    },
    reset(): void {
      for (const pair of [...pairs]) {
        pair.done = true;
        pairs.delete(pair);
        pair.client.resetAndDestroy();
        pair.upstream?.destroy();
      }
    },
    retarget(port: number): void {
      target = port;
    },
    get connections(): number {
      return pairs.size;
    },
    get frozenConnections(): number {
      return [...pairs].filter((p) => p.frozen).length;
    },
    get accepted(): number {
      return accepted;
    },
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const pair of [...pairs]) finish(pair);
      await stopped;
    },
  };
}
