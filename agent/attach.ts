// What an operator pastes to give a guest a device: QEMU arguments, a
// libvirt <disk> element, or the NBD URI.

export interface NbdEndpoint {
  /** TCP address, if the agent listens on one. */
  tcp?: { host: string; port: number };
  /** Unix socket path, if any (preferred for guests on the same host). */
  socket?: string;
}

export type AttachFormat = 'qemu' | 'libvirt' | 'virsh' | 'uri';
export const ATTACH_FORMATS: readonly AttachFormat[] = ['qemu', 'libvirt', 'virsh', 'uri'];

/** The first target of a printed <disk>: vda is usually the guest's own root disk. */
export const FIRST_TARGET = 'vdb';

/** A virtio disk's target name: vd followed by letters (vdb, vdz, vdaa). */
export function validTarget(t: string): boolean {
  return /^vd[a-z]{1,3}$/.test(t);
}

/** The target after `t`, as the guest's kernel names disks: vdz is followed by vdaa. */
export function nextTarget(t: string): string {
  const letters = t.slice(2).split('');
  let i = letters.length - 1;
  while (i >= 0 && letters[i] === 'z') letters[i--] = 'a';
  if (i < 0) letters.unshift('a');
  else letters[i] = String.fromCharCode((letters[i] as string).charCodeAt(0) + 1);
  return `vd${letters.join('')}`;
}

/** Roles in the order a guest's devices get their targets: paging first, then dump. */
const ROLE_ORDER = ['paging', 'dump'];

/** A guest's devices in target order: by role (paging, dump, others), then by name. */
export function targetOrder<T extends { name: string; role: string }>(devices: T[]): T[] {
  const rank = (r: string) => {
    const i = ROLE_ORDER.indexOf(r);
    return i < 0 ? ROLE_ORDER.length : i;
  };
  return [...devices].sort((a, b) => rank(a.role) - rank(b.role) || a.name.localeCompare(b.name));
}

function xml(s: string): string {
  return s
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/'/g, '&apos;')
    .replace(/"/g, '&quot;');
}

function nodeName(device: string): string {
  // QEMU node names: letters, digits, '-', '_', '.'; must start with a letter.
  return `ballast-${device.replace(/[^A-Za-z0-9_.-]/g, '_')}`;
}

/**
 * The disk's serial as the guest sees it (/sys/block/vdX/serial,
 * /dev/disk/by-id/virtio-SERIAL): the device's name, cut to virtio-blk's 20 bytes.
 * Target names are only hints to the guest, which names disks in PCI order.
 */
export function diskSerial(device: string): string {
  return device.slice(0, 20);
}

export function nbdUri(device: string, ep: NbdEndpoint): string {
  if (ep.socket) return `nbd+unix:///${encodeURIComponent(device)}?socket=${ep.socket}`;
  const h = ep.tcp!;
  const host = h.host.includes(':') ? `[${h.host}]` : h.host;
  return `nbd://${host}:${h.port}/${encodeURIComponent(device)}`;
}

/** The -blockdev and -device arguments, as an argv list. */
export function qemuArgs(device: string, ep: NbdEndpoint): string[] {
  const node = nodeName(device);
  const server = ep.socket
    ? `server.type=unix,server.path=${ep.socket}`
    : `server.type=inet,server.host=${ep.tcp!.host},server.port=${ep.tcp!.port}`;
  return [
    '-blockdev',
    `driver=nbd,node-name=${node},${server},export=${device}`,
    '-device',
    `virtio-blk-pci,drive=${node},id=${node}-dev,serial=${diskSerial(device)}`,
  ];
}

export function libvirtXml(
  device: string,
  ep: NbdEndpoint,
  opts: { target?: string } = {},
): string {
  const host = ep.socket
    ? `<host transport='unix' socket='${xml(ep.socket)}'/>`
    : `<host name='${xml(ep.tcp!.host)}' port='${ep.tcp!.port}'/>`;
  return [
    `<disk type='network' device='disk'>`,
    `  <driver name='qemu' type='raw' cache='none' io='native'/>`,
    `  <source protocol='nbd' name='${xml(device)}'>`,
    `    ${host}`,
    '  </source>',
    `  <target dev='${xml(opts.target ?? FIRST_TARGET)}' bus='virtio'/>`,
    `  <serial>${xml(diskSerial(device))}</serial>`,
    '</disk>',
  ].join('\n');
}

/**
 * The shell form that hot-plugs <disk> elements into a running domain and its
 * persistent definition: one `virsh attach-device` per element, the element given
 * on standard input (a here-document, so nothing is left on disk).
 */
export function virshAttach(domain: string, disks: string[]): string {
  const out: string[] = [];
  disks.forEach((xml, i) => {
    const end = i === 0 ? 'BALLAST_DISK' : `BALLAST_DISK_${i + 1}`;
    out.push(
      `virsh attach-device ${shellQuote(domain)} /dev/stdin --live --persistent <<'${end}'`,
      xml,
      end,
    );
  });
  return out.join('\n');
}

/** Shell-quote one argument for display. */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_./=,:+-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
