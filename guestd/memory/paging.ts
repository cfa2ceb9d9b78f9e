// A guest's Ballast paging device as the memory controller sees it through the agent:
// is it there and attached, is there room for what a shrink pushes out, and how many
// bytes the guest has read from it (its swap-ins) and written (its swap-outs).

import http from 'node:http';
import { Client, resolveAgent } from '../../agent/api-client.js';
import type { PagingState } from './policy.js';
import { deviceBytes } from './sources.js';

export interface PagingSample {
  state: PagingState;
  /** Why it is not `ok`, in words. */
  why?: string;
  readBytes?: number;
  writtenBytes?: number;
}

interface DeviceView {
  state: string;
  size: number;
  allocatedBytes: number;
  connections: number;
  extents: { pool: string }[];
  problem?: string;
}

/**
 * The device's state from its view and its pools' free space: unreachable when it is not
 * served here or no client is connected (the guest has not attached it), full when the
 * pools cannot take what `step` more bytes of swap-out would allocate.
 */
export function pagingState(
  v: DeviceView,
  poolAvail: ReadonlyMap<string, number>,
  step: number,
): { state: PagingState; why?: string } {
  if (v.state !== 'ready')
    return { state: 'unreachable', why: `device ${v.state}${v.problem ? `: ${v.problem}` : ''}` };
  if (v.connections === 0) return { state: 'unreachable', why: 'no client attached' };
  const unallocated = Math.max(0, v.size - v.allocatedBytes);
  const need = Math.min(step, unallocated);
  const avail = Math.min(
    ...[...new Set(v.extents.map((e) => e.pool))].map((p) => poolAvail.get(p) ?? 0),
  );
  if (need > 0 && avail < need)
    return { state: 'full', why: `its pool has ${avail} bytes free, a step may need ${need}` };
  return { state: 'ok' };
}

/** GET of a text resource (the agent's /metrics), with the CLI's idea of where the agent is. */
function getText(agent: string | undefined, path: string, token?: string): Promise<string> {
  const t = resolveAgent(agent);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        method: 'GET',
        path,
        socketPath: t.socketPath,
        host: t.host,
        port: t.port,
        timeout: 10_000,
        headers: token && t.socketPath === undefined ? { authorization: `Bearer ${token}` } : {},
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => {
          if (res.statusCode === 200) resolve(Buffer.concat(chunks).toString('utf8'));
          else reject(new Error(`${path}: HTTP ${res.statusCode}`));
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${path}: no answer within 10 s`)));
    req.on('error', reject);
    req.end();
  });
}

/** Reads one guest's paging device from its agent. Never throws: a failure is `unreachable`. */
export async function probePaging(
  device: string,
  opts: { agent?: string; tokenFile?: string; token?: string; step: number },
): Promise<PagingSample> {
  try {
    const c = new Client({ agent: opts.agent, tokenFile: opts.tokenFile });
    const v = (await c.request('GET', `/v1/devices/${encodeURIComponent(device)}`)) as DeviceView;
    const pools = new Map<string, number>();
    for (const p of new Set(v.extents.map((e) => e.pool))) {
      const ps = (await c.request('GET', `/v1/pools/${encodeURIComponent(p)}`)) as {
        fsAvailBytes: number;
      };
      pools.set(p, ps.fsAvailBytes);
    }
    const s = pagingState(v, pools, opts.step);
    let io: { read: number; write: number } | undefined;
    try {
      io = deviceBytes(await getText(opts.agent, '/metrics', opts.token), device);
    } catch {
      // the counters are a second opinion on swap-ins; the state above stands without them
    }
    return {
      ...s,
      ...(io ? { readBytes: io.read, writtenBytes: io.write } : {}),
    };
  } catch (e) {
    return { state: 'unreachable', why: (e as Error).message };
  }
}
