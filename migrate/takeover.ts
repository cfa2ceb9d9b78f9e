// Restart after a host died: the new host's identity takes every device of the guest
// (preempt-and-abort of the dead host's identity, which returns only once the dead host's
// lease has run out, so that it has fenced itself), then the arguments that start the
// guest on the new host.

import { performance } from 'node:perf_hooks';
import { areaOf, leaveOutArea, type SuspendAreaView } from './area.js';
import {
  type AgentApi,
  agentHost,
  ensureHeld,
  guestDevices,
  MigrateError,
  prShow,
} from './handoff.js';

export interface TakeoverStep {
  device: string;
  /** Who held it before (null: nobody). */
  from: string | null;
  did: 'held' | 'reserved' | 'taken';
  ms: number;
}

export interface TakeoverResult {
  guest: string;
  host: string;
  steps: TakeoverStep[];
  attach: {
    device: string;
    uri: string;
    qemu: string[];
    libvirt: string;
    /** With `guestRam`: the paging device's suspend area, which the arguments leave out. */
    suspendArea?: SuspendAreaView;
  }[];
}

/** `api` is the agent of the host the guest restarts on. */
export async function takeover(
  api: AgentApi,
  guest: string,
  opts: {
    host?: string | undefined;
    devices?: string[] | undefined;
    /** The guest's RAM: its paging devices are given without their suspend area. */
    guestRam?: number | undefined;
  } = {},
): Promise<TakeoverResult> {
  const host = opts.host ?? (await agentHost(api));
  const devices = await guestDevices(api, guest, opts.devices);
  // every area is known before anything is taken: a device too small fails first
  const areas = new Map<string, SuspendAreaView>();
  if (opts.guestRam !== undefined) {
    const ram = opts.guestRam;
    for (const d of devices.filter((x) => x.role === 'paging')) areas.set(d.name, areaOf(d, ram));
    if (areas.size === 0) {
      throw new MigrateError(
        'BALLAST_USAGE',
        `guest ${guest} has no paging device among those taken, whose suspend area --guest-ram leaves out`,
      );
    }
  }
  const steps: TakeoverStep[] = [];
  for (const d of devices) {
    const t0 = performance.now();
    const before = await prShow(api, d.name);
    const did = await ensureHeld(api, d.name, host);
    steps.push({
      device: d.name,
      from: before.reservation?.holder ?? null,
      did,
      ms: performance.now() - t0,
    });
  }
  const attach = [];
  for (const d of devices) {
    const a = (await api.request(
      'GET',
      `/v1/devices/${encodeURIComponent(d.name)}/attach?host=${encodeURIComponent(host)}`,
    )) as TakeoverResult['attach'][number];
    attach.push(leaveOutArea(a, areas.get(d.name)));
  }
  return { guest, host, steps, attach };
}

/** How long a moving guest's NBD client keeps trying to reconnect (seconds). */
export const RECONNECT_DELAY = 60;

/**
 * `attach` arguments made fit for a guest that moves: its NBD client reconnects (a
 * source whose connections a hand-off aborted, and that gets the device back), and a
 * refused write pauses the guest instead of failing its I/O.
 */
export function movableQemuArgs(args: string[]): string[] {
  return args.map((a, i) => {
    if (
      args[i - 1] === '-blockdev' &&
      a.startsWith('driver=nbd,') &&
      !a.includes('reconnect-delay=')
    )
      return `${a},reconnect-delay=${RECONNECT_DELAY}`;
    if (args[i - 1] === '-device' && !a.includes('werror=')) return `${a},werror=stop,rerror=stop`;
    return a;
  });
}

/** `attach --format libvirt` with its own target (vdb, vdc, ...) and the same error policy. */
export function movableLibvirt(xml: string, index: number): string {
  const dev = `vd${String.fromCharCode('b'.charCodeAt(0) + index)}`;
  return xml
    .replace(/<target dev='[^']*'/, `<target dev='${dev}'`)
    .replace(/<driver ([^>]*?)\/>/, (m, attrs: string) =>
      attrs.includes('error_policy')
        ? m
        : `<driver ${attrs} error_policy='stop' rerror_policy='stop'/>`,
    );
}
