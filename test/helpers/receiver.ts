// A real HTTP receiver of Ballast's CloudEvents for the tests: checks each
// signature, records every delivery (duplicates included), and misbehaves on
// request: fail every Nth delivery, answer 429 with Retry-After, hang, 410, or
// go away for a while.

import { createHmac } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface Received {
  id: string;
  type: string;
  subject?: string;
  source: string;
  time: string;
  data: Record<string, unknown>;
  signatureOk: boolean | null;
}

export class Receiver {
  readonly got: Received[] = [];
  /** Fail every Nth POST with 500 (0: never). */
  failEvery = 0;
  /** Answer the next N POSTs with 429 and this Retry-After (seconds). */
  throttle = { count: 0, retryAfter: 1 };
  /** Answer every POST with this status instead (e.g. 410, 500). */
  always: number | null = null;
  /** Never answer (a receiver that hangs). */
  hang = false;
  posts = 0;
  /** Awaited before a delivery is answered (it is recorded first): a receiver that takes its time. */
  beforeAnswer: ((e: Received) => Promise<void>) | null = null;
  private server: http.Server;
  port = 0;

  constructor(private readonly secret?: string) {
    this.server = this.make();
  }

  private make(): http.Server {
    return http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        this.posts++;
        if (this.hang) return;
        if (this.always !== null) {
          res.writeHead(this.always).end();
          return;
        }
        if (this.throttle.count > 0) {
          this.throttle.count--;
          res.writeHead(429, { 'retry-after': String(this.throttle.retryAfter) }).end();
          return;
        }
        if (this.failEvery > 0 && this.posts % this.failEvery === 0) {
          res.writeHead(500).end();
          return;
        }
        const body = Buffer.concat(chunks).toString('utf8');
        const sig = req.headers['x-ballast-signature'];
        const signatureOk =
          this.secret === undefined
            ? null
            : sig === `sha256=${createHmac('sha256', this.secret).update(body).digest('hex')}`;
        const ce = JSON.parse(body) as Received;
        this.got.push({ ...ce, signatureOk });
        const wait = this.beforeAnswer?.(ce) ?? Promise.resolve();
        void wait.finally(() => res.writeHead(204).end());
      });
    });
  }

  async start(port = 0): Promise<void> {
    await new Promise<void>((resolve) => this.server.listen(port, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}/hook`;
  }

  /** Goes away (connections refused) until start() again on the same port. */
  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server = this.make();
  }

  /** Ids in the order first received, without duplicates. */
  ids(): string[] {
    const seen = new Set<string>();
    const out: string[] = [];
    for (const g of this.got) {
      if (!seen.has(g.id)) {
        seen.add(g.id);
        out.push(g.id);
      }
    }
    return out;
  }
}

/** Orders event ids (revision, then index). */
export function idKey(id: string): number {
  const [r, n] = id.split('.');
  return Number(r) * 1_000_000 + Number(n ?? 0);
}
