// The agent's management API, as the benchmarks (and the tests' agent helper)
// call it: one JSON request over its Unix socket or its TCP port.

import http from 'node:http';

export interface ApiReply {
  status: number;
  body: Record<string, unknown>;
  text: string;
}

/**
 * One HTTP request over a Unix socket or to 127.0.0.1:port (a new connection,
 * as the CLI makes); the reply's body parsed when it is JSON.
 */
export function httpRequest(
  where: { socketPath: string } | { port: number },
  method: string,
  path: string,
  body?: unknown,
  o: { headers?: Record<string, string>; timeoutMs?: number } = {},
): Promise<ApiReply> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        method,
        path,
        ...('socketPath' in where
          ? { socketPath: where.socketPath }
          : { host: '127.0.0.1', port: where.port }),
        headers: {
          ...(payload
            ? { 'content-type': 'application/json', 'content-length': payload.length }
            : {}),
          ...o.headers,
        },
        // Not Node's global agent: its idle timeout (5 s) would cut off a reply that is
        // only slow, on a loaded machine or behind a cluster-wide change.
        agent: false,
        ...(o.timeoutMs !== undefined ? { timeout: o.timeoutMs } : {}),
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: Record<string, unknown> = {};
          try {
            parsed = JSON.parse(text) as Record<string, unknown>;
          } catch {
            // not JSON; the text is kept
          }
          resolve({ status: res.statusCode ?? 0, body: parsed, text });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timed out`)));
    req.on('error', reject);
    req.end(payload);
  });
}

/** One request to the agent's API over its Unix socket. */
export function apiRequest(
  socketPath: string,
  method: string,
  path: string,
  body?: unknown,
  timeoutMs = 60_000,
): Promise<ApiReply> {
  return httpRequest({ socketPath }, method, path, body, { timeoutMs });
}
