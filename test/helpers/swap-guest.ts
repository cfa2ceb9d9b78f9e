// A guest that swaps, for the tests that move guests: Debian's kernel, an initramfs of
// static busybox with the virtio block and pvpanic modules, and a console protocol:
//   swapon        mkswap + swapon /dev/vda (the paging device)
//   fill N        N chunks of 4 MiB of random data in a tmpfs, their MD5s kept
//   check R       R passes of md5sum -c over every chunk; ends with
//                 "BALLAST-CHECKED ok=<lines OK> bad=<lines not OK> pswpin=.. pswpout=.."
//   panic         echo c > /proc/sysrq-trigger
// With 128 MiB of RAM and 160 MiB of chunks, pages go out to and come back from the
// paging device on every pass.
//
// Its devices are attached the way a moving guest needs them: the NBD client reconnects
// (a source whose connection was aborted by a hand-off that was then undone), and a
// write error pauses the guest (werror=stop) rather than failing the guest's I/O.

import path from 'node:path';
import { buildInitramfs, PVPANIC_MODULES, VIRTIO_BLK_MODULES } from '../../bench/guest-kit.js';
import { scaled } from './wait.js';

const MODULES = [...VIRTIO_BLK_MODULES, ...PVPANIC_MODULES];

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /w /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in ${MODULES.map((m) => path.basename(m, '.ko')).join(' ')}; do insmod /lib/$m.ko 2>/dev/null; done
echo 1 > /proc/sys/kernel/sysrq
mount -t tmpfs -o size=1g tmpfs /w
i=0; while [ ! -e /sys/block/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
echo "BALLAST-BOOT vda=$(cat /sys/block/vda/size 2>/dev/null)"
while true; do
  echo BALLAST-READY
  read cmd arg || sleep 1
  case "$cmd" in
    swapon) mkswap /dev/vda >/dev/null 2>&1; swapon /dev/vda && echo "BALLAST-SWAPON $(grep SwapTotal /proc/meminfo | tr -s ' ')" ;;
    fill)
      : > /sums
      i=0
      while [ $i -lt $arg ]; do
        i=$((i+1))
        dd if=/dev/urandom of=/w/c$i bs=1M count=4 2>/dev/null
        md5sum /w/c$i >> /sums
      done
      echo "BALLAST-FILLED $(grep -c . /sums) $(grep SwapFree /proc/meminfo | tr -s ' ')" ;;
    check)
      ok=0; bad=0; r=0
      while [ $r -lt $arg ]; do
        r=$((r+1))
        md5sum -c /sums > /tmp/res 2>&1
        o=$(grep -c ': OK$' /tmp/res)
        n=$(grep -vc ': OK$' /tmp/res)
        ok=$((ok+o)); bad=$((bad+n))
        echo "BALLAST-PASS $r ok=$o"
      done
      echo "BALLAST-CHECKED ok=$ok bad=$bad $(grep -E '^pswp(in|out)' /proc/vmstat | tr ' \\n' '= ')" ;;
    panic) echo c > /proc/sysrq-trigger ;;
  esac
done
`;

/** Builds (once per dir) the initramfs; returns { kernel, initrd }. */
export function buildSwapGuest(dir: string): Promise<{ kernel: string; initrd: string }> {
  return buildInitramfs(dir, 'swap-', INIT, MODULES);
}

export interface SwapGuestSpec {
  kernel: string;
  initrd: string;
  /** The console's Unix socket (QEMU's server). */
  console: string;
  /** The agent's NBD socket on this guest's host. */
  nbdSocket: string;
  /** The paging device (becomes /dev/vda). */
  paging: string;
  /** Bytes of the paging device the guest sees (the rest is the suspend area). */
  swapBytes?: number;
  /** Other devices of the guest, attached after it (dump devices). */
  others?: string[];
  memMiB?: number;
  /** Start as a migration destination: -incoming defer -S. */
  incoming?: boolean;
}

/** QEMU arguments for the swap guest (add -qmp). */
export function swapGuestArgs(g: SwapGuestSpec): string[] {
  const nbd = (node: string, dev: string) =>
    `driver=nbd,node-name=${node},server.type=unix,server.path=${g.nbdSocket},export=${dev},reconnect-delay=60`;
  const args = [
    '-machine',
    'pc,accel=tcg',
    '-m',
    String(g.memMiB ?? 128),
    '-kernel',
    g.kernel,
    '-initrd',
    g.initrd,
    '-append',
    'console=ttyS0 panic=0 quiet loglevel=3 mitigations=off',
    '-device',
    'pvpanic',
    '-action',
    'panic=pause',
    '-chardev',
    `socket,id=con,path=${g.console},server=on,wait=off`,
    '-serial',
    'chardev:con',
    '-blockdev',
    nbd('paging-nbd', g.paging),
    '-blockdev',
    `driver=raw,node-name=paging,file=paging-nbd${g.swapBytes ? `,offset=0,size=${g.swapBytes}` : ''}`,
    '-device',
    'virtio-blk-pci,drive=paging,id=paging-dev,werror=stop,rerror=stop',
  ];
  (g.others ?? []).forEach((d, i) => {
    args.push(
      '-blockdev',
      nbd(`other${i}`, d),
      '-device',
      `virtio-blk-pci,drive=other${i},id=other${i}-dev,werror=stop,rerror=stop`,
    );
  });
  if (g.incoming) args.push('-incoming', 'defer', '-S');
  return args;
}

/**
 * Waits until `marker` has appeared `n` times on the console and the line holding the
 * last one is complete (a console line arrives in pieces); returns that line.
 */
export async function waitLine(
  c: { text: string; waitFor(s: string, n?: number, timeoutMs?: number): Promise<void> },
  marker: string,
  n: number,
  timeoutMs = 300_000,
): Promise<string> {
  await c.waitFor(marker, n, timeoutMs);
  const deadline = Date.now() + scaled(10_000);
  for (;;) {
    const rest = c.text.slice(c.text.lastIndexOf(marker));
    const nl = rest.indexOf('\n');
    if (nl >= 0) return rest.slice(0, nl).trim();
    if (Date.now() > deadline) return rest.trim();
    await new Promise((r) => setTimeout(r, 20));
  }
}
