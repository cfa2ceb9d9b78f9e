// The memory part's routes on the guest daemon's listener:
//
//   GET  /v1/memory                               the pool and every guest (MemoryStatus)
//   POST /v1/memory/guests/NAME?entitlement=128M&weight=200&max=256M
//                                                 change a guest's share (any of the three)
//
// A POST reads no body (the daemon's listener reads none): the change is in the query.

import { parseSize } from '../../agent/units.js';
import { MemoryError } from './config.js';
import type { MemoryController } from './controller.js';

type Answer = { status: number; body: unknown } | null;

function statusOf(code: string): number {
  if (code === 'MEMORY_UNKNOWN_GUEST') return 404;
  if (code === 'MEMORY_POOL_TOO_SMALL') return 409;
  return 400;
}

export function memoryRoutes(ctl: MemoryController): (method: string, url: URL) => Promise<Answer> {
  return async (method, url) => {
    if (method === 'GET' && url.pathname === '/v1/memory')
      return { status: 200, body: ctl.status() };
    const m = /^\/v1\/memory\/guests\/([^/]+)$/.exec(url.pathname);
    if (!m || method !== 'POST') return null;
    try {
      let name: string;
      try {
        name = decodeURIComponent(m[1] as string);
      } catch {
        throw new MemoryError('MEMORY_BAD_CONFIG', 'malformed %-escape in the guest name');
      }
      const change: { entitlement?: number; weight?: number; max?: number } = {};
      for (const [k, v] of url.searchParams) {
        if (k === 'entitlement' || k === 'max') {
          try {
            change[k] = parseSize(v, k);
          } catch (e) {
            throw new MemoryError('MEMORY_BAD_CONFIG', (e as Error).message);
          }
        } else if (k === 'weight') {
          if (!/^\d+$/.test(v))
            throw new MemoryError(
              'MEMORY_BAD_CONFIG',
              'weight must be a whole number from 1 to 255',
            );
          change.weight = Number(v);
        } else
          throw new MemoryError(
            'MEMORY_BAD_CONFIG',
            `unknown setting "${k}" (entitlement, weight, max)`,
          );
      }
      if (Object.keys(change).length === 0)
        throw new MemoryError(
          'MEMORY_BAD_CONFIG',
          'nothing to change: give entitlement, weight or max',
        );
      return { status: 200, body: ctl.set(name, change) };
    } catch (e) {
      const code = (e as { code?: string }).code ?? 'MEMORY_BAD_CONFIG';
      return { status: statusOf(code), body: { code, message: (e as Error).message } };
    }
  };
}
