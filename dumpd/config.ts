// dumpd's configuration file (YAML or JSON), checked into typed settings. Pure code.
//
//   listen: 127.0.0.1:9411          # /metrics and the control API (loopback only by default)
//   runDir: /run/ballast-dumpd      # FIFOs live here while a dump runs
//   defaults: { format: elf, after: reboot, keep: 3 }
//                                   # mode: early-reboot reboots a panicked guest at once
//                                   # while its memory streams to the device (early.ts);
//                                   # streamMiBps caps that stream (0: no cap)
//   guests:
//     - name: web1
//       qmp: /run/qemu/web1.qmp     # unix:PATH, PATH or tcp:HOST:PORT
//       device: nbd+unix:///web1-dump?socket=/run/ballast/nbd.sock
//     - name: db1
//       qmp: /run/qemu/db1.qmp
//       agent: unix:/run/ballast/api.sock   # or http://HOST:PORT
//       tokenFile: /var/lib/ballast/api-token  # for an agent over TCP
//       agentDevice: db1-dump
//       after: pause
//       tlsCerts: /etc/ballast/tls  # STARTTLS to the device: ca-cert.pem, client-cert.pem, client-key.pem
//     - name: vm1                   # the libvirt domain vm1: panics, the dump and the
//       libvirt: qemu:///system     # after-dump policy all go through libvirt (virsh)
//       agentDevice: vm1-dump
//   watch:                          # every QMP socket in a directory is a guest
//     - dir: /run/qemu
//       suffix: .qmp                # guest name = file name without it
//       device: nbd+unix:///{guest}-dump?socket=/run/ballast/nbd.sock

import { parse as parseYaml } from 'yaml';
import { DumpError, type DumpFormat, FORMATS, validGuestName } from './catalog.js';

export const AFTER = ['reboot', 'pause', 'poweroff', 'none'] as const;
export type After = (typeof AFTER)[number];

/** What a panic does: stop the guest for the dump, or reboot it while the dump streams. */
export const MODES = ['dump-then-reboot', 'early-reboot'] as const;
export type Mode = (typeof MODES)[number];

export interface Policy {
  format: DumpFormat;
  after: After;
  keep: number;
  mode: Mode;
  /** Cap on an early-reboot stream, MiB/s; 0 for none. */
  streamMiBps: number;
  /**
   * A guest that panics at every boot: after `dumps` panics within `minutes`,
   * the next one is dumped and the guest paused instead of rebooted.
   */
  loopLimit: { dumps: number; minutes: number };
}

/** Where a guest's dump device is: an NBD URI, or a device of an agent. */
export type DeviceRef =
  | { uri: string }
  | { agent: string | undefined; device: string; tokenFile?: string };

export interface GuestConfig extends Policy {
  name: string;
  /** QEMU's QMP socket (a guest QEMU runs under dumpd's eyes); or else `libvirt`. */
  qmp?: string;
  /**
   * The guest is the libvirt domain of this name on this libvirt connection: its
   * panics, its dumps and the after-dump policy go through libvirt (dumpd/libvirt.ts).
   */
  libvirt?: string;
  device: DeviceRef;
  /** X.509 credentials for STARTTLS to the dump device (ca-cert.pem, client-cert.pem, client-key.pem). */
  tlsCerts?: string;
}

export interface WatchConfig extends Partial<Policy> {
  dir: string;
  suffix: string;
  /** An NBD URI or agent device name with `{guest}` in it. */
  device: string;
  /** When set, `device` names an agent device. */
  agent?: string;
  /** The agent's bearer token, for an agent reached over TCP. */
  tokenFile?: string;
  tlsCerts?: string;
}

export interface DumpdConfig {
  listen: string;
  runDir: string;
  defaults: Policy;
  guests: GuestConfig[];
  watch: WatchConfig[];
  /** Give up on a dump after this long. */
  dumpTimeoutMs: number;
}

export const DEFAULT_POLICY: Policy = {
  format: 'elf',
  after: 'reboot',
  keep: 3,
  mode: 'dump-then-reboot',
  streamMiBps: 0,
  loopLimit: { dumps: 3, minutes: 10 },
};
export const DEFAULT_LISTEN = '127.0.0.1:9411';
export const DEFAULT_RUN_DIR = '/run/ballast-dumpd';

function bad(msg: string): never {
  throw new DumpError('DUMP_BAD_CONFIG', msg);
}

function str(
  o: Record<string, unknown>,
  key: string,
  where: string,
  required = true,
): string | undefined {
  const v = o[key];
  if (v === undefined || v === null) {
    if (required) bad(`${where}: "${key}" is required`);
    return undefined;
  }
  if (typeof v !== 'string' || v === '') bad(`${where}: "${key}" must be a non-empty string`);
  return v;
}

function policy(o: Record<string, unknown>, where: string, base: Policy): Policy {
  const format = o.format ?? base.format;
  // `migration` is how early-reboot dumps are stored, not a format QEMU dumps in.
  const dumpFormats = FORMATS.filter((f) => f !== 'migration');
  if (typeof format !== 'string' || !(dumpFormats as readonly string[]).includes(format))
    bad(`${where}: format must be one of ${dumpFormats.join(', ')}`);
  const after = o.after ?? base.after;
  if (typeof after !== 'string' || !(AFTER as readonly string[]).includes(after))
    bad(`${where}: after must be one of ${AFTER.join(', ')}`);
  const keep = o.keep ?? base.keep;
  if (typeof keep !== 'number' || !Number.isInteger(keep) || keep < 1 || keep > 200)
    bad(`${where}: keep must be a whole number from 1 to 200`);
  const mode = o.mode ?? base.mode;
  if (typeof mode !== 'string' || !(MODES as readonly string[]).includes(mode))
    bad(`${where}: mode must be one of ${MODES.join(', ')}`);
  const streamMiBps = o.streamMiBps ?? base.streamMiBps;
  if (typeof streamMiBps !== 'number' || !(streamMiBps >= 0))
    bad(`${where}: streamMiBps must be a number of MiB/s, 0 for no cap`);
  let loopLimit = base.loopLimit;
  if (o.loopLimit !== undefined) {
    const l = o.loopLimit as Record<string, unknown> | null;
    if (l === null || typeof l !== 'object' || Array.isArray(l))
      bad(`${where}: loopLimit must be a mapping { dumps: N, minutes: M }`);
    for (const k of Object.keys(l))
      if (k !== 'dumps' && k !== 'minutes') bad(`${where}: loopLimit: unknown key "${k}"`);
    const dumps = l.dumps ?? base.loopLimit.dumps;
    const minutes = l.minutes ?? base.loopLimit.minutes;
    if (typeof dumps !== 'number' || !Number.isInteger(dumps) || dumps < 0 || dumps > 1000)
      bad(`${where}: loopLimit.dumps must be a whole number from 0 (no limit) to 1000`);
    if (typeof minutes !== 'number' || !(minutes > 0) || minutes > 10080)
      bad(`${where}: loopLimit.minutes must be a number of minutes above 0, at most a week`);
    loopLimit = { dumps, minutes };
  }
  return {
    format: format as DumpFormat,
    after: after as After,
    keep,
    mode: mode as Mode,
    streamMiBps,
    loopLimit,
  };
}

const POLICY_KEYS = ['format', 'after', 'keep', 'mode', 'streamMiBps', 'loopLimit'];

function known(o: Record<string, unknown>, where: string, keys: readonly string[]): void {
  for (const k of Object.keys(o))
    if (!keys.includes(k))
      bad(`${where}: unknown key "${k}" (expected one of: ${keys.join(', ')})`);
}

const GUEST_KEYS = [
  'name',
  'qmp',
  'device',
  'agent',
  'agentDevice',
  'tokenFile',
  'tlsCerts',
  'libvirt',
  ...POLICY_KEYS,
];
const WATCH_KEYS = ['dir', 'suffix', 'device', 'agent', 'tokenFile', 'tlsCerts', ...POLICY_KEYS];

/** `libvirt: URI`, or `libvirt: true` for the system connection. */
function libvirtUri(o: Record<string, unknown>, where: string): string | undefined {
  if (o.libvirt === undefined || o.libvirt === false || o.libvirt === null) return undefined;
  if (o.libvirt === true) return 'qemu:///system';
  const u = str(o, 'libvirt', where) as string;
  if (!/^[a-z][a-z0-9+]*:\/\//.test(u))
    bad(`${where}: libvirt must be a libvirt connection URI such as qemu:///system, or true`);
  return u;
}

export function parseConfig(text: string, source = 'config'): DumpdConfig {
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (e) {
    bad(`${source}: not YAML/JSON: ${(e as Error).message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw))
    bad(`${source}: must be a mapping`);
  const r = raw as Record<string, unknown>;
  // `memory` is the memory part's section (guestd/memory/config.ts reads it).
  for (const k of Object.keys(r))
    if (
      !['listen', 'runDir', 'defaults', 'guests', 'watch', 'dumpTimeoutSeconds', 'memory'].includes(
        k,
      )
    )
      bad(`${source}: unknown key "${k}"`);
  const d = r.defaults ?? {};
  if (d === null || typeof d !== 'object' || Array.isArray(d))
    bad(`${source}: defaults must be a mapping`);
  known(d as Record<string, unknown>, `${source}: defaults`, POLICY_KEYS);
  const defaults = policy(d as Record<string, unknown>, `${source}: defaults`, DEFAULT_POLICY);
  const guests: GuestConfig[] = [];
  const names = new Set<string>();
  const list = r.guests ?? [];
  if (!Array.isArray(list)) bad(`${source}: guests must be a list`);
  list.forEach((g: unknown, i: number) => {
    const where = `${source}: guests[${i}]`;
    if (g === null || typeof g !== 'object' || Array.isArray(g)) bad(`${where} must be a mapping`);
    const o = g as Record<string, unknown>;
    known(o, where, GUEST_KEYS);
    const name = str(o, 'name', where) as string;
    if (!validGuestName(name) || /[/\s]/.test(name)) bad(`${where}: bad guest name "${name}"`);
    if (names.has(name)) bad(`${where}: guest "${name}" is listed twice`);
    names.add(name);
    const qmp = str(o, 'qmp', where, false);
    const libvirt = libvirtUri(o, where);
    if ((qmp === undefined) === (libvirt === undefined))
      bad(
        `${where}: give either "qmp" (QEMU's QMP socket) or "libvirt" (a libvirt connection URI)`,
      );
    const uri = str(o, 'device', where, false);
    const agentDevice = str(o, 'agentDevice', where, false);
    if ((uri === undefined) === (agentDevice === undefined))
      bad(`${where}: give either "device" (an NBD URI) or "agentDevice" (with "agent")`);
    const device: DeviceRef =
      uri !== undefined
        ? { uri }
        : {
            agent: str(o, 'agent', where, false),
            device: agentDevice as string,
            ...(o.tokenFile ? { tokenFile: str(o, 'tokenFile', where) as string } : {}),
          };
    const tlsCerts = str(o, 'tlsCerts', where, false);
    guests.push({
      name,
      ...(qmp ? { qmp } : {}),
      ...(libvirt ? { libvirt } : {}),
      device,
      ...(tlsCerts ? { tlsCerts } : {}),
      ...policy(o, where, defaults),
    });
  });
  const watch: WatchConfig[] = [];
  const wl = r.watch ?? [];
  if (!Array.isArray(wl)) bad(`${source}: watch must be a list`);
  wl.forEach((w: unknown, i: number) => {
    const where = `${source}: watch[${i}]`;
    if (w === null || typeof w !== 'object' || Array.isArray(w)) bad(`${where} must be a mapping`);
    const o = w as Record<string, unknown>;
    known(o, where, WATCH_KEYS);
    if (o.tokenFile !== undefined && o.agent === undefined)
      bad(`${where}: "tokenFile" goes with "agent" (the device is then an agent device)`);
    const device = str(o, 'device', where) as string;
    if (!device.includes('{guest}')) bad(`${where}: device must contain {guest}`);
    watch.push({
      dir: str(o, 'dir', where) as string,
      suffix: str(o, 'suffix', where, false) ?? '.qmp',
      device,
      ...(o.agent ? { agent: str(o, 'agent', where) as string } : {}),
      ...(o.tokenFile ? { tokenFile: str(o, 'tokenFile', where) as string } : {}),
      ...(o.tlsCerts ? { tlsCerts: str(o, 'tlsCerts', where) as string } : {}),
      ...policy(o, where, defaults),
    });
  });
  const t = r.dumpTimeoutSeconds ?? 1800;
  if (typeof t !== 'number' || !(t > 0))
    bad(`${source}: dumpTimeoutSeconds must be a positive number`);
  return {
    listen: (str(r, 'listen', source, false) ?? DEFAULT_LISTEN) as string,
    runDir: str(r, 'runDir', source, false) ?? DEFAULT_RUN_DIR,
    defaults,
    guests,
    watch,
    dumpTimeoutMs: t * 1000,
  };
}

/** The guest a watched socket stands for, or null when the file does not match. */
export function watchedGuest(w: WatchConfig, file: string, defaults: Policy): GuestConfig | null {
  if (!file.endsWith(w.suffix)) return null;
  const name = file.slice(0, file.length - w.suffix.length);
  if (!validGuestName(name) || /[/\s{}]/.test(name)) return null;
  const dev = w.device.replaceAll('{guest}', encodeURIComponent(name));
  return {
    name,
    qmp: `${w.dir.replace(/\/$/, '')}/${file}`,
    device:
      w.agent !== undefined
        ? { agent: w.agent, device: dev, ...(w.tokenFile ? { tokenFile: w.tokenFile } : {}) }
        : { uri: dev },
    ...(w.tlsCerts ? { tlsCerts: w.tlsCerts } : {}),
    format: w.format ?? defaults.format,
    after: w.after ?? defaults.after,
    keep: w.keep ?? defaults.keep,
    mode: w.mode ?? defaults.mode,
    streamMiBps: w.streamMiBps ?? defaults.streamMiBps,
    loopLimit: w.loopLimit ?? defaults.loopLimit,
  };
}
