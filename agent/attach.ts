// What an operator pastes to give a guest a device: QEMU arguments, a
// libvirt <disk> element, or the NBD URI.

export interface NbdEndpoint {
  /** TCP address, if the agent listens on one. */
  tcp?: { host: string; port: number };
  /** Unix socket path, if any (preferred for guests on the same host). */
  socket?: string;
}

export type AttachFormat = 'qemu' | 'libvirt' | 'uri';
export const ATTACH_FORMATS: readonly AttachFormat[] = ['qemu', 'libvirt', 'uri'];

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
    `virtio-blk-pci,drive=${node},id=${node}-dev`,
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
    `  <target dev='${xml(opts.target ?? 'vdb')}' bus='virtio'/>`,
    '</disk>',
  ].join('\n');
}

/** Shell-quote one argument for display. */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_./=,:+-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}
