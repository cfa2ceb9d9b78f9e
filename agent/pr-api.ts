// The management API's reservation and access-list endpoints, in sg_persist's
// vocabulary:
//   GET  /v1/devices/:name/pr          full status (registrations, reservation, generation)
//   GET  /v1/devices/:name/pr/keys     read keys
//   GET  /v1/devices/:name/pr/audit    the audit trail
//   POST /v1/devices/:name/pr          {action, as, key, saKey, type, target, unregister}
//   GET  /v1/devices/:name/acl         the access list (null: open to everyone)
//   PUT  /v1/devices/:name/acl         {entries: [{identity, access: ro|rw}] | null}

import type http from 'node:http';
import { BallastError } from './errors.js';
import { PR_ACTIONS, type PrAction, type PrType, parseKey, parseType } from './pr.js';
import type { AclEntry, PrOutRequest, ReservationManager } from './reservations.js';
import { peerUid } from './tls-config.js';

type Handler = (req: unknown, params: string[], body: Record<string, unknown>) => Promise<unknown>;

/** HTTP statuses of the codes these routes raise. */
export const PR_STATUS: Record<string, number> = {
  PR_CONFLICT: 409,
  PR_BAD_TYPE: 400,
  PR_BAD_KEY: 400,
  PR_INVALID_RELEASE: 400,
  PR_INVALID_REQUEST: 400,
  BALLAST_BAD_ACL: 400,
};

/** Refusals of the request itself that the audit trail records. */
const AUDITED = new Set(['PR_BAD_TYPE', 'PR_BAD_KEY', 'PR_INVALID_REQUEST', 'BALLAST_BAD_REQUEST']);

function key(v: unknown, name: string, required: boolean): bigint | undefined {
  if (v === undefined || v === null) {
    if (required) return 0n;
    return undefined;
  }
  const text = typeof v === 'number' && Number.isSafeInteger(v) ? String(v) : v;
  const k = typeof text === 'string' ? parseKey(text) : null;
  if (k === null) {
    throw new BallastError(
      'PR_BAD_KEY',
      `${name} must be a 64-bit key, as 0x-prefixed hex or decimal, not ${JSON.stringify(v)}`,
    );
  }
  return k;
}

function type(v: unknown): PrType | undefined {
  if (v === undefined || v === null) return undefined;
  const t = typeof v === 'number' || typeof v === 'string' ? parseType(String(v)) : null;
  if (t === null) {
    throw new BallastError(
      'PR_BAD_TYPE',
      `unknown reservation type ${JSON.stringify(v)} (1/WE, 3/EA, 5/WERO, 6/EARO, 7/WEAR, 8/EAAR)`,
    );
  }
  return t;
}

/** Who called the API, for the audit trail: the Unix peer's uid, or the TCP source. */
function actorOf(req: unknown): string {
  const sock = (req as http.IncomingMessage | undefined)?.socket;
  if (!sock) return 'admin';
  if (sock.remoteAddress) return `tcp:${sock.remoteAddress}`;
  const uid = peerUid(sock);
  return uid === null ? 'unix' : `uid:${uid}`;
}

function generationField(v: unknown): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > 0xffffffff) {
    throw new BallastError(
      'PR_INVALID_REQUEST',
      'ifGeneration must be a whole number from 0 to 2^32-1',
    );
  }
  return v;
}

/** The routes, built with the API's own route maker. */
export function prRoutes<R>(
  res: ReservationManager,
  route: (method: string, path: string, handler: Handler) => R,
  /** In a cluster, while cut off from etcd: reads come from the cache and say so. */
  stale?: () => { since: string; reason: string } | null,
): R[] {
  const marked = <T extends object>(v: T): T | (T & { stale: unknown }) => {
    const s = stale?.();
    return s ? { ...v, stale: s } : v;
  };
  return [
    route('GET', '/v1/devices/:name/pr', async (_q, [name]) => marked(res.show(name!))),
    route('GET', '/v1/devices/:name/pr/keys', async (_q, [name]) => marked(res.keys(name!))),
    route('GET', '/v1/devices/:name/pr/audit', async (_q, [name]) => ({
      device: name,
      entries: await res.audit(name!),
    })),
    route('POST', '/v1/devices/:name/pr', async (q, [name], body) => {
      let req: PrOutRequest;
      try {
        const action = body.action as PrAction;
        if (!PR_ACTIONS.includes(action)) {
          throw new BallastError(
            'PR_INVALID_REQUEST',
            `action must be one of ${PR_ACTIONS.join(', ')}, not ${JSON.stringify(body.action)}`,
          );
        }
        if (typeof body.as !== 'string') {
          throw new BallastError('BALLAST_BAD_REQUEST', 'as (the identity to act for) is required');
        }
        req = {
          action,
          as: body.as,
          key: key(body.key, 'key', true)!,
          saKey: key(body.saKey, 'saKey', false),
          type: type(body.type),
          target: typeof body.target === 'string' ? body.target : undefined,
          unregister: body.unregister === true,
          ...(body.ifGeneration !== undefined
            ? { ifGeneration: generationField(body.ifGeneration) }
            : {}),
        };
      } catch (e) {
        // Refused before the reservation logic: still on the audit trail, or the answer says it is not.
        if (e instanceof BallastError && AUDITED.has(e.code)) {
          const missing = await res
            .recordRefusal(name!, body as never, e.code, e.message, actorOf(q))
            .catch(
              (x: unknown) =>
                `; this refusal may not be on the audit trail (${(x as Error).message})`,
            );
          if (missing !== null) throw new BallastError(e.code, e.message + missing);
        }
        throw e;
      }
      return res.apply(name!, req, actorOf(q));
    }),
    route('GET', '/v1/devices/:name/acl', async (_q, [name]) => marked(res.acl(name!))),
    route('PUT', '/v1/devices/:name/acl', async (_q, [name], body) => {
      const e = body.entries;
      if (e !== null && !Array.isArray(e)) {
        throw new BallastError('BALLAST_BAD_ACL', 'entries must be a list or null');
      }
      return res.setAcl(name!, e as AclEntry[] | null);
    }),
  ];
}
