// The guest of the memory-sharing tests and benchmark: Debian's kernel, an initramfs of
// static busybox, the virtio block and balloon modules and `memwork` (bench/memwork.c,
// compiled here with gcc -static), and a console protocol:
//   swapon      mkswap + swapon /dev/vda (the guest's Ballast paging device)
//   start MIB   memwork MIB in the background: MIB MiB written page by page
//               (MEMWORK-FILLED when done)
//   hot | cold  switch memwork to checked page ops on random pages, or to rest
//   verify      memwork checks every page once (MEMWORK-VERIFIED ... bad=N)
//   alive       BALLAST-ALIVE yes|no: memwork still runs (not OOM-killed)
// memwork reports MEMWORK-STAT lines (ops, bad pages, pswpin/pswpout, oom_kill).

import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { buildInitramfs, connectConsole, SerialConsole, VIRTIO_BLK_MODULES } from './guest-kit.js';

const MODULES = [...VIRTIO_BLK_MODULES, 'drivers/virtio/virtio_balloon.ko'];

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in ${MODULES.map((m) => path.basename(m, '.ko')).join(' ')}; do insmod /lib/$m.ko 2>/dev/null; done
i=0; while [ ! -e /sys/block/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
echo "BALLAST-BOOT vda=$(cat /sys/block/vda/size 2>/dev/null) balloon=$(grep -c virtio_balloon /proc/modules)"
while true; do
  echo BALLAST-READY
  read cmd arg || sleep 1
  case "$cmd" in
    swapon) mkswap /dev/vda >/dev/null 2>&1; swapon /dev/vda && echo "BALLAST-SWAPON $(grep SwapTotal /proc/meminfo | tr -s ' ')" ;;
    start) /bin/memwork "$arg" & echo $! > /tmp/memwork.pid ;;
    hot) kill -USR1 $(cat /tmp/memwork.pid) ;;
    cold) kill -USR2 $(cat /tmp/memwork.pid) ;;
    verify) kill -HUP $(cat /tmp/memwork.pid) ;;
    alive) if kill -0 $(cat /tmp/memwork.pid) 2>/dev/null; then echo BALLAST-ALIVE yes; else echo BALLAST-ALIVE no; fi ;;
  esac
done
`;

/** The repository's root (this file runs from bench/ under vitest, dist/bench/ built). */
export function repoRoot(): string {
  let d = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(d, 'package.json'))) {
    const up = path.dirname(d);
    if (up === d) throw new Error('repository root not found');
    d = up;
  }
  return d;
}

/** Builds (once per dir) the initramfs with memwork compiled in; returns { kernel, initrd }. */
export function buildMemGuest(dir: string): Promise<{ kernel: string; initrd: string }> {
  return buildInitramfs(dir, 'mem-', INIT, MODULES, async (root) => {
    await promisify(execFile)('gcc', [
      '-static',
      '-O2',
      '-o',
      path.join(root, 'bin', 'memwork'),
      path.join(repoRoot(), 'bench', 'memwork.c'),
    ]);
  });
}

export interface MemGuestSpec {
  kernel: string;
  initrd: string;
  /** The console's Unix socket (QEMU's server). */
  console: string;
  qmp: string;
  /** The agent's NBD socket and the guest's paging device on it (becomes /dev/vda). */
  nbdSocket: string;
  paging: string;
  memMiB: number;
  /** Free page reporting on the balloon (freed guest pages go back to the host). */
  freePageReporting?: boolean;
}

/**
 * QEMU arguments: TCG, RAM in a memfd (no transparent huge pages refilling what the
 * balloon takes), a virtio balloon, the paging device over NBD. `no_timer_check`: on a
 * host loaded to 20 times its cores a starved TCG vCPU failed the kernel's IO-APIC timer
 * check and the guest panicked at boot ("IO-APIC + timer doesn't work!").
 */
export function memGuestArgs(g: MemGuestSpec): string[] {
  return [
    '-nodefaults',
    '-display',
    'none',
    '-machine',
    'pc,accel=tcg,memory-backend=ram',
    '-m',
    String(g.memMiB),
    '-object',
    `memory-backend-memfd,id=ram,size=${g.memMiB}M`,
    '-kernel',
    g.kernel,
    '-initrd',
    g.initrd,
    '-append',
    'console=ttyS0 panic=0 quiet loglevel=3 mitigations=off transparent_hugepage=never no_timer_check',
    '-chardev',
    `socket,id=con,path=${g.console},server=on,wait=off`,
    '-serial',
    'chardev:con',
    '-qmp',
    `unix:${g.qmp},server=on,wait=off`,
    '-device',
    `virtio-balloon-pci,id=balloon0${g.freePageReporting ? ',free-page-reporting=on' : ''}`,
    '-blockdev',
    `driver=nbd,node-name=paging-nbd,server.type=unix,server.path=${g.nbdSocket},export=${g.paging}`,
    '-blockdev',
    'driver=raw,node-name=paging,file=paging-nbd',
    '-device',
    'virtio-blk-pci,drive=paging,id=paging-dev',
  ];
}

/** A MEMWORK-STAT line. */
export interface WorkStat {
  mode: 'hot' | 'cold';
  ops: number;
  bad: number;
  pswpin: number;
  pswpout: number;
  oomkill: number;
}

export function parseWorkStat(line: string): WorkStat | null {
  const m =
    /MEMWORK-STAT mode=(hot|cold) ops=(\d+) bad=(\d+) pswpin=(\d+) pswpout=(\d+) oomkill=(\d+)/.exec(
      line,
    );
  if (!m) return null;
  return {
    mode: m[1] as 'hot' | 'cold',
    ops: Number(m[2]),
    bad: Number(m[3]),
    pswpin: Number(m[4]),
    pswpout: Number(m[5]),
    oomkill: Number(m[6]),
  };
}

/** The guest's serial console: whole lines, kept; waiters woken on each. */
export class MemGuestConsole extends SerialConsole {
  readonly lines: string[] = [];
  private partial = '';
  /** The last MEMWORK-STAT, with when it arrived (performance.now()). */
  stat: (WorkStat & { at: number }) | null = null;

  protected take(chunk: string): void {
    const parts = (this.partial + chunk).split('\n');
    this.partial = parts.pop() ?? '';
    for (const raw of parts) {
      const l = raw.replace(/\r$/, '');
      this.lines.push(l);
      const s = parseWorkStat(l);
      if (s) this.stat = { ...s, at: performance.now() };
    }
  }

  static async connect(p: string, timeoutMs = 30_000): Promise<MemGuestConsole> {
    return new MemGuestConsole(await connectConsole(p, timeoutMs));
  }

  /** The lines that contain `s`. */
  matching(s: string): string[] {
    return this.lines.filter((l) => l.includes(s));
  }

  /** Waits until `n` lines contain `s`; returns the n-th. A hang guard, never a judge. */
  async waitLine(s: string, n = 1, timeoutMs = 300_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.matching(s);
      if (m.length >= n) return m[n - 1] as string;
      const left = deadline - Date.now();
      if (left <= 0)
        throw new Error(
          `console: "${s}" x${n} not seen in ${timeoutMs} ms; last lines:\n${this.lines.slice(-30).join('\n')}`,
        );
      await this.next(Math.min(left, 1000));
    }
  }
}
