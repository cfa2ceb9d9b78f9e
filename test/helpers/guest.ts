// A tiny Linux guest for end-to-end tests: Debian's kernel (/boot/vmlinuz-*) and an
// initramfs built here from Debian's static busybox and the pvpanic modules. The guest
// prints BALLAST-BOOT on every boot, then takes commands on its serial console:
//   mark NONCE      fill 20000 lines of BALLAST-MARK-NONCE into a RAM file
//   markphys NONCE  fill the 4 MiB at guest-physical PHYS_MARK_GPA (kept out of the
//                   kernel's hands by memmap=...$...) with BALLAST-PHYS-NONCE through
//                   /dev/mem: every boot writes the same memory
//   fill MIB        write MIB MiB of text at guest-physical FILL_GPA through /dev/mem
//                   (memory worth dumping that no boot touches: guestArgs' fillMiB
//                   reserves it)
//   panic           echo c > /proc/sysrq-trigger
//   swap SERIAL     mkswap and swapon the virtio disk with that serial (the virtio
//                   modules are loaded at boot)
//   swapfill N MIB  write MIB MiB of BALLAST-SWAP-N lines into a tmpfs file (more than
//                   the guest's RAM pushes it into swap), read them back, report the
//                   swap used
//   disks           list the block devices the guest sees, as NAME=SERIAL
// The console is a Unix socket (QEMU's server), read and written by GuestConsole.

import {
  buildInitramfs,
  connectConsole,
  PVPANIC_MODULES,
  SerialConsole,
  VIRTIO_BLK_MODULES,
} from '../../bench/guest-kit.js';
import { scaled } from './wait.js';

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in /lib/pvpanic.ko /lib/pvpanic-mmio.ko; do insmod $m 2>/dev/null; done
for m in ${VIRTIO_BLK_MODULES.map((m) => `/lib/${m.split('/').pop()}`).join(' ')}; do insmod $m 2>/dev/null; done
echo 1 > /proc/sys/kernel/sysrq
echo "BALLAST-BOOT pvpanic=$(grep -c pvpanic /proc/modules)"
while true; do
  echo BALLAST-READY
  read cmd arg || sleep 1
  case "$cmd" in
    mark) if yes "BALLAST-MARK-$arg" | head -n 20000 > /tmp/pattern; then echo BALLAST-MARKED; else echo BALLAST-MARK-FAILED; fi ;;
    markphys) if yes "BALLAST-PHYS-$arg" | head -c 4194304 |
        dd of=/dev/mem bs=65536 seek=1024 conv=notrunc 2>/dev/null; then
        echo BALLAST-PHYS-DONE; else echo BALLAST-PHYS-FAILED; fi ;;
    fill) if yes "BALLAST-FILL-$arg" | head -c $((arg * 1048576)) |
        dd of=/dev/mem bs=65536 seek=1088 conv=notrunc 2>/dev/null; then
        echo BALLAST-FILLED; else echo BALLAST-FILL-FAILED; fi ;;
    panic) echo c > /proc/sysrq-trigger ;;
    swap)
      for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = "$arg" ] && dev=\${d##*/}; done
      mkswap /dev/$dev >/dev/null && swapon /dev/$dev && echo "BALLAST-SWAPON $arg $dev" ;;
    swapfill)
      set -- $arg
      mkdir -p /mnt && mount -t tmpfs -o size=1g tmpfs /mnt 2>/dev/null
      bytes=$(($2 * 1048576))
      yes "BALLAST-SWAP-$1" | head -c $bytes > /mnt/fill
      used=$(awk '/^SwapTotal/{t=$2}/^SwapFree/{f=$2}END{print t-f}' /proc/meminfo)
      if yes "BALLAST-SWAP-$1" | head -c $bytes | cmp -s - /mnt/fill; then r=ok; else r=bad; fi
      echo "BALLAST-FILLED $r swapKiB=$used"
      rm -f /mnt/fill ;;
    disks)
      l=""; for d in /sys/block/*; do l="$l \${d##*/}=$(cat $d/serial 2>/dev/null)"; done
      echo "BALLAST-DISKS$l" ;;
    run) eval "$arg"; echo BALLAST-RAN ;;
  esac
done
`;

/** Where `markphys` writes (64 MiB; dd's seek=1024 of 64 KiB blocks), and how much. */
export const PHYS_MARK_GPA = 0x4000000;
export const PHYS_MARK_SIZE = 4 * 1024 * 1024;
/** Where `fill` writes, right after markphys's region (dd's seek=1088 of 64 KiB blocks). */
export const FILL_GPA = 0x4400000;

/** How many times `s` occurs in `hay` (a dump), without overlaps. */
export function occurrences(hay: Buffer, s: string): number {
  const needle = Buffer.from(s);
  let n = 0;
  for (let i = hay.indexOf(needle); i >= 0; i = hay.indexOf(needle, i + needle.length)) n++;
  return n;
}

/** Builds (once per dir) the initramfs; returns { kernel, initrd }. */
export function buildGuest(dir: string): Promise<{ kernel: string; initrd: string }> {
  return buildInitramfs(dir, '', INIT, [...PVPANIC_MODULES, ...VIRTIO_BLK_MODULES]);
}

/** QEMU arguments for the guest (add -qmp and the dump device). */
export function guestArgs(
  g: { kernel: string; initrd: string },
  consoleSock: string,
  memMiB = 256,
  opts: { fillMiB?: number } = {},
): string[] {
  // One reserved region for both (a second memmap= made /dev/mem writes to the first fail).
  const reserved = 4 + (opts.fillMiB ?? 0);
  return [
    '-machine',
    'pc,accel=tcg',
    '-m',
    String(memMiB),
    '-kernel',
    g.kernel,
    '-initrd',
    g.initrd,
    '-append',
    // The memmap reserves markphys's and fill's regions (guests need more than 68 MiB).
    `console=ttyS0 panic=0 quiet loglevel=3 mitigations=off memmap=${reserved}M$0x4000000`,
    '-device',
    'pvpanic',
    '-action',
    'panic=pause',
    '-chardev',
    `socket,id=con,path=${consoleSock},server=on,wait=off`,
    '-serial',
    'chardev:con',
  ];
}

/** The guest's serial console over QEMU's Unix socket, kept whole as text. */
export class GuestConsole extends SerialConsole {
  text = '';

  protected take(chunk: string): void {
    this.text += chunk;
  }

  static async connect(p: string): Promise<GuestConsole> {
    return new GuestConsole(await connectConsole(p, 20_000));
  }

  count(s: string): number {
    return this.text.split(s).length - 1;
  }

  /** Waits until `s` has appeared at least `n` times on the console. */
  async waitFor(s: string, n = 1, timeoutMs = 120_000): Promise<void> {
    const give = scaled(timeoutMs);
    const deadline = Date.now() + give;
    while (this.count(s) < n) {
      const left = deadline - Date.now();
      if (left <= 0)
        throw new Error(
          `console: "${s}" x${n} not seen in ${give} ms (load-scaled); console so far:\n${this.text.slice(-3000)}`,
        );
      await this.next(Math.min(left, 1000));
    }
  }
}
