// Dump throughput: dumpd's path (dump-guest-memory → FIFO → NBD → Ballast → sparse
// file) against QEMU's dump-guest-memory straight into a local file, for the same guest
// and format, in one run. The guest is QEMU with -S and its RAM backed by a file of
// random bytes (memory-backend-file, private), so the dump carries real data without
// booting anything. Also reported: dump start → guest running again (after: reboot).
//
// Every round dumps into space that holds no data (the device's dump is removed after
// each round, its blocks trimmed), as the local reference always writes a new file, and
// each measurement starts after the same pause (--settle). The local reference is also
// timed with an fdatasync after it: the device path's dump is durable when it completes.
//
// The device is served the way the agent serves dump devices: `--cache none`, aligned
// writes with O_DIRECT (--cache writeback to compare).
//
// Then early reboot against dump-then-reboot (early-reboot.ts): service downtime and
// dump throughput for guests of --sizes MiB.
//
//   npm run bench:dump -- [--mem-mib 1024] [--rounds 3] [--format elf] [--dir DIR]
//                         [--settle 3] [--cache none] [--suite all|throughput|early-reboot|qemu-alone]
//                         [--sizes 512,1024]
//
// Results go to stdout, bench-results/dump.json and bench-results/early-reboot.json.

import type { ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  fdatasyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { DumpFormat } from '../dumpd/catalog.js';
import { DumpDevice } from '../dumpd/device.js';
import { runDump } from '../dumpd/job.js';
import { earlyRebootBench, earlyRebootTable, startDumpRig } from './early-reboot.js';
import { snapshotRateBench, snapshotRateTable } from './snapshot-rate.js';

const log = (m: string) => process.stderr.write(`[bench:dump] ${m}\n`);

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? process.argv[i + 1] : undefined;
  return v ?? def;
}

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

async function waitFor(p: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (existsSync(p)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = net.connect(p);
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      });
      if (ok) return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${p} did not appear`);
}

/** user + system CPU seconds of a process so far (Linux /proc). */
function procCpu(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return (Number(rest[11]) + Number(rest[12])) / 100;
  } catch {
    return 0;
  }
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
};

async function main(): Promise<void> {
  if (process.argv.includes('--help')) {
    process.stdout.write(
      'npm run bench:dump -- [--mem-mib 1024] [--rounds 3] [--format elf|kdump-zlib|...] [--dir DIR] [--settle SECONDS] [--cache none|writeback] [--suite all|throughput|early-reboot|qemu-alone] [--sizes 512,1024]\n',
    );
    return;
  }
  const memMiB = Number(arg('mem-mib', '1024'));
  const rounds = Number(arg('rounds', '3'));
  const format = arg('format', 'elf') as DumpFormat;
  const settle = Number(arg('settle', '3'));
  // As the agent serves dump devices (agent/devices.ts, cacheFor).
  const cache = arg('cache', 'none');
  const base = arg('dir', os.tmpdir());
  const dir = mkdtempSync(path.join(base, 'ballast-bench-dump-'));
  const children: ChildProcess[] = [];
  const cleanup = () => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  const suite = arg('suite', 'all');
  try {
    if (suite === 'all' || suite === 'throughput') await throughput();
    if (suite === 'qemu-alone') {
      const rates = await snapshotRateBench({
        sizesMiB: arg('sizes', '512,1024').split(',').map(Number),
        rounds,
        dir,
        log,
        waitFor,
        median,
        procCpu,
      });
      process.stdout.write(snapshotRateTable(rates, rounds, median));
    }
    if (suite === 'all' || suite === 'early-reboot') {
      const sizesMiB = arg('sizes', '512,1024').split(',').map(Number);
      const figs = await earlyRebootBench({
        sizesMiB,
        rounds,
        format,
        settle,
        cache,
        dir,
        root: ROOT,
        log,
        waitFor,
        median,
        procCpu,
      });
      process.stdout.write(
        `${earlyRebootTable(figs, rounds)}  load average during the run: ${os
          .loadavg()
          .map((l) => l.toFixed(1))
          .join(' ')} (on ${os.cpus().length} CPUs)\n`,
      );
      mkdirSync(path.join(ROOT, 'bench-results'), { recursive: true });
      writeFileSync(
        path.join(ROOT, 'bench-results', 'early-reboot.json'),
        `${JSON.stringify({ format, rounds, cache, sizes: figs, loadAverage: os.loadavg() }, null, 2)}\n`,
      );
    }
  } finally {
    cleanup();
  }

  async function throughput(): Promise<void> {
    log(`guest RAM ${memMiB} MiB of random bytes, format ${format}, ${rounds} rounds, in ${dir}`);
    const ram = path.join(dir, 'ram.bin');
    const { srv, qemu, qmp, uri } = await startDumpRig({
      root: ROOT,
      image: path.join(dir, 'dump.img'),
      nbdSock: path.join(dir, 'nbd.sock'),
      qmpSock: path.join(dir, 'qmp.sock'),
      ram,
      memMiB,
      share: false,
      cache,
      children,
      waitFor,
    });

    const local: number[] = [];
    const localSynced: number[] = [];
    const device: number[] = [];
    const recovery: number[] = [];
    const cpuDumpd: number[] = [];
    const cpuServer: number[] = [];
    const cpuQemu: number[] = [];
    let bytes = 0;
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? ['local', 'device'] : ['device', 'local'];
      for (const which of order) {
        // The same rest before every measurement: on a VM whose host takes freed memory
        // back (free page reporting), the page cache a dump fills costs more after a
        // pause than right after the previous dump freed its own, whichever path ran.
        await new Promise((r) => setTimeout(r, settle * 1000));
        if (which === 'local') {
          const out = path.join(dir, 'local.dump');
          const t0 = process.hrtime.bigint();
          await qmp.execute('dump-guest-memory', {
            paging: false,
            protocol: `file:${out}`,
            format,
          });
          const s = Number(process.hrtime.bigint() - t0) / 1e9;
          // What making it durable would add (the device path flushes before `complete`).
          const fd = openSync(out, 'r+');
          fdatasyncSync(fd);
          closeSync(fd);
          const synced = Number(process.hrtime.bigint() - t0) / 1e9;
          bytes = statSync(out).size;
          local.push(bytes / s / 2 ** 20);
          localSynced.push(bytes / synced / 2 ** 20);
          rmSync(out);
          log(
            `round ${r + 1} local file: ${(bytes / 2 ** 20).toFixed(0)} MiB in ${s.toFixed(2)} s (${synced.toFixed(2)} s with fdatasync)`,
          );
        } else {
          const t0 = process.hrtime.bigint();
          const cpu0 = process.cpuUsage();
          const srv0 = procCpu(srv.pid);
          const qemu0 = procCpu(qemu.pid);
          const res = await runDump({
            guest: 'bench',
            qmp,
            uri,
            format,
            keep: 1,
            after: 'reboot',
            runDir: path.join(dir, 'run'),
            timeoutMs: 600_000,
          });
          const total = Number(process.hrtime.bigint() - t0) / 1e9;
          const cpu = process.cpuUsage(cpu0);
          cpuDumpd.push((cpu.user + cpu.system) / 1e6);
          cpuServer.push(procCpu(srv.pid) - srv0);
          cpuQemu.push(procCpu(qemu.pid) - qemu0);
          if (!res.ok) throw new Error(`dump failed: ${res.error?.code} ${res.error?.message}`);
          const s = res.durationMs / 1000;
          device.push(res.bytes / s / 2 ** 20);
          recovery.push(total);
          // Back to the paused state for the next round.
          await qmp.execute('stop');
          // Each round dumps into unallocated space, as the local file is always a new
          // file: the dump is removed again (its blocks trimmed).
          if (res.entry) {
            const dev = await DumpDevice.open(uri);
            await dev.remove(res.entry.id);
            await dev.close();
          }
          log(
            `round ${r + 1} device: ${(res.bytes / 2 ** 20).toFixed(0)} MiB in ${s.toFixed(2)} s; running again after ${total.toFixed(2)} s`,
          );
        }
      }
    }
    qmp.close();
    const result = {
      memMiB,
      format,
      rounds,
      dumpBytes: bytes,
      settleSeconds: settle,
      cache,
      localMiBps: local,
      localSyncedMiBps: localSynced,
      deviceMiBps: device,
      medianLocalMiBps: median(local),
      medianLocalSyncedMiBps: median(localSynced),
      medianDeviceMiBps: median(device),
      ratio: median(device) / median(local),
      ratioToSynced: median(device) / median(localSynced),
      medianDumpToRunningSeconds: median(recovery),
      cpuSecondsPerDevicedump: {
        dumpd: median(cpuDumpd),
        server: median(cpuServer),
        qemu: median(cpuQemu),
      },
      loadAverage: os.loadavg(),
    };
    process.stdout.write(
      [
        `dump of ${memMiB} MiB guest (${format}), median of ${rounds}:`,
        `  local file (dump-guest-memory file:)     ${result.medianLocalMiBps.toFixed(0)} MiB/s`,
        `  dump device (FIFO -> NBD -> Ballast)     ${result.medianDeviceMiBps.toFixed(0)} MiB/s (cache ${cache})`,
        `  local file, then fdatasync               ${result.medianLocalSyncedMiBps.toFixed(0)} MiB/s`,
        `  ratio device / local                     ${result.ratio.toFixed(2)} (target >= 0.80)`,
        `  ratio device / local with fdatasync      ${result.ratioToSynced.toFixed(2)}`,
        `  dump start -> guest running (reboot)     ${result.medianDumpToRunningSeconds.toFixed(2)} s`,
        `  CPU per device dump: dumpd ${median(cpuDumpd).toFixed(2)} s, server ${median(cpuServer).toFixed(2)} s, QEMU ${median(cpuQemu).toFixed(2)} s`,
        `  load average during the run: ${os
          .loadavg()
          .map((l) => l.toFixed(1))
          .join(' ')} (on ${os.cpus().length} CPUs)`,
        '',
      ].join('\n'),
    );
    mkdirSync(path.join(ROOT, 'bench-results'), { recursive: true });
    writeFileSync(
      path.join(ROOT, 'bench-results', 'dump.json'),
      `${JSON.stringify(result, null, 2)}\n`,
    );
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    rmSync(ram, { force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`[bench:dump] ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
