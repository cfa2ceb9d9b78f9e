// Live migration of a guest that libvirt runs (`ballast migrate GUEST --libvirt SRC
// --to-libvirt DST`). libvirt holds both QEMUs' monitors and offers no pause before
// switchover, so the hand-off happens at the next moment when neither side writes:
//
//   prepare    the source host holds every device Write Exclusive, the destination
//              host is registered (generation noted), as for migrate/live.ts
//   xml        the domain's migratable XML with every Ballast disk pointed at the
//              destination agent's socket (attach --host)
//   migrate    virsh migrate --live --suspend --xml: RAM is copied while the guest runs;
//              at the end the source QEMU has stopped, flushed and gone, and the
//              destination is left paused (its images inactive until it runs: libvirt
//              sets late-block-activate). A failure here leaves the guest running on the
//              source, reservations untouched.
//   hand-off   the destination preempts-and-aborts the source on every device, only if
//              the registrations are what `prepare` saw
//   resume     virsh resume on the destination: its first write comes after the hand-off
//
// The guest's downtime therefore includes the hand-off and one virsh round trip.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BallastError } from '../agent/errors.js';
import { virsh } from '../dumpd/libvirt.js';
import {
  type AgentApi,
  agentHost,
  ensureHeld,
  guestDevices,
  handOff,
  MigrateError,
  registerHost,
} from './handoff.js';

export interface LibvirtMoveOptions {
  /** The domain's name (and the guest's: its devices were created with --guest). */
  guest: string;
  from: { api: AgentApi; libvirt: string };
  to: { api: AgentApi; libvirt: string; host?: string | undefined };
  /** virsh migrate --migrateuri (where the destination QEMU listens), if not libvirt's choice. */
  migrateUri?: string | undefined;
  devices?: string[] | undefined;
  /** Longest the migration may take, ms (default 10 min). */
  timeoutMs?: number;
  onStep?: (step: string, ms: number) => void;
}

export interface LibvirtMoveReport {
  guest: string;
  from: string;
  to: string;
  devices: string[];
  totalMs: number;
  migrateMs: number;
  handoffMs: number;
  resumeMs: number;
}

/** The domain XML with each listed NBD disk's <host> replaced by `hosts[device]`. */
export function retarget(xml: string, hosts: Map<string, string>): string {
  return xml.replace(
    /(<source\s[^>]*protocol=['"]nbd['"][^>]*>)([\s\S]*?)(<\/source>)/g,
    (whole, open: string, inner: string, close: string) => {
      const name = /\sname=['"]([^'"]+)['"]/.exec(open)?.[1];
      const host = name === undefined ? undefined : hosts.get(name);
      if (host === undefined) return whole;
      return `${open}${inner.replace(/<host\s[^>]*\/>(\s*<host\s[^>]*\/>)*/, host)}${close}`;
    },
  );
}

export async function migrateLibvirt(o: LibvirtMoveOptions): Promise<LibvirtMoveReport> {
  const t0 = performance.now();
  const step = (s: string) => o.onStep?.(s, performance.now() - t0);
  const fromHost = await agentHost(o.from.api);
  const toHost = o.to.host ?? (await agentHost(o.to.api));
  if (fromHost === toHost) {
    throw new MigrateError('MIGRATE_SAME_HOST', `the guest is on ${toHost} already`);
  }
  const devices = (await guestDevices(o.from.api, o.guest, o.devices)).map((d) => d.name);
  const generations = new Map<string, number>();
  const code = (e: unknown) => (e instanceof BallastError ? e.code : 'MIGRATE_FAILED');
  try {
    for (const d of devices) {
      await ensureHeld(o.from.api, d, fromHost);
      generations.set(d, await registerHost(o.to.api, d, toHost));
    }
  } catch (e) {
    throw new MigrateError(code(e), `prepare: ${(e as Error).message}; nothing moved`, {
      cause: e,
    });
  }
  step('prepared');

  const hosts = new Map<string, string>();
  for (const d of devices) {
    const a = (await o.to.api.request(
      'GET',
      `/v1/devices/${encodeURIComponent(d)}/attach?host=${encodeURIComponent(toHost)}&transport=unix`,
    )) as { libvirt: string };
    const host = /<host\s[^>]*\/>/.exec(a.libvirt)?.[0];
    if (host) hosts.set(d, host);
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'ballast-migrate-'));
  const file = path.join(dir, `${o.guest}.xml`);
  const tMigrate = performance.now();
  try {
    const xml = await virsh(o.from.libvirt, ['dumpxml', '--migratable', o.guest]);
    writeFileSync(file, retarget(xml, hosts), { mode: 0o600 });
    await virsh(
      o.from.libvirt,
      [
        'migrate',
        '--live',
        '--suspend',
        '--xml',
        file,
        o.guest,
        o.to.libvirt,
        ...(o.migrateUri ? ['--migrateuri', o.migrateUri] : []),
      ],
      o.timeoutMs ?? 600_000,
    );
  } catch (e) {
    throw new MigrateError(
      'MIGRATE_FAILED',
      `migrate: ${(e as Error).message}; the guest keeps running on ${fromHost} with its reservation`,
      { cause: e },
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const migrateMs = performance.now() - tMigrate;
  step('migrated (destination paused)');

  const tHand = performance.now();
  try {
    await Promise.all(
      devices.map((d) => handOff(o.to.api, d, fromHost, toHost, generations.get(d) ?? 0)),
    );
  } catch (e) {
    throw new MigrateError(
      code(e),
      `hand-off: ${(e as Error).message}; the guest is paused on ${toHost} (libvirt ${o.to.libvirt}) ` +
        `and its source is gone: resume it there only once ${toHost} holds its devices ` +
        `(ballast guest takeover ${o.guest} --to-host ${toHost})`,
      { cause: e },
    );
  }
  const handoffMs = performance.now() - tHand;
  step('handed off');

  const tResume = performance.now();
  await virsh(o.to.libvirt, ['resume', o.guest]).catch((e: unknown) => {
    throw new MigrateError(
      'MIGRATE_FAILED',
      `resume: ${(e as Error).message}; ${toHost} holds the devices, the guest is paused there`,
      { cause: e },
    );
  });
  const resumeMs = performance.now() - tResume;
  step('resumed');
  return {
    guest: o.guest,
    from: fromHost,
    to: toHost,
    devices,
    totalMs: performance.now() - t0,
    migrateMs,
    handoffMs,
    resumeMs,
  };
}
