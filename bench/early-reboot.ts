// Early reboot against dump-then-reboot, in one run: service downtime (panic → guest
// running again) and dump throughput, for guests of each size in --sizes.
//
// The guest is QEMU whose RAM is a file of random bytes on tmpfs (/dev/shm; a shared
// mapping: userfaultfd write-protect works on shmem, not on a disk file system's pages),
// so both dumps carry real data without booting anything. Before each measurement the
// guest runs for a moment (SeaBIOS) and is stopped: the state a panic leaves it in, as
// far as QEMU is concerned. The "panic" instant is the call into dumpd's dump path (the
// event's delivery is not part of it). The rebooted guest runs SeaBIOS while an early-
// reboot dump streams: it writes little memory, where a booting kernel would write more
// (each first write of a page waits for that page's copy). The modes alternate in order
// from round to round; each dump goes into space that holds no data (removed and trimmed
// after its round).

import { type ChildProcess, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, openSync, rmSync, writeSync } from 'node:fs';
import path from 'node:path';
import type { DumpFormat } from '../dumpd/catalog.js';
import { DumpDevice } from '../dumpd/device.js';
import { runEarlyReboot } from '../dumpd/early.js';
import { type DumpResult, runDump } from '../dumpd/job.js';
import { QmpClient } from '../dumpd/qmp.js';

export interface EarlyRebootBenchOptions {
  sizesMiB: number[];
  rounds: number;
  format: DumpFormat;
  settle: number;
  cache: string;
  dir: string;
  root: string;
  log: (m: string) => void;
  waitFor: (sock: string) => Promise<void>;
  median: (xs: number[]) => number;
  procCpu: (pid: number | undefined) => number;
}

export interface ModeFigures {
  downtimeMs: number[];
  MiBps: number[];
  panicToCompleteMs: number[];
  medianDowntimeMs: number;
  medianMiBps: number;
  medianPanicToCompleteMs: number;
  /** CPU seconds per dump: dumpd (this process), the NBD server, QEMU (all its threads, the guest's too). */
  cpu: { dumpd: number[]; server: number[]; qemu: number[] };
  medianCpu: { dumpd: number; server: number; qemu: number };
  bytes: number;
  fallback?: string;
}

export interface SizeFigures {
  memMiB: number;
  dumpThenReboot: ModeFigures;
  earlyReboot: ModeFigures;
  /** Median early-reboot throughput over median dump-then-reboot throughput. */
  throughputRatio: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What a dump benchmark runs against: a dump device and a paused QEMU, on Unix sockets. */
export interface DumpRig {
  srv: ChildProcess;
  qemu: ChildProcess;
  qmp: QmpClient;
  uri: string;
}

/**
 * Fills `ram` with `memMiB` of random bytes (nothing for a dump format to
 * compress) and starts QEMU paused on that RAM, QMP on `qmpSock`. `share`: the
 * guest's writes reach the file. QEMU goes into `children` as it starts.
 */
export async function startRandomGuest(o: {
  qmpSock: string;
  ram: string;
  memMiB: number;
  share: boolean;
  children: ChildProcess[];
  waitFor: (sock: string) => Promise<void>;
}): Promise<{ qemu: ChildProcess; qmp: QmpClient }> {
  const { memMiB, ram } = o;
  const fd = openSync(ram, 'w');
  const chunk = Buffer.alloc(16 * 1024 * 1024);
  for (let i = 0; i < memMiB / 16; i++) writeSync(fd, randomFillSync(chunk));
  closeSync(fd);
  const share = o.share ? 'on' : 'off';
  const qemu = spawn(
    'qemu-system-x86_64',
    [
      '-nodefaults',
      '-display',
      'none',
      '-machine',
      'pc,accel=tcg,memory-backend=ram0',
      '-object',
      `memory-backend-file,id=ram0,size=${memMiB}M,mem-path=${ram},share=${share},prealloc=on`,
      '-m',
      `${memMiB}M`,
      '-S',
      '-qmp',
      `unix:${o.qmpSock},server=on,wait=off`,
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  o.children.push(qemu);
  await o.waitFor(o.qmpSock);
  return { qemu, qmp: await QmpClient.connect(o.qmpSock) };
}

/**
 * startRandomGuest, with `image` served as the dump device (ballast serve on
 * `nbdSock`). Each process goes into `children` as it starts.
 */
export async function startDumpRig(o: {
  root: string;
  image: string;
  nbdSock: string;
  qmpSock: string;
  ram: string;
  memMiB: number;
  share: boolean;
  cache: string;
  children: ChildProcess[];
  waitFor: (sock: string) => Promise<void>;
}): Promise<DumpRig> {
  const srv = spawn(
    process.execPath,
    [
      path.join(o.root, 'bin', 'ballast'),
      'serve',
      o.image,
      '--size',
      `${Math.ceil(o.memMiB * 1.1) + 64}M`,
      '--socket',
      o.nbdSock,
      '--cache',
      o.cache,
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  o.children.push(srv);
  const { qemu, qmp } = await startRandomGuest(o);
  await o.waitFor(o.nbdSock);
  return { srv, qemu, qmp, uri: `nbd+unix:///?socket=${o.nbdSock}` };
}

export async function earlyRebootBench(o: EarlyRebootBenchOptions): Promise<SizeFigures[]> {
  const shm = existsSync('/dev/shm') ? '/dev/shm' : o.dir;
  const out: SizeFigures[] = [];
  for (const memMiB of o.sizesMiB) {
    const children: ChildProcess[] = [];
    const ram = path.join(shm, `ballast-bench-ram-${process.pid}-${memMiB}.bin`);
    try {
      o.log(`early reboot: guest RAM ${memMiB} MiB of random bytes in ${ram}`);
      const { srv, qemu, qmp, uri } = await startDumpRig({
        root: o.root,
        image: path.join(o.dir, `er-dump-${memMiB}.img`),
        nbdSock: path.join(o.dir, `er-nbd-${memMiB}.sock`),
        qmpSock: path.join(o.dir, `er-qmp-${memMiB}.sock`),
        ram,
        memMiB,
        share: true,
        cache: o.cache,
        children,
        waitFor: o.waitFor,
      });
      const fig = (): ModeFigures => ({
        downtimeMs: [],
        MiBps: [],
        panicToCompleteMs: [],
        medianDowntimeMs: 0,
        medianMiBps: 0,
        medianPanicToCompleteMs: 0,
        cpu: { dumpd: [], server: [], qemu: [] },
        medianCpu: { dumpd: 0, server: 0, qemu: 0 },
        bytes: 0,
      });
      const dtr = fig();
      const er = fig();
      for (let r = 0; r < o.rounds; r++) {
        const order = r % 2 === 0 ? ['dtr', 'er'] : ['er', 'dtr'];
        for (const which of order) {
          // Run a moment, then stop: where a panic leaves the guest.
          await qmp.execute('cont');
          await sleep(300);
          await qmp.execute('stop');
          await sleep(o.settle * 1000);
          const cpu0 = process.cpuUsage();
          const srv0 = o.procCpu(srv.pid);
          const qemu0 = o.procCpu(qemu.pid);
          const panicAt = Date.now();
          let res: DumpResult;
          if (which === 'dtr') {
            res = await runDump({
              guest: 'bench',
              qmp,
              uri,
              format: o.format,
              keep: 1,
              after: 'reboot',
              runDir: path.join(o.dir, 'run'),
              timeoutMs: 600_000,
              panicAt,
            });
          } else {
            res = await runEarlyReboot({
              guest: 'bench',
              qmp,
              uri,
              format: o.format,
              keep: 1,
              runDir: path.join(o.dir, 'run'),
              timeoutMs: 600_000,
              panicAt,
            });
          }
          if (!res.ok) throw new Error(`dump failed: ${res.error?.code} ${res.error?.message}`);
          const f = which === 'dtr' ? dtr : er;
          const cpu = process.cpuUsage(cpu0);
          f.cpu.dumpd.push((cpu.user + cpu.system) / 1e6);
          f.cpu.server.push(o.procCpu(srv.pid) - srv0);
          f.cpu.qemu.push(o.procCpu(qemu.pid) - qemu0);
          if (res.fallback) f.fallback = res.fallback;
          const completeAt = res.entry?.finishedAt ?? res.settledAt ?? Date.now();
          const down = (res.runningAt ?? completeAt) - panicAt;
          f.downtimeMs.push(down);
          f.panicToCompleteMs.push(completeAt - panicAt);
          f.MiBps.push(res.bytes / (res.durationMs / 1000) / 2 ** 20);
          f.bytes = res.bytes;
          if (res.entry) {
            const dev = await DumpDevice.open(uri);
            await dev.remove(res.entry.id);
            await dev.close();
          }
          o.log(
            `${memMiB} MiB round ${r + 1} ${which === 'dtr' ? 'dump-then-reboot' : 'early-reboot'}${res.fallback ? ` (fell back: ${res.fallback})` : ''}: running again after ${down} ms, dump complete after ${completeAt - panicAt} ms, ${(res.bytes / 2 ** 20).toFixed(0)} MiB at ${(f.MiBps.at(-1) ?? 0).toFixed(0)} MiB/s`,
          );
        }
      }
      qmp.close();
      for (const f of [dtr, er]) {
        f.medianDowntimeMs = o.median(f.downtimeMs);
        f.medianMiBps = o.median(f.MiBps);
        f.medianPanicToCompleteMs = o.median(f.panicToCompleteMs);
        f.medianCpu = {
          dumpd: o.median(f.cpu.dumpd),
          server: o.median(f.cpu.server),
          qemu: o.median(f.cpu.qemu),
        };
      }
      out.push({
        memMiB,
        dumpThenReboot: dtr,
        earlyReboot: er,
        throughputRatio: er.medianMiBps / dtr.medianMiBps,
      });
    } finally {
      for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
      rmSync(ram, { force: true });
    }
  }
  return out;
}

const cpuCell = (f: ModeFigures) =>
  `${f.medianCpu.dumpd.toFixed(2)} / ${f.medianCpu.server.toFixed(2)} / ${f.medianCpu.qemu.toFixed(2)}`;

/** The table BENCHMARKING.md quotes. */
export function earlyRebootTable(figs: SizeFigures[], rounds: number): string {
  const rows = [
    `early reboot against dump-then-reboot, median of ${rounds} rounds each:`,
    '| guest RAM | mode | downtime (panic → running) | panic → dump complete | dump throughput | early / dump-then-reboot | CPU s per dump (dumpd / server / QEMU) |',
    '|---|---|---|---|---|---|---|',
  ];
  for (const f of figs) {
    rows.push(
      `| ${f.memMiB} MiB | dump-then-reboot | ${f.dumpThenReboot.medianDowntimeMs} ms | ${f.dumpThenReboot.medianPanicToCompleteMs} ms | ${f.dumpThenReboot.medianMiBps.toFixed(0)} MiB/s | | ${cpuCell(f.dumpThenReboot)} |`,
    );
    rows.push(
      `| ${f.memMiB} MiB | early-reboot${f.earlyReboot.fallback ? ' (fell back!)' : ''} | ${f.earlyReboot.medianDowntimeMs} ms | ${f.earlyReboot.medianPanicToCompleteMs} ms | ${f.earlyReboot.medianMiBps.toFixed(0)} MiB/s | ${f.throughputRatio.toFixed(2)}× (goal ≥ 0.80) | ${cpuCell(f.earlyReboot)} |`,
    );
  }
  return `${rows.join('\n')}\n`;
}
