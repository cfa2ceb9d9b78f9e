// What every guest of the benchmarks and end-to-end tests is made of: Debian's kernel
// (/boot/vmlinuz-*), an initramfs of static busybox, kernel modules and an init script,
// and a serial console that QEMU serves on a Unix socket. Each guest (test/helpers/guest.ts,
// test/helpers/swap-guest.ts, bench/memory-guest.ts) adds only its init and its console
// protocol.

import { execFile } from 'node:child_process';
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  writeFileSync,
} from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** virtio-blk and what it needs, in load order (paths under the kernel's modules). */
export const VIRTIO_BLK_MODULES = [
  'drivers/virtio/virtio_ring.ko', // before virtio, which needs it
  'drivers/virtio/virtio.ko',
  'drivers/virtio/virtio_pci_modern_dev.ko',
  'drivers/virtio/virtio_pci_legacy_dev.ko',
  'drivers/virtio/virtio_pci.ko',
  'drivers/block/virtio_blk.ko',
];

/** The pvpanic driver: a panic the host sees (GUEST_PANICKED). */
export const PVPANIC_MODULES = [
  'drivers/misc/pvpanic/pvpanic.ko',
  'drivers/misc/pvpanic/pvpanic-mmio.ko',
];

/** The newest /boot/vmlinuz-* (Debian's linux-image-amd64), or null. */
export function guestKernel(): string | null {
  try {
    const k = readdirSync('/boot')
      .filter((f) => f.startsWith('vmlinuz-'))
      .sort()
      .pop();
    return k ? path.join('/boot', k) : null;
  } catch {
    return null;
  }
}

/**
 * Builds (once per dir and `prefix`) DIR/PREFIXinitrd.gz: static busybox, `init`, and
 * the kernel's `modules` (paths under its kernel/ directory) in /lib by their file names;
 * `extra` may add files to the root before it is packed. Returns { kernel, initrd }.
 */
export async function buildInitramfs(
  dir: string,
  prefix: string,
  init: string,
  modules: readonly string[],
  extra?: (root: string) => Promise<void>,
): Promise<{ kernel: string; initrd: string }> {
  const kernel = guestKernel();
  if (!kernel) throw new Error('no /boot/vmlinuz-*: apt-get install -y linux-image-amd64');
  const initrd = path.join(dir, `${prefix}initrd.gz`);
  if (existsSync(initrd)) return { kernel, initrd };
  const root = path.join(dir, `${prefix}root`);
  for (const d of ['bin', 'lib', 'proc', 'sys', 'dev', 'tmp'])
    mkdirSync(path.join(root, d), { recursive: true });
  copyFileSync('/bin/busybox', path.join(root, 'bin', 'busybox'));
  chmodSync(path.join(root, 'bin', 'busybox'), 0o755);
  const release = path.basename(kernel).replace(/^vmlinuz-/, '');
  const mods = `/lib/modules/${release}/kernel`;
  for (const m of modules) {
    const src = path.join(mods, m);
    const dst = path.join(root, 'lib', path.basename(m));
    if (existsSync(src)) copyFileSync(src, dst);
    // Debian may ship them compressed.
    else if (existsSync(`${src}.xz`)) await run('sh', ['-c', `xz -dc '${src}.xz' > '${dst}'`]);
  }
  if (extra) await extra(root);
  writeFileSync(path.join(root, 'init'), init, { mode: 0o755 });
  await run('sh', [
    '-c',
    `cd '${root}' && find . | cpio -o -H newc --quiet | gzip -1 > '${initrd}'`,
  ]);
  return { kernel, initrd };
}

/** Connects to QEMU's console socket, retrying while QEMU has not made it yet. */
export async function connectConsole(p: string, timeoutMs: number): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const c = net.connect(p);
        c.once('connect', () => resolve(c));
        c.once('error', reject);
      });
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** A guest's serial console: what arrives goes to `take`; waiters wake on each arrival. */
export abstract class SerialConsole {
  private waiters: (() => void)[] = [];

  protected constructor(private readonly sock: net.Socket) {
    sock.on('data', (b: Buffer) => {
      this.take(b.toString('latin1'));
      for (const w of this.waiters.splice(0)) w();
    });
    sock.on('error', () => {});
  }

  /** Keeps what arrived (a piece of the console's output, not a whole line). */
  protected abstract take(chunk: string): void;

  /** Resolves on the next arrival (or after `ms`). */
  next(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const t = setTimeout(resolve, ms);
      this.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  send(line: string): void {
    this.sock.write(`${line}\n`);
  }

  close(): void {
    this.sock.destroy();
  }
}
