// The window the fence leaves (docs/cluster.md, "What the fence cannot stop"): each
// write to a shared file is checked against the fence immediately before its
// syscall; a freeze between the check and the syscall's return still lets that one
// write reach the file. This measures the window from the check to the syscall's
// return (the addon's timing of a fence slot) under random 4 KiB writes through
// the sparse-file backend, page cache and O_DIRECT, and how often a SIGSTOP lands
// in it: a child process writes; the parent freezes it `--stops` times for 300 ms
// at random moments; a window of 268 ms or more is a write checked before a freeze
// whose syscall returned after it.
//
//   npm run bench:fence -- [--seconds 5] [--stops 200] [--depth 8] [--dir /var/tmp]

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { loadNative } from '../agent/native.js';
import { type CacheMode, SparseFileBackend } from '../agent/sparse-file.js';
import { Fence } from '../cluster/fence.js';
import type { IoRequest } from '../nbd/backend.js';

const FILE_SIZE = 256 * 1024 * 1024;
const BLOCK = 4096;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Result {
  writes: number;
  seconds: number;
  window: number[];
  windowNs: number;
  windowMaxNs: number;
  entry: number[];
  entryNs: number;
  entryMaxNs: number;
}

/** Writes random blocks through a fenced backend until `stop()`; the slot's timings. */
async function writeLoad(
  dir: string,
  cache: CacheMode,
  depth: number,
  stop: () => boolean,
  onSlot: (slot: number) => void = () => {},
): Promise<Result> {
  const native = loadNative();
  const fence = new Fence(
    { leaseValidUntil: () => performance.now() + 3_600_000, canServe: () => true },
    { marginMs: 0, holdMs: 1000, log: () => {} },
  );
  const file = path.join(dir, `fence-${cache}-${process.pid}.img`);
  const b = await SparseFileBackend.open(file, { size: FILE_SIZE, cache, fence, sharedLock: true });
  native.fenceTiming(fence.slot, true);
  onSlot(fence.slot);
  let writes = 0;
  const one = (buf: Buffer): Promise<number> =>
    new Promise((done) => {
      const req: IoRequest = {
        offset: Math.floor(Math.random() * (FILE_SIZE / BLOCK)) * BLOCK,
        length: BLOCK,
        buf,
        bufOffset: 0,
        done,
      };
      b.write(req, false);
    });
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: depth }, async () => {
      const buf = Buffer.alloc(BLOCK, 0x5a);
      while (!stop()) {
        const e = await one(buf);
        if (e !== 0) throw new Error(`write failed: errno ${e}`);
        writes++;
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const st = native.fenceStats(fence.slot);
  await b.close();
  rmSync(file, { force: true });
  fence.close();
  return { writes, seconds, ...st };
}

/** Windows of 2^LONG ns (268 ms) or more: only a freeze (300 ms) makes them. */
const LONG = 28;
const FREEZE_MS = 300;
const long = (window: number[]) => window.slice(LONG).reduce((a, b) => a + b, 0);

/** The smallest bucket bound below which `q` of the windows fall (log2 buckets). */
function quantile(window: number[], q: number): number {
  const total = window.reduce((a, b) => a + b, 0);
  let seen = 0;
  for (let b = 0; b < window.length; b++) {
    seen += window[b]!;
    if (seen >= q * total) return 2 ** (b + 1);
  }
  return Number.POSITIVE_INFINITY;
}

const us = (ns: number) =>
  ns < 1000 ? `${ns} ns` : `${(ns / 1000).toFixed(ns < 10_000 ? 1 : 0)} µs`;

function report(label: string, r: Result, log: (m: string) => void): void {
  const dist = (h: number[], max: number, sum: number) =>
    `p50 < ${us(quantile(h, 0.5))}, p99 < ${us(quantile(h, 0.99))}, ` +
    `p99.9 < ${us(quantile(h, 0.999))}, max ${us(max)}; ` +
    `writes inside on average ${(sum / (r.seconds * 1e9)).toFixed(6)}`;
  log(`${label}: ${r.writes} writes in ${r.seconds.toFixed(1)} s`);
  log(`  check to syscall return: ${dist(r.window, r.windowMaxNs, r.windowNs)}`);
  log(`  check to syscall entry:  ${dist(r.entry, r.entryMaxNs, r.entryNs)}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      seconds: { type: 'string', default: '5' },
      stops: { type: 'string', default: '200' },
      depth: { type: 'string', default: '8' },
      dir: { type: 'string', default: '/var/tmp' },
      child: { type: 'string' },
    },
  });
  const seconds = Number(values.seconds);
  const depth = Number(values.depth);
  if (values.child) {
    // Child: write until the parent says stop; answer how many long windows so far.
    const native = loadNative();
    let slot = -1;
    let stopping = false;
    process.on('message', (m: string) => {
      if (m === 'stop') stopping = true;
      else {
        const st = native.fenceStats(slot);
        process.send!([long(st.window), long(st.entry)]);
      }
    });
    const r = await writeLoad(
      values.dir!,
      values.child as CacheMode,
      depth,
      () => stopping,
      (s) => {
        slot = s;
        process.send!('ready');
      },
    );
    process.send!(r);
    process.disconnect();
    return;
  }
  const log = (m: string) => console.log(m);
  const dir = mkdtempSync(path.join(values.dir!, 'ballast-fence-'));
  try {
    for (const cache of ['writeback', 'none'] as const) {
      const end = performance.now() + seconds * 1000;
      const r = await writeLoad(dir, cache, depth, () => performance.now() >= end);
      report(`${cache}, depth ${depth}`, r, log);
    }
    const stops = Number(values.stops);
    for (const cache of ['writeback', 'none'] as const) {
      const child = spawn(
        process.execPath,
        [process.argv[1]!, '--child', cache, '--depth', String(depth), '--dir', dir],
        { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] },
      );
      const replies: unknown[] = [];
      let wake: (() => void) | undefined;
      child.on('message', (m) => {
        replies.push(m);
        wake?.();
      });
      const next = async (): Promise<unknown> => {
        while (replies.length === 0) await new Promise<void>((r) => (wake = r));
        return replies.shift();
      };
      await next(); // ready: writing
      let landed = 0;
      let caught = 0;
      let beforeEntry = 0;
      let caughtBefore = 0;
      for (let i = 0; i < stops; i++) {
        await sleep(10 + Math.random() * 40);
        child.kill('SIGSTOP');
        await sleep(FREEZE_MS);
        child.kill('SIGCONT');
        await sleep(20); // the caught writes return
        child.send('ask');
        const [n, e] = (await next()) as [number, number];
        if (n > caught) landed++;
        if (e > caughtBefore) beforeEntry++;
        caught = n;
        caughtBefore = e;
      }
      child.send('stop');
      const r = (await next()) as Result;
      report(`${cache}, depth ${depth}, with ${stops} freezes`, r, log);
      log(
        `  freezes inside a check-to-return window: ${landed} of ${stops} (writes: ${caught}); ` +
          `between a check and its syscall's entry: ${beforeEntry} (writes: ${caughtBefore})`,
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
