// The client side of the management API (the CLI's commands, guestd's paging
// input): where the agent is (--agent URL, BALLAST_AGENT, or the local socket),
// the bearer token, and errors turned back into BallastErrors with exit codes
// that scripts can rely on.

import { existsSync, readFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { DEFAULT_API_LISTEN, DEFAULT_API_SOCKET, DEFAULT_DATA_DIR } from './config.js';
import { BallastError } from './errors.js';

/**
 * Exit codes of the commands that talk to the agent (docs/errors.md):
 * 0 success, 1 any other error, 2 usage, 3 agent unreachable, 4 not found,
 * 5 conflict (exists, busy, refused), 6 no room in the pool, 7 unauthorized,
 * 8 bad input refused by the agent.
 */
export const EXIT: Record<string, number> = {
  BALLAST_USAGE: 2,
  BALLAST_AGENT_UNREACHABLE: 3,
  BALLAST_DEVICE_NOT_FOUND: 4,
  BALLAST_POOL_NOT_FOUND: 4,
  BALLAST_NOT_FOUND: 4,
  BALLAST_DEVICE_EXISTS: 5,
  BALLAST_DEVICE_BUSY: 5,
  BALLAST_CONFLICT: 5,
  BALLAST_SHRINK_REFUSED: 5,
  BALLAST_DEVICE_UNAVAILABLE: 5,
  BALLAST_POOL_FULL: 6,
  BALLAST_UNAUTHORIZED: 7,
  BALLAST_BAD_NAME: 8,
  BALLAST_BAD_SIZE: 8,
  BALLAST_BAD_ROLE: 8,
  BALLAST_BAD_REQUEST: 8,
  PR_CONFLICT: 5,
  PR_BAD_TYPE: 8,
  PR_BAD_KEY: 8,
  PR_INVALID_RELEASE: 8,
  PR_INVALID_REQUEST: 8,
  BALLAST_BAD_ACL: 8,
  BALLAST_DEVICE_REMOTE: 5,
  NOTIFY_EXISTS: 5,
  NOTIFY_NOT_FOUND: 4,
  NOTIFY_BAD_URL: 8,
  NOTIFY_BAD_TYPES: 8,
  NOTIFY_BAD_RECIPIENT: 8,
  NOTIFY_BAD_SECRET: 8,
  BALLAST_CLUSTER_HOST_TAKEN: 5,
  BALLAST_CLUSTER_JOIN_NEEDED: 5,
  BALLAST_CLUSTER_UNREACHABLE: 3,
  STORE_UNAVAILABLE: 3,
  STORE_TIMEOUT: 3,
};

/** An error from (or about reaching) the agent, with the exit code for it. */
export class AgentError extends BallastError {
  readonly exitCode: number;
  /** The HTTP status of the error reply, when the agent answered one. */
  readonly status: number | undefined;
  constructor(code: string, message: string, options?: { cause?: unknown; status?: number }) {
    super(code, message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'AgentError';
    this.exitCode = EXIT[code] ?? 1;
    this.status = options?.status;
  }
}

export interface ClientOptions {
  /** http://HOST:PORT, unix:/path/api.sock or /path/api.sock. */
  agent?: string;
  /** File holding the bearer token (else BALLAST_TOKEN). */
  tokenFile?: string;
}

interface Target {
  socketPath?: string;
  host?: string;
  port?: number;
  describe: string;
}

function parseAgent(text: string): Target {
  if (text.startsWith('unix:') || text.startsWith('/')) {
    const path = text.startsWith('unix:') ? text.slice(5) : text;
    return { socketPath: path, describe: `unix:${path}` };
  }
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new AgentError(
      'BALLAST_USAGE',
      `bad agent address ${JSON.stringify(text)}: expected http://HOST:PORT or unix:/path/to/api.sock`,
    );
  }
  if (url.protocol !== 'http:') {
    throw new AgentError(
      'BALLAST_USAGE',
      `bad agent address ${JSON.stringify(text)}: only http:// and unix: are supported`,
    );
  }
  return {
    host: url.hostname.replace(/^\[|\]$/g, ''),
    port: url.port === '' ? 80 : Number(url.port),
    describe: `${url.protocol}//${url.host}`,
  };
}

/** The agent to talk to: --agent, else BALLAST_AGENT, else the local socket, else 127.0.0.1:10810. */
export function resolveAgent(flag?: string): Target {
  const text = flag ?? process.env.BALLAST_AGENT;
  if (text !== undefined && text !== '') return parseAgent(text);
  if (existsSync(DEFAULT_API_SOCKET)) return parseAgent(`unix:${DEFAULT_API_SOCKET}`);
  return parseAgent(`http://${DEFAULT_API_LISTEN}`);
}

function readToken(opts: ClientOptions, target: Target): string | undefined {
  if (opts.tokenFile) {
    try {
      return readFileSync(opts.tokenFile, 'utf8').trim();
    } catch (e) {
      throw new AgentError(
        'BALLAST_TOKEN_INVALID',
        `cannot read the token file ${opts.tokenFile}: ${(e as Error).message}`,
      );
    }
  }
  const env = process.env.BALLAST_TOKEN;
  if (env) return env.trim();
  // The local agent's own token, for whoever may read it (root): the TCP API
  // demands it even on loopback.
  if (target.host !== undefined && isLoopbackHost(target.host)) {
    try {
      return readFileSync(join(DEFAULT_DATA_DIR, 'api-token'), 'utf8').trim() || undefined;
    } catch {}
  }
  return undefined;
}

function isLoopbackHost(h: string): boolean {
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

export class Client {
  private readonly target: Target;
  private readonly token: string | undefined;

  constructor(opts: ClientOptions = {}) {
    this.target = resolveAgent(opts.agent);
    this.token = readToken(opts, this.target);
  }

  get where(): string {
    return this.target.describe;
  }

  /**
   * A streamed GET (Server-Sent Events): `onChunk` gets the body as it comes;
   * resolves when the agent ends the stream. An error reply throws AgentError.
   */
  stream(
    path: string,
    headers: Record<string, string>,
    onChunk: (text: string) => void,
    onOpen?: () => void,
  ): Promise<void> {
    const h: Record<string, string> = { accept: 'text/event-stream', ...headers };
    if (this.token && this.target.socketPath === undefined)
      h.authorization = `Bearer ${this.token}`;
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          method: 'GET',
          path,
          headers: h,
          socketPath: this.target.socketPath,
          host: this.target.host,
          port: this.target.port,
        },
        (res) => {
          const status = res.statusCode ?? 0;
          if (status !== 200) {
            const chunks: Buffer[] = [];
            res.on('data', (c: Buffer) => chunks.push(c));
            res.on('end', () => {
              let err: { code?: string; message?: string } = {};
              try {
                err = JSON.parse(Buffer.concat(chunks).toString('utf8'));
              } catch {}
              reject(
                new AgentError(
                  err.code ?? 'BALLAST_AGENT_PROTOCOL',
                  err.message ?? `${this.where} answered GET ${path} with HTTP ${status}`,
                  { status },
                ),
              );
            });
            return;
          }
          onOpen?.();
          res.setEncoding('utf8');
          res.on('data', (t: string) => onChunk(t));
          res.on('end', () => resolve());
          // The connection dropped mid-stream (the agent restarted, a proxy cut it).
          res.on('error', (e: NodeJS.ErrnoException) =>
            reject(
              new AgentError(
                'BALLAST_AGENT_UNREACHABLE',
                `the connection to the agent at ${this.where} was lost: ${e.code ?? e.message}`,
                { cause: e },
              ),
            ),
          );
        },
      );
      req.on('error', (e: NodeJS.ErrnoException) =>
        reject(
          new AgentError(
            'BALLAST_AGENT_UNREACHABLE',
            `cannot reach the agent at ${this.where}: ${e.code ?? e.message}`,
            { cause: e },
          ),
        ),
      );
      req.end();
    });
  }

  /** One API call; resolves with the parsed JSON, throws AgentError on an error reply. */
  request(method: string, path: string, body?: unknown): Promise<unknown> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string | number> = { accept: 'application/json' };
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = payload.length;
    }
    if (this.token && this.target.socketPath === undefined) {
      headers.authorization = `Bearer ${this.token}`;
    }
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          method,
          path,
          headers,
          socketPath: this.target.socketPath,
          host: this.target.host,
          port: this.target.port,
          timeout: 120_000,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            let json: unknown;
            try {
              json = text === '' ? {} : JSON.parse(text);
            } catch {
              json = undefined;
            }
            const status = res.statusCode ?? 0;
            if (status >= 200 && status < 300 && json !== undefined) {
              resolve(json);
              return;
            }
            const err = json as { code?: unknown; message?: unknown } | undefined;
            if (err && typeof err.code === 'string') {
              reject(new AgentError(err.code, String(err.message ?? '')));
            } else {
              reject(
                new AgentError(
                  'BALLAST_AGENT_PROTOCOL',
                  `${this.where} answered ${method} ${path} with HTTP ${status} and no Ballast error`,
                ),
              );
            }
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error('no answer within 120 s')));
      req.on('error', (e: NodeJS.ErrnoException) => {
        reject(
          new AgentError(
            'BALLAST_AGENT_UNREACHABLE',
            `cannot reach the agent at ${this.where}: ${e.code ?? e.message} (is \`ballast agent\` running? see --agent and BALLAST_AGENT)`,
            { cause: e },
          ),
        );
      });
      req.end(payload);
    });
  }
}
