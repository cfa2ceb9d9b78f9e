// The reservation side of moving a guest: which devices are the guest's, the key a
// host's identity registers with, making sure a host holds a device (taking it over
// if another holds it), and the one hand-off command that moves a device from the
// source host to the destination host.
//
// Every device of a moving guest is held Write Exclusive (type 1) by the identity of
// the host its QEMU runs on: others may still read (a destination QEMU opening its
// images while inactive), only the holder writes.

import { createHash } from 'node:crypto';
import { BallastError } from '../agent/errors.js';

/** The management API of one agent, as the CLI's client gives it. */
export interface AgentApi {
  request(method: string, path: string, body?: unknown): Promise<unknown>;
}

export class MigrateError extends BallastError {
  /** The step that failed, for reports. */
  readonly step: string | undefined;
  constructor(code: string, message: string, options?: { cause?: unknown; step?: string }) {
    super(code, message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'MigrateError';
    this.step = options?.step;
  }
}

/** Write Exclusive: the holder writes, everyone reads. */
export const HANDOFF_TYPE = 1;

/**
 * A host identity's reservation key: 64 bits of SHA-256 of the host name, never 0, so
 * that every tool derives the same key without asking (as fence_scsi derives keys from
 * node ids).
 */
export function hostKey(host: string): string {
  const h = createHash('sha256').update(`ballast-host:${host}`).digest();
  let k = h.readBigUInt64BE(0);
  if (k === 0n) k = 1n;
  return `0x${k.toString(16)}`;
}

export interface PrView {
  device: string;
  generation: number;
  reservation: { type: number; key: string; holder: string | null } | null;
  registrations: { identity: string; key: string; holder: boolean }[];
}

export interface DeviceView {
  name: string;
  role: string;
  guest: string | null;
  size: number;
  hosts?: string[];
}

export async function prShow(api: AgentApi, device: string): Promise<PrView> {
  return (await api.request('GET', `/v1/devices/${encodeURIComponent(device)}/pr`)) as PrView;
}

async function pr(api: AgentApi, device: string, body: Record<string, unknown>) {
  return (await api.request('POST', `/v1/devices/${encodeURIComponent(device)}/pr`, body)) as {
    generation: number;
    changed: boolean;
    preempted: string[];
  };
}

/** The guest's devices (the catalog's `guest` field), or the ones named. */
export async function guestDevices(
  api: AgentApi,
  guest: string,
  named: string[] = [],
): Promise<DeviceView[]> {
  const all = ((await api.request('GET', '/v1/devices')) as { devices: DeviceView[] }).devices;
  const out = named.length
    ? named.map((n) => {
        const d = all.find((x) => x.name === n);
        if (!d) throw new MigrateError('BALLAST_DEVICE_NOT_FOUND', `no device named ${n}`);
        return d;
      })
    : all
        .filter((d) => d.guest === guest)
        // paging devices first (a guest's first disk), then by name: the same order everywhere
        .sort((x, y) =>
          x.role !== y.role
            ? x.role === 'paging'
              ? -1
              : y.role === 'paging'
                ? 1
                : 0
            : x.name < y.name
              ? -1
              : 1,
        );
  if (out.length === 0) {
    throw new MigrateError(
      'MIGRATE_NO_DEVICES',
      `no device belongs to guest ${guest} (create them with --guest ${guest}, or name them with --device)`,
    );
  }
  return out;
}

/** The host name an agent runs as (its `cluster.host`). */
export async function agentHost(api: AgentApi): Promise<string> {
  const st = (await api.request('GET', '/v1/cluster/status')) as { host?: unknown };
  if (typeof st.host !== 'string') {
    throw new MigrateError('MIGRATE_NO_CLUSTER', 'the agent runs without a cluster: section');
  }
  return st.host;
}

/** Registers `host`'s identity with its key, whatever it held before. */
export async function registerHost(api: AgentApi, device: string, host: string): Promise<number> {
  const r = await pr(api, device, {
    action: 'register-ignore',
    as: host,
    key: 0,
    saKey: hostKey(host),
  });
  return r.generation;
}

/**
 * Makes `host` the holder of `device` (Write Exclusive): registers it, reserves a free
 * device, or preempts-and-aborts whoever holds it (which returns only once every agent
 * closed the old holder's connections, or its lease ran out). Returns what it did.
 */
export async function ensureHeld(
  api: AgentApi,
  device: string,
  host: string,
): Promise<'held' | 'reserved' | 'taken'> {
  const key = hostKey(host);
  let s = await prShow(api, device);
  const mine = s.registrations.find((r) => r.identity === host);
  if (s.reservation?.holder === host && s.reservation.type === HANDOFF_TYPE && mine?.key === key)
    return 'held';
  if (mine?.key !== key) {
    await registerHost(api, device, host);
    s = await prShow(api, device);
  }
  if (!s.reservation) {
    await pr(api, device, { action: 'reserve', as: host, key, type: HANDOFF_TYPE });
    return 'reserved';
  }
  if (s.reservation.holder === host && s.reservation.type === HANDOFF_TYPE) return 'held';
  await pr(api, device, {
    action: 'preempt-abort',
    as: host,
    key,
    saKey: s.reservation.key,
    type: HANDOFF_TYPE,
  });
  return 'taken';
}

/**
 * The hand-off: `to` preempts-and-aborts `from` on `device`, only if the registrations
 * are still what they were when the move was prepared (`ifGeneration`). It returns once
 * every agent has closed `from`'s connections to the device.
 */
export async function handOff(
  api: AgentApi,
  device: string,
  from: string,
  to: string,
  ifGeneration: number,
): Promise<void> {
  await pr(api, device, {
    action: 'preempt-abort',
    as: to,
    key: hostKey(to),
    saKey: hostKey(from),
    type: HANDOFF_TYPE,
    ifGeneration,
  });
}
