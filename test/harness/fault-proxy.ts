// A TCP proxy that tests put between a client and a server to inject network
// faults: a partition (traffic stops both ways, connections stay open and
// silent: no FIN, no RST, as when a link or a host vanishes), a reset (every
// current connection gets an RST), and healing.
//
// A partition pauses reading on both sides, so bytes sent meanwhile wait in the
// kernel's buffers and flow once healed, as TCP would retransmit them. A
// connection accepted during a partition is held without dialling the target
// until healed. Listens on 127.0.0.1 only.

import net from 'node:net';

interface Pair {
  client: net.Socket;
  /** Undefined while the connection waits for the partition to heal. */
  upstream: net.Socket | undefined;
}

export class FaultProxy {
  private readonly pairs = new Set<Pair>();
  private partitioned = false;
  private closed = false;

  private constructor(
    private readonly server: net.Server,
    readonly targetHost: string,
    readonly targetPort: number,
    /** The port the proxy listens on (127.0.0.1). */
    readonly port: number,
  ) {}

  /** Starts a proxy to `target` ('host:port', or a URL such as http://127.0.0.1:2379). */
  static async start(target: string | { host: string; port: number }): Promise<FaultProxy> {
    const { host, port } = typeof target === 'string' ? parseTarget(target) : target;
    const server = net.createServer({ pauseOnConnect: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const addr = server.address();
    if (addr === null || typeof addr === 'string') throw new Error('the proxy has no TCP port');
    const proxy = new FaultProxy(server, host, port, addr.port);
    server.on('connection', (s) => proxy.accept(s));
    return proxy;
  }

  /** http://127.0.0.1:port, for clients that take URLs. */
  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Connections currently held (open on the client side). */
  get connections(): number {
    return this.pairs.size;
  }

  get isPartitioned(): boolean {
    return this.partitioned;
  }

  /** Stops all traffic both ways and holds the connections, silent. */
  partition(): void {
    this.partitioned = true;
    for (const p of this.pairs) {
      p.client.pause();
      p.upstream?.pause();
    }
  }

  /** Lets traffic flow again, including what was sent during the partition. */
  heal(): void {
    this.partitioned = false;
    for (const p of this.pairs) {
      if (p.upstream) {
        p.client.resume();
        p.upstream.resume();
      } else {
        this.dial(p);
      }
    }
  }

  /** Sends an RST on both sides of every current connection. New ones are accepted as usual. */
  reset(): void {
    for (const p of [...this.pairs]) this.drop(p, true);
  }

  /** Resets every connection and stops listening. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.reset();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: net.Socket): void {
    if (this.closed) {
      client.resetAndDestroy();
      return;
    }
    const pair: Pair = { client, upstream: undefined };
    this.pairs.add(pair);
    client.on('error', () => this.drop(pair, true));
    client.on('close', () => this.drop(pair, false));
    // pauseOnConnect: the client stays paused until the upstream side is there.
    if (!this.partitioned) this.dial(pair);
  }

  private dial(pair: Pair): void {
    const up = net.connect({ host: this.targetHost, port: this.targetPort });
    pair.upstream = up;
    up.setNoDelay(true);
    pair.client.setNoDelay(true);
    up.on('error', () => this.drop(pair, true));
    up.on('close', () => this.drop(pair, false));
    up.once('connect', () => {
      if (!this.pairs.has(pair)) return;
      this.forward(pair.client, up);
      this.forward(up, pair.client);
      if (!this.partitioned) pair.client.resume();
    });
    if (this.partitioned) up.pause();
  }

  /** Copies `from` to `to`, with backpressure, pausing while partitioned. */
  private forward(from: net.Socket, to: net.Socket): void {
    from.on('data', (chunk: Buffer) => {
      if (!to.write(chunk)) {
        from.pause();
        to.once('drain', () => {
          if (!this.partitioned) from.resume();
        });
      }
    });
    from.on('end', () => to.end());
  }

  private drop(pair: Pair, rst: boolean): void {
    if (!this.pairs.delete(pair)) return;
    for (const s of [pair.client, pair.upstream]) {
      if (!s || s.destroyed) continue;
      if (rst) s.resetAndDestroy();
      else s.destroy();
    }
  }
}

function parseTarget(target: string): { host: string; port: number } {
  const u = new URL(/^[a-z]+:\/\//i.test(target) ? target : `tcp://${target}`);
  const port = Number(u.port);
  if (!u.hostname || !Number.isInteger(port) || port < 1) {
    throw new Error(`bad proxy target ${target}: give host:port`);
  }
  return { host: u.hostname.replace(/^\[|\]$/g, ''), port };
}
