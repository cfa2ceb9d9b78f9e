// What a running guest sees of a Ballast device, from QEMU's block layer (QMP
// `query-block`): suspend writes its stream at the end of the paging device, which the
// guest must not see (a raw node with size=OFFSET over the NBD node; libvirt: a
// storage slice). Each of the guest's block devices is followed from the node it is
// attached to down its `file` children to an NBD node of the device's export, adding up
// the offsets of raw nodes on the way; what the guest sees is then [offset, offset +
// its virtual size). QEMU names a node chain in its filename: a URI when the chain adds
// nothing (nbd+unix:///EXPORT?socket=..., nbd://HOST:PORT/EXPORT), else json:{...} with
// each node's options and its child's under "file".

import { guestPart, libvirtSlice } from '../agent/attach.js';
import { BallastError } from '../agent/errors.js';
import { formatSize } from '../agent/units.js';
import { MiB, suspendArea } from './image.js';

/** One of the guest's block devices that reaches the device. */
export interface GuestView {
  /** The guest's device (its qdev id, or QOM path when it has none). */
  qdev: string;
  /** The node it is attached to. */
  node: string;
  /** The device's bytes it sees: [start, end); end null when it cannot be told (an image format between them). */
  start: number;
  end: number | null;
  /** The driver that hides the mapping when end is null (qcow2...). */
  format?: string;
}

/** Drivers that pass their child's bytes through unchanged. */
const FILTERS = new Set([
  'throttle',
  'copy-on-read',
  'preallocate',
  'compress',
  'blkdebug',
  'blklogwrites',
  'blkreplay',
  'copy-before-write',
]);

type Options = { [k: string]: unknown };

/** json:{"a.b": 1} as {a: {b: 1}}, at every level. */
function unflatten(o: Options): Options {
  const out: Options = {};
  for (const [k, v] of Object.entries(o)) {
    const value =
      v !== null && typeof v === 'object' && !Array.isArray(v) ? unflatten(v as Options) : v;
    const parts = k.split('.');
    let at = out;
    for (const p of parts.slice(0, -1)) {
      const next = at[p];
      if (next === null || typeof next !== 'object') at[p] = {};
      at = at[p] as Options;
    }
    at[parts[parts.length - 1] as string] = value;
  }
  return out;
}

/** A node's filename as options, or the filename itself when it is not json:. */
export function parseFilename(f: string): Options | string {
  if (!f.startsWith('json:')) return f;
  try {
    const o = JSON.parse(f.slice(5)) as unknown;
    return o !== null && typeof o === 'object' && !Array.isArray(o) ? unflatten(o as Options) : f;
  } catch {
    return f;
  }
}

/** The export an NBD filename names (URI or the legacy nbd:...:exportname= form), or null. */
export function nbdExport(f: string): string | null {
  const uri = /^nbd(?:\+unix|\+tcp)?s?:\/\/[^/]*\/([^?#]*)/.exec(f);
  if (uri) return decodeURIComponent(uri[1] as string);
  const legacy = /^nbd:.*:exportname=([^:]+)$/.exec(f);
  return legacy ? (legacy[1] as string) : null;
}

/**
 * Where in `device` a node chain starts, and whether its bytes map straight onto the
 * device's (raw and filter nodes only); null when the chain does not reach the device.
 */
function reach(node: unknown, device: string): { offset: number; format?: string } | null {
  if (typeof node === 'string') return nbdExport(node) === device ? { offset: 0 } : null;
  if (node === null || typeof node !== 'object') return null;
  const o = node as Options;
  const driver = String(o.driver ?? '');
  if (driver === 'nbd') {
    const name =
      typeof o.export === 'string'
        ? o.export
        : typeof o.filename === 'string'
          ? nbdExport(o.filename)
          : null;
    return name === device ? { offset: 0 } : null;
  }
  for (const child of ['file', 'data-file']) {
    if (!(child in o)) continue;
    const r = reach(o[child], device);
    if (!r) continue;
    if (r.format) return r;
    if (driver === 'raw') return { offset: r.offset + Number(o.offset ?? 0) };
    if (FILTERS.has(driver)) return r;
    return { offset: 0, format: driver || 'unknown' };
  }
  return null;
}

interface BlockInfo {
  device?: string;
  qdev?: string;
  inserted?: {
    'node-name'?: string;
    file?: string;
    image?: { filename?: string; 'virtual-size'?: number };
  };
}

/** The short name of a qdev path: /machine/peripheral/ID/virtio-backend is ID. */
function qdevName(qdev: string): string {
  return /^\/machine\/peripheral\/([^/]+)/.exec(qdev)?.[1] ?? qdev;
}

/** The guest's block devices (QMP query-block) that reach `device`, and what each sees of it. */
export function guestViews(blocks: unknown, device: string): GuestView[] {
  if (!Array.isArray(blocks)) return [];
  const out: GuestView[] = [];
  for (const b of blocks as BlockInfo[]) {
    const ins = b?.inserted;
    // Attached to no device of the guest: the guest cannot write through it.
    if (!ins || !b.qdev) continue;
    const filename = ins.image?.filename ?? ins.file;
    if (typeof filename !== 'string') continue;
    const r = reach(parseFilename(filename), device);
    if (!r) continue;
    const size = ins.image?.['virtual-size'];
    const end = r.format || typeof size !== 'number' ? null : r.offset + size;
    out.push({
      qdev: qdevName(b.qdev),
      node: ins['node-name'] ?? b.device ?? '',
      start: r.format ? 0 : r.offset,
      end,
      ...(r.format ? { format: r.format } : {}),
    });
  }
  return out;
}

/** The views that reach the suspend area at `offset` (or may: end unknown). */
export function overlapping(views: GuestView[], offset: number): GuestView[] {
  return views.filter((v) => v.end === null || v.end > offset);
}

/** A size in bytes as people read it, exact: 368050176 (351 MiB). */
export function bytesText(n: number): string {
  return `${n} (${n % MiB === 0 ? `${n / MiB} MiB` : formatSize(n)})`;
}

/** A paging device's suspend area [offset, end) for a guest of `ramBytes`. */
export interface SuspendAreaView {
  offset: number;
  end: number;
  ramBytes: number;
}

/** A device's suspend area for a guest of `ramBytes`, or SUSPEND_NO_ROOM saying what to do. */
export function areaOf(d: { name: string; size: number }, ramBytes: number): SuspendAreaView {
  const a = suspendArea(d.size, ramBytes);
  if (!a) {
    throw new BallastError(
      'SUSPEND_NO_ROOM',
      `device ${d.name} (${formatSize(d.size)}) has no room for a suspend area for ${formatSize(ramBytes)} of RAM and swap before it: make it larger (device resize ${d.name} --size +SIZE)`,
    );
  }
  return { ...a, ramBytes };
}

/**
 * A device's attach output (QEMU arguments, libvirt <disk>) without its suspend area,
 * given one: what `attach --guest-ram` and `guest takeover --guest-ram` print.
 */
export function leaveOutArea<T extends { device: string; qemu: string[]; libvirt: string }>(
  a: T,
  area: SuspendAreaView | undefined,
): T & { suspendArea?: SuspendAreaView } {
  if (!area) return a;
  return {
    ...a,
    qemu: guestPart(a.device, a.qemu, area.offset),
    libvirt: libvirtSlice(a.libvirt, area.offset),
    suspendArea: area,
  };
}

/** The line `attach` and `guest takeover` say (on stderr) for a device given without its suspend area. */
export function areaLine(device: string, area: { offset: number; ramBytes: number }): string {
  return `${device}: suspend area at ${bytesText(area.offset)} for ${formatSize(area.ramBytes)} of RAM; the guest sees only the part before it (size=${area.offset})\n`;
}

/** Why suspending into `device` at `offset` would write over what the guest sees. */
export function exposureText(device: string, offset: number, over: GuestView[]): string {
  const v = over[0] as GuestView;
  const what =
    v.end === null
      ? `the guest's disk ${v.qdev} (node ${v.node}) is a ${v.format} image on ${device}: it may write anywhere on it`
      : `the guest's disk ${v.qdev} (node ${v.node}) sees ${device} up to byte ${bytesText(v.end)}`;
  return `${what}, past the start of the suspend area at ${bytesText(offset)}: the stream would overwrite what the guest wrote there`;
}
