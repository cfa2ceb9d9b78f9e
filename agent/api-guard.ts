// Limits that keep slow or idle HTTP clients from locking others out of the
// management API: a connection must send a request's headers within
// `headersTimeoutMs` of arriving (or of its previous reply), the whole request
// (headers and body) within `requestTimeoutMs` — however long the answer then takes,
// a Server-Sent Events stream for one — and past `maxConnections` the oldest connection
// with no request being answered is closed to make room for the new one.

import type http from 'node:http';
import type net from 'node:net';

export interface ApiGuardOptions {
  maxConnections: number;
  headersTimeoutMs: number;
  requestTimeoutMs: number;
  /** How often deadlines are checked (default 500 ms). */
  sweepMs?: number;
}

interface Tracked {
  /** performance.now() when it connected or its last reply finished. */
  since: number;
  /** Requests being answered. */
  busy: number;
}

export interface ApiGuard {
  /** Open connections (for tests and status). */
  readonly connections: number;
  /** Connections closed for being slow or idle, or to make room. */
  readonly dropped: number;
}

export function createApiGuard(srv: http.Server, o: ApiGuardOptions): ApiGuard {
  // Node's own checks back ours up for requests whose body is slow to come.
  srv.headersTimeout = o.headersTimeoutMs;
  srv.requestTimeout = o.requestTimeoutMs;
  const open = new Map<net.Socket, Tracked>();
  let dropped = 0;

  const drop = (sock: net.Socket): void => {
    dropped++;
    open.delete(sock);
    sock.destroy();
  };

  srv.on('connection', (sock: net.Socket) => {
    if (open.size >= o.maxConnections) {
      // Map order is arrival order: the first idle one is the oldest.
      let victim: net.Socket | null = null;
      for (const [s, t] of open) {
        if (t.busy === 0) {
          victim = s;
          break;
        }
      }
      if (victim === null) {
        dropped++;
        sock.destroy();
        return;
      }
      drop(victim);
    }
    open.set(sock, { since: performance.now(), busy: 0 });
    sock.once('close', () => open.delete(sock));
  });

  srv.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const t = open.get(req.socket);
    if (!t) return;
    t.busy++;
    const started = performance.now();
    // The body must be in within the request deadline, counted from its start. "In" is
    // the parser's word (req.complete), not the handler's: a route that never reads a
    // body it has no use for (GET /v1/events, a stream that lives as long as the client
    // wants) is not a slow request.
    const check = setInterval(() => {
      if (!req.complete && performance.now() - started > o.requestTimeoutMs) {
        clearInterval(check);
        drop(req.socket);
      }
    }, o.sweepMs ?? 500);
    check.unref();
    res.once('close', () => {
      clearInterval(check);
      t.busy--;
      t.since = performance.now();
    });
  });

  const sweep = setInterval(() => {
    const now = performance.now();
    for (const [s, t] of open) {
      if (t.busy === 0 && now - t.since > o.headersTimeoutMs) drop(s);
    }
  }, o.sweepMs ?? Math.min(500, o.headersTimeoutMs));
  sweep.unref();
  srv.once('close', () => clearInterval(sweep));

  return {
    get connections() {
      return open.size;
    },
    get dropped() {
      return dropped;
    },
  };
}
