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

/**
 * Where a TCP client's X.509 credentials are read from when the agent names TCP
 * clients by certificate: QEMU's and libvirt's own default directory.
 */
export const CLIENT_TLS_DIR = '/etc/pki/qemu';

/** The attach's TLS variant: the client's X.509 credentials in `dir` (TCP only). */
export interface AttachTls {
  dir: string;
}

export function nbdUri(device: string, ep: NbdEndpoint, tls?: AttachTls): string {
  if (ep.socket) return `nbd+unix:///${encodeURIComponent(device)}?socket=${ep.socket}`;
  const h = ep.tcp!;
  const host = h.host.includes(':') ? `[${h.host}]` : h.host;
  return tls
    ? `nbds://${host}:${h.port}/${encodeURIComponent(device)}?tls-certificates=${tls.dir}`
    : `nbd://${host}:${h.port}/${encodeURIComponent(device)}`;
}

/** The -blockdev and -device arguments (with TLS, the credentials' -object first), as an argv list. */
export function qemuArgs(device: string, ep: NbdEndpoint, tls?: AttachTls): string[] {
  const node = nodeName(device);
  const server = ep.socket
    ? `server.type=unix,server.path=${ep.socket}`
    : `server.type=inet,server.host=${ep.tcp!.host},server.port=${ep.tcp!.port}`;
  const creds = `${node}-tls`;
  const useTls = tls !== undefined && !ep.socket;
  return [
    ...(useTls ? ['-object', `tls-creds-x509,id=${creds},dir=${tls.dir},endpoint=client`] : []),
    '-blockdev',
    `driver=nbd,node-name=${node},${server},export=${device}${useTls ? `,tls-creds=${creds}` : ''}`,
    '-device',
    `virtio-blk-pci,drive=${node},id=${node}-dev,serial=${diskSerial(device)}`,
  ];
}

/** The node a guest's device is attached to when it sees only part of the device. */
export function partNodeName(device: string): string {
  return `${nodeName(device)}-raw`;
}

/**
 * QEMU arguments (as `qemuArgs` prints them) that give the guest only the first `size`
 * bytes of the device: a raw node with size= over the NBD node, and the -device on it.
 * What follows is the paging device's suspend area, which the guest must not see.
 */
export function guestPart(device: string, args: string[], size: number): string[] {
  const nbd = nodeName(device);
  const part = partNodeName(device);
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    if (args[i - 1] === '-device') {
      out.push(a.replace(new RegExp(`(^|,)drive=${nbd}(?=,|$)`), `$1drive=${part}`));
      continue;
    }
    out.push(a);
    if (args[i - 1] === '-blockdev' && a.startsWith(`driver=nbd,node-name=${nbd},`)) {
      out.push('-blockdev', `driver=raw,node-name=${part},file=${nbd},size=${size}`);
    }
  }
  return out;
}

export function libvirtXml(
  device: string,
  ep: NbdEndpoint,
  opts: { target?: string; tls?: AttachTls } = {},
): string {
  const host = ep.socket
    ? `<host transport='unix' socket='${xml(ep.socket)}'/>`
    : `<host name='${xml(ep.tcp!.host)}' port='${ep.tcp!.port}'/>`;
  // libvirt reads the client's credentials from qemu.conf's nbd_tls_x509_cert_dir.
  const tls = opts.tls && !ep.socket ? ` tls='yes'` : '';
  return [
    `<disk type='network' device='disk'>`,
    `  <driver name='qemu' type='raw' cache='none' io='native'/>`,
    `  <source protocol='nbd' name='${xml(device)}'${tls}>`,
    `    ${host}`,
    '  </source>',
    `  <target dev='${xml(opts.target ?? FIRST_TARGET)}' bus='virtio'/>`,
    `  <serial>${xml(diskSerial(device))}</serial>`,
    '</disk>',
  ].join('\n');
}

/**
 * A <disk> (as `libvirtXml` prints it) that gives the guest only the first `size` bytes
 * of the device: libvirt's storage slice, which it turns into a raw node with
 * offset=0,size= over the NBD node.
 */
export function libvirtSlice(xml: string, size: number): string {
  return xml.replace(
    /\n(\s*)<\/source>/,
    (_m, indent: string) =>
      `\n${indent}  <slices><slice type='storage' offset='0' size='${size}'/></slices>\n${indent}</source>`,
  );
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

/** How the agent treats a TCP client that TLS does not name (its `nbd:` section). */
export interface TcpClients {
  anonymous: 'unix' | 'any' | 'none';
  tls: 'off' | 'allow' | 'require';
  /** Whether TLS names clients by certificate (nbd.tls.cert configured). */
  x509: boolean;
  /** Whether TLS names clients by a PSK username (nbd.tls.pskFile configured). */
  psk: boolean;
  /** Source addresses `nbd.identities` names (ADDRESS=NAME entries). */
  named: string[];
}

/**
 * What attaching over TCP takes with this agent's `nbd:` section: the TLS variant
 * when it names clients by certificate, and what to tell the user when what is
 * printed would be refused (or served from some addresses only).
 */
export function tcpAdvice(c: TcpClients): { tls?: AttachTls; note?: string } {
  if (c.x509 && (c.tls === 'require' || c.anonymous !== 'any')) {
    return {
      tls: { dir: CLIENT_TLS_DIR },
      note:
        `this agent names TCP clients by their TLS certificate (nbd.tls): the guest's host needs ` +
        `ca-cert.pem, client-cert.pem and client-key.pem (a certificate its CA signed, CN = the ` +
        `identity) in ${CLIENT_TLS_DIR} (QEMU: dir= of the tls-creds-x509 object; libvirt: ` +
        `nbd_tls_x509_cert_dir in qemu.conf)`,
    };
  }
  if (c.anonymous === 'any' && c.tls !== 'require') return {};
  const how =
    "use the Unix socket on the agent's host (leave out --transport tcp), or name the guest's " +
    'host in the agent\'s config (nbd.identities: ["ADDRESS=NAME"]), or give it TLS ' +
    '(nbd.tls with a certificate), or serve anonymous TCP clients (nbd.anonymous: any)';
  if (c.psk) {
    return {
      note:
        'this agent names TCP clients by TLS PSK (nbd.tls.pskFile): QEMU needs a ' +
        'tls-creds-psk object with the username and key, and tls-creds= on the -blockdev; as ' +
        'printed, it is refused ("Denied by server for option 7")',
    };
  }
  if (c.named.length > 0 && c.tls !== 'require') {
    return {
      note: `this agent serves TCP clients without TLS only from ${c.named.join(', ')} (nbd.identities); from anywhere else QEMU is refused ("Denied by server for option 7"): ${how}`,
    };
  }
  return {
    note: `this agent refuses anonymous TCP clients (nbd.anonymous: ${c.anonymous}${c.tls === 'require' ? ', nbd.tls.mode: require' : ''}): QEMU would fail with "Denied by server for option 7"; ${how}`,
  };
}
