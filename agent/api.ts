// The management API: JSON over HTTP on versioned paths, errors as
// {code, message} with stable codes. A bearer token guards every TCP listener
// that is reachable from other hosts; the Unix socket relies on its mode.

import { timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import type { Registry } from 'prom-client';
import {
  ATTACH_FORMATS,
  type AttachFormat,
  FIRST_TARGET,
  libvirtXml,
  type NbdEndpoint,
  nbdUri,
  qemuArgs,
  type TcpClients,
  tcpAdvice,
  validTarget,
  virshAttach,
} from './attach.js';
import { type DeviceManager, noPool, type Role } from './devices.js';
import { BallastError, isBallastError } from './errors.js';
import { PR_STATUS, prRoutes } from './pr-api.js';
import type { ReservationManager } from './reservations.js';
import { listOrCache, pageLimit } from './store/pages.js';
import { parseSize } from './units.js';

/** HTTP status for each error code; anything unlisted is a 400 (bad request) or 500. */
const STATUS: Record<string, number> = {
  BALLAST_DEVICE_NOT_FOUND: 404,
  BALLAST_POOL_NOT_FOUND: 404,
  BALLAST_NOT_FOUND: 404,
  BALLAST_LIST_EXPIRED: 410,
  BALLAST_DEVICE_EXISTS: 409,
  BALLAST_DEVICE_BUSY: 409,
  BALLAST_CONFLICT: 409,
  BALLAST_SHRINK_REFUSED: 409,
  BALLAST_DEVICE_UNAVAILABLE: 409,
  BALLAST_DEVICE_REMOTE: 409,
  BALLAST_CLUSTER_NOT_APPLIED: 504,
  BALLAST_POOL_FULL: 507,
  BALLAST_UNAUTHORIZED: 401,
  BALLAST_METHOD_NOT_ALLOWED: 405,
  BALLAST_BODY_TOO_LARGE: 413,
  BALLAST_INTERNAL: 500,
  // The agent's own trouble with its files and records, not the caller's.
  BALLAST_EXTENT_INVALID: 500,
  BALLAST_STAT_FAILED: 500,
  BALLAST_READ_ONLY: 500,
  BALLAST_FILE_OPEN: 500,
  BALLAST_FILE_INVALID: 500,
  BALLAST_FILE_LOCKED: 500,
  BALLAST_FILE_NOT_FOUND: 500,
  BALLAST_SIZE_MISMATCH: 500,
  BALLAST_POOL_UNAVAILABLE: 500,
  STORE_CONFLICT: 409,
  STORE_IO: 500,
  STORE_CORRUPT: 500,
  STORE_LOCKED: 500,
  STORE_CLOSED: 503,
  STORE_UNAVAILABLE: 503,
  STORE_TIMEOUT: 504,
  BALLAST_STREAM_NOT_FOUND: 404,
  BALLAST_STREAM_NO_ROOM: 409,
  BALLAST_STREAM_DENIED: 409,
  BALLAST_STREAM_CANCELLED: 409,
  BALLAST_STREAM_FENCED: 503,
  BALLAST_STREAM_TIMEOUT: 504,
  BALLAST_STREAM_IO: 500,
  NOTIFY_EXISTS: 409,
  NOTIFY_NOT_FOUND: 404,
};

/** The HTTP status the API answers an error code with (docs/errors.md lists them). */
export function httpStatus(code: string): number {
  // The store's own trouble is the agent's (500) unless listed otherwise.
  return STATUS[code] ?? PR_STATUS[code] ?? (code.startsWith('STORE_') ? 500 : 400);
}

export interface ApiContext {
  devices: DeviceManager;
  metrics: Registry;
  endpoint: () => NbdEndpoint;
  /** How this agent treats TCP clients TLS does not name (attach over TCP). */
  tcpClients?: () => TcpClients;
  status: () => Promise<Record<string, unknown>>;
  version: string;
  /** Who answers /healthz: enough to tell two agents on one machine apart. */
  identity?: { host: string; dataDir: string; pid: number };
  /** Persistent reservations and access lists (the /pr and /acl routes). */
  reservations?: ReservationManager;
  /** More routes (the cluster's, the notifications'). */
  extraRoutes?: RouteSet[];
  /** POST /v1/pools/rescan: the pools' media and fullness looked at again. */
  rescan?: () => Promise<Record<string, unknown>>;
  /** GET /v1/events: a stream the handler writes itself (Server-Sent Events). */
  events?: (req: http.IncomingMessage, res: http.ServerResponse, url: URL) => Promise<void>;
  /** In a cluster, while cut off from etcd: reads come from the cache and say so. */
  stale?: () => { since: string; reason: string } | null;
  /** Requests wait for this (an agent that is still joining its cluster). */
  ready?: Promise<void>;
  /** In a cluster: where another host's agent serves NBD (attach --host). */
  endpointOf?: (host: string) => NbdEndpoint | undefined;
}

/** A group of routes built with the API's route maker (see prRoutes). */
export type RouteSet = <R>(
  route: (
    method: string,
    path: string,
    handler: (...a: Parameters<Handler>) => Promise<unknown>,
  ) => R,
) => R[];

type Handler = (
  req: http.IncomingMessage,
  params: string[],
  body: Record<string, unknown>,
) => Promise<unknown>;

interface Route {
  method: string;
  path: string;
  pattern: RegExp;
  handler: Handler;
}

async function readBody(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  if (req.method === 'GET' || req.method === 'HEAD' || req.method === 'DELETE') return {};
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > 1024 * 1024)
      throw new BallastError('BALLAST_BODY_TOO_LARGE', 'request body over 1 MiB');
    chunks.push(c as Buffer);
  }
  if (size === 0) return {};
  try {
    const v = JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (e) {
    throw new BallastError(
      'BALLAST_BAD_REQUEST',
      `request body must be a JSON object: ${(e as Error).message}`,
    );
  }
}

/** A path parameter, or BALLAST_BAD_REQUEST for a malformed %-escape (found by fuzzing). */
function decodePathPart(p: string): string {
  try {
    return decodeURIComponent(p);
  } catch {
    throw new BallastError(
      'BALLAST_BAD_REQUEST',
      `malformed %-escape in the path: ${p.slice(0, 80)}`,
    );
  }
}

function sizeField(v: unknown, key: string): number {
  if (typeof v === 'number') return v;
  if (typeof v === 'string') return parseSize(v, key);
  throw new BallastError('BALLAST_BAD_REQUEST', `${key} is required (bytes, or a size such as 4G)`);
}

function optString(v: unknown, key: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string')
    throw new BallastError('BALLAST_BAD_REQUEST', `${key} must be a string`);
  return v;
}

function boolParam(url: URL, name: string, body: Record<string, unknown>): boolean {
  const q = url.searchParams.get(name);
  return body[name] === true || q === 'true' || q === '1' || q === '';
}

export function routes(ctx: ApiContext): Route[] {
  const d = ctx.devices;
  const r = (method: string, path: string, handler: Handler): Route => ({
    method,
    path,
    pattern: new RegExp(`^${path.replace(/:[a-z]+/g, '([^/]+)')}$`),
    handler,
  });
  return [
    r('GET', '/healthz', async () => ({ status: 'ok', version: ctx.version, ...ctx.identity })),
    r('GET', '/v1/status', async () => ctx.status()),
    r('GET', '/v1/pools', async () => ({ pools: await d.poolStatus() })),
    r('POST', '/v1/pools/rescan', async () => {
      if (!ctx.rescan) throw new BallastError('BALLAST_NOT_FOUND', 'no rescan here');
      return ctx.rescan();
    }),
    r('GET', '/v1/pools/:name', async (_q, [name]) => {
      const all = await d.poolStatus();
      const p = all.find((x) => x.name === name);
      if (!p)
        throw new BallastError(
          'BALLAST_POOL_NOT_FOUND',
          noPool(
            name ?? '',
            all.map((x) => x.name),
          ),
        );
      return p;
    }),
    r('GET', '/v1/devices', async (q) => {
      const url = new URL(q.url ?? '/', 'http://x');
      const limit = url.searchParams.get('limit');
      const token = url.searchParams.get('continue');
      return listOrCache<Record<string, unknown>>(
        () => d.listPage(limit === null ? undefined : pageLimit(limit), token ?? undefined),
        (why) => ({ devices: d.list(), stale: why }),
        ctx.stale !== undefined,
        token,
        ctx.stale?.() ?? null,
      );
    }),
    r('POST', '/v1/devices', async (_q, _p, body) => {
      const name = optString(body.name, 'name') ?? '';
      return d.confirmed(name, () =>
        d.create({
          name,
          size: sizeField(body.size, 'size'),
          pool: optString(body.pool, 'pool'),
          role: optString(body.role, 'role') as Role | undefined,
          guest: optString(body.guest, 'guest') ?? null,
        }),
      );
    }),
    r('GET', '/v1/devices/:name', async (_q, [name]) => {
      const stale = ctx.stale?.();
      return stale ? { ...d.view(name!), stale } : d.viewFresh(name!);
    }),
    r('DELETE', '/v1/devices/:name', async (q, [name], body) => {
      const url = new URL(q.url ?? '/', 'http://x');
      await d.confirmed(name!, () => d.remove(name!, boolParam(url, 'force', body)));
      return { deleted: name };
    }),
    r('POST', '/v1/devices/:name/resize', async (q, [name], body) => {
      const url = new URL(q.url ?? '/', 'http://x');
      return d.confirmed(name!, () =>
        d.resize(name!, sizeField(body.size, 'size'), boolParam(url, 'force', body)),
      );
    }),
    r('POST', '/v1/devices/:name/extend', async (_q, [name], body) => {
      const pool = optString(body.pool, 'pool');
      if (!pool) throw new BallastError('BALLAST_BAD_REQUEST', 'pool is required');
      return d.confirmed(name!, () => d.extend(name!, pool, sizeField(body.size, 'size')));
    }),
    r('GET', '/v1/devices/:name/attach', async (q, [name]) => {
      const url = new URL(q.url ?? '/', 'http://x');
      const format = (url.searchParams.get('format') ?? 'qemu') as AttachFormat;
      if (!ATTACH_FORMATS.includes(format)) {
        throw new BallastError(
          'BALLAST_BAD_REQUEST',
          `format must be one of ${ATTACH_FORMATS.join(', ')}`,
        );
      }
      const view = d.view(name!);
      const host = url.searchParams.get('host');
      let ep = ctx.endpoint();
      if (host) {
        if (!view.hosts?.includes(host)) {
          throw new BallastError(
            'BALLAST_DEVICE_UNAVAILABLE',
            `device ${view.name} is not served by host ${host} (served by: ${view.hosts?.join(', ') || 'none'})`,
          );
        }
        ep = { ...(ctx.endpointOf?.(host) ?? {}) };
      } else if (view.state !== 'ready') {
        throw new BallastError(
          'BALLAST_DEVICE_UNAVAILABLE',
          `device ${view.name} is not exported: ${view.problem ?? view.state}`,
        );
      }
      const transport = url.searchParams.get('transport');
      if (transport === 'tcp') delete ep.socket;
      if (transport === 'unix') delete ep.tcp;
      if (!ep.socket && !ep.tcp) {
        throw new BallastError(
          'BALLAST_BAD_REQUEST',
          `the agent has no ${transport ?? ''} NBD listener`,
        );
      }
      const target = url.searchParams.get('target') ?? FIRST_TARGET;
      if (!validTarget(target)) {
        throw new BallastError(
          'BALLAST_BAD_REQUEST',
          `target must name a virtio disk, vd and 1 to 3 letters (vdb, vdc...), not ${JSON.stringify(target)}`,
        );
      }
      const domain = url.searchParams.get('domain') ?? view.guest ?? null;
      if (format === 'virsh' && !domain) {
        throw new BallastError(
          'BALLAST_BAD_REQUEST',
          `device ${view.name} has no guest: name the libvirt domain (--domain)`,
        );
      }
      // Over TCP to this agent: what its nbd: section takes (the TLS variant), or why it
      // would refuse what is printed. Another host's agent's section is not known here.
      const advice =
        !ep.socket && !host && ctx.tcpClients ? tcpAdvice(ctx.tcpClients()) : ({} as const);
      const libvirt = libvirtXml(view.name, ep, { target, tls: advice.tls });
      return {
        device: view.name,
        format,
        target,
        uri: nbdUri(view.name, ep, advice.tls),
        qemu: qemuArgs(view.name, ep, advice.tls),
        libvirt,
        ...(advice.note ? { note: advice.note } : {}),
        ...(domain ? { domain, virsh: virshAttach(domain, [libvirt]) } : {}),
      };
    }),
    ...(ctx.reservations ? prRoutes(ctx.reservations, r, ctx.stale) : []),
    ...(ctx.extraRoutes ?? []).flatMap((set) => set(r)),
  ];
}

export interface ApiServerOptions {
  /** The bearer token this listener demands, if any; read per request so a reload can change it. */
  token?: () => string | undefined;
  log: (msg: string) => void;
  /** Told of every answered request: the route pattern (or 'other') and the HTTP status. */
  onRequest?: (method: string, route: string, status: number) => void;
}

export function createApiServer(ctx: ApiContext, opts: ApiServerOptions): http.Server {
  const table = routes(ctx);
  return http.createServer(async (req, res) => {
    let routeName = 'other';
    const send = (status: number, body: unknown, type = 'application/json'): void => {
      opts.onRequest?.(req.method ?? '', routeName, status);
      const text =
        type === 'application/json' ? `${JSON.stringify(body, null, 2)}\n` : String(body);
      res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(text) });
      res.end(text);
    };
    try {
      if (ctx.ready) {
        // The join failed and the agent stops: nothing of this request was done. Its
        // error (a store timeout, say) would read as a change in doubt.
        await ctx.ready.catch((e: unknown) => {
          throw new BallastError(
            'STORE_UNAVAILABLE',
            `this agent could not join the cluster (${(e as Error).message}) and is stopping: the request was not carried out (a change was NOT made)`,
          );
        });
      }
      const url = new URL(req.url ?? '/', 'http://localhost');
      const token = opts.token?.();
      const want = token ? Buffer.from(`Bearer ${token}`) : null;
      if (want && url.pathname !== '/healthz') {
        const got = Buffer.from(req.headers.authorization ?? '');
        if (got.length !== want.length || !timingSafeEqual(got, want)) {
          throw new BallastError(
            'BALLAST_UNAUTHORIZED',
            'a valid bearer token is required (Authorization: Bearer TOKEN)',
          );
        }
      }
      if (url.pathname === '/v1/events' && req.method === 'GET' && ctx.events) {
        routeName = '/v1/events';
        opts.onRequest?.('GET', routeName, 200);
        await ctx.events(req, res, url);
        return;
      }
      if (url.pathname === '/metrics' && req.method === 'GET') {
        routeName = '/metrics';
        send(200, await ctx.metrics.metrics(), ctx.metrics.contentType);
        return;
      }
      let pathMatched = false;
      for (const route of table) {
        const m = route.pattern.exec(url.pathname);
        if (!m) continue;
        pathMatched = true;
        routeName = route.path;
        if (route.method !== req.method) continue;
        const params = m.slice(1).map((p) => decodePathPart(p));
        const body = await readBody(req);
        const out = await route.handler(req, params, body);
        send(req.method === 'POST' && route.path === '/v1/devices' ? 201 : 200, out);
        return;
      }
      if (pathMatched)
        throw new BallastError(
          'BALLAST_METHOD_NOT_ALLOWED',
          `${req.method} is not allowed on ${url.pathname}`,
        );
      throw new BallastError(
        'BALLAST_NOT_FOUND',
        `no such endpoint: ${req.method} ${url.pathname}`,
      );
    } catch (e) {
      if (isBallastError(e)) {
        send(httpStatus(e.code), { code: e.code, message: e.message });
      } else {
        opts.log(`api: internal error: ${(e as Error).stack ?? e}`);
        send(500, { code: 'BALLAST_INTERNAL', message: (e as Error).message ?? String(e) });
      }
    }
  });
}
