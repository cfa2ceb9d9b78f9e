// QEMU alone, no Ballast in the path: how fast QEMU itself emits a guest's memory
// with `dump-guest-memory` (what dump-then-reboot uses) and with a background
// snapshot (what early reboot uses), both into a pipe drained by `cat > /dev/null`.
// The early-reboot dump can never be faster than QEMU's background snapshot alone;
// this bounds what the early-reboot throughput goal can reach on this machine.
//
//   npm run bench:dump -- --suite qemu-alone [--sizes 512,1024] [--rounds 5]

import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import path from 'node:path';
import { startRandomGuest } from './early-reboot.js';

export interface SnapshotRateOptions {
  sizesMiB: number[];
  rounds: number;
  dir: string;
  log: (m: string) => void;
  waitFor: (sock: string) => Promise<void>;
  median: (xs: number[]) => number;
  procCpu: (pid: number | undefined) => number;
}

export interface SnapshotRate {
  memMiB: number;
  /** MiB/s per round. */
  dump: number[];
  snapshot: number[];
  /** QEMU CPU seconds per run (all its threads). */
  dumpCpu: number[];
  snapshotCpu: number[];
}

const T = { timeoutMs: 300_000 };

export async function snapshotRateBench(o: SnapshotRateOptions): Promise<SnapshotRate[]> {
  const shm = existsSync('/dev/shm') ? '/dev/shm' : o.dir;
  const out: SnapshotRate[] = [];
  for (const memMiB of o.sizesMiB) {
    const ram = path.join(shm, `ballast-bench-alone-${process.pid}-${memMiB}.bin`);
    const children: ChildProcess[] = [];
    try {
      const started = await startRandomGuest({
        qmpSock: path.join(o.dir, `alone-qmp-${memMiB}.sock`),
        ram,
        memMiB,
        share: true,
        children,
        waitFor: o.waitFor,
      });
      const { qemu, qmp } = started;
      await qmp.execute('cont', undefined, T);
      await new Promise((r) => setTimeout(r, 300));
      await qmp.execute('stop', undefined, T);
      await qmp.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40 }, T);
      const wp = (on: boolean) =>
        qmp.execute(
          'migrate-set-capabilities',
          { capabilities: [{ capability: 'background-snapshot', state: on }] },
          T,
        );
      const r: SnapshotRate = { memMiB, dump: [], snapshot: [], dumpCpu: [], snapshotCpu: [] };
      const fifo = path.join(o.dir, `alone-${memMiB}.fifo`);
      for (let i = 0; i < o.rounds; i++) {
        // dump-guest-memory (ELF) into a FIFO that cat drains
        rmSync(fifo, { force: true });
        spawnSync('mkfifo', [fifo]);
        const cat = spawn('sh', ['-c', `exec cat "${fifo}" > /dev/null`], { stdio: 'ignore' });
        const drained = new Promise((res) => cat.once('exit', res));
        let cpu0 = o.procCpu(qemu.pid);
        let t0 = performance.now();
        await qmp.execute('dump-guest-memory', { paging: false, protocol: `file:${fifo}` }, T);
        await drained;
        r.dump.push(memMiB / ((performance.now() - t0) / 1000));
        r.dumpCpu.push(o.procCpu(qemu.pid) - cpu0);
        // a background snapshot of the stopped guest into `exec:cat > /dev/null`
        await wp(true);
        cpu0 = o.procCpu(qemu.pid);
        t0 = performance.now();
        await qmp.execute('migrate', { uri: 'exec:cat > /dev/null' }, T);
        for (;;) {
          const s = await qmp.execute<{ status?: string }>('query-migrate', undefined, T);
          if (s.status === 'completed') break;
          if (s.status === 'failed' || s.status === 'cancelled')
            throw new Error(`background snapshot ${s.status}`);
          await new Promise((res) => setTimeout(res, 5));
        }
        r.snapshot.push(memMiB / ((performance.now() - t0) / 1000));
        r.snapshotCpu.push(o.procCpu(qemu.pid) - cpu0);
        await wp(false);
        o.log(
          `qemu alone ${memMiB} MiB round ${i + 1}: dump-guest-memory ${r.dump.at(-1)!.toFixed(0)} MiB/s, background snapshot ${r.snapshot.at(-1)!.toFixed(0)} MiB/s`,
        );
      }
      await qmp.execute('quit', undefined, T).catch(() => undefined);
      out.push(r);
    } finally {
      for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
      rmSync(ram, { force: true });
    }
  }
  return out;
}

export function snapshotRateTable(
  rates: SnapshotRate[],
  rounds: number,
  median: (xs: number[]) => number,
): string {
  const lines = [
    `QEMU alone into a pipe (cat > /dev/null), median of ${rounds} rounds:`,
    '| guest RAM | dump-guest-memory | background snapshot | snapshot / dump | QEMU CPU s (dump / snapshot) |',
    '|---|---|---|---|---|',
  ];
  for (const r of rates) {
    const d = median(r.dump);
    const s = median(r.snapshot);
    lines.push(
      `| ${r.memMiB} MiB | ${d.toFixed(0)} MiB/s | ${s.toFixed(0)} MiB/s | ${(s / d).toFixed(2)}× | ${median(r.dumpCpu).toFixed(2)} / ${median(r.snapshotCpu).toFixed(2)} |`,
    );
  }
  return `${lines.join('\n')}\n`;
}
