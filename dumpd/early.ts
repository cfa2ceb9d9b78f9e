// Early reboot: a panicked guest runs again as soon as a background snapshot of its
// memory has fixed its point in time, while the snapshot streams onto its dump device.
//
//   probe     QEMU offers `background-snapshot`, no migration is running, and QEMU
//             accepts the capability (it checks userfaultfd write-protect on the host
//             and every RAM block of the guest, and the other capabilities)
//   describe  `info registers -a` and `info mtree -f`, while the guest is still
//             stopped at the panic: the CPU state and the guest-physical map, which the
//             stream does not carry in a form we read (migration.ts)
//   reserve   catalog entry `streaming` (format `migration`), the header written first
//   snapshot  `cont` + `stop` (QEMU 7.2 aborts on guest-panicked -> paused, which a
//             snapshot started from guest-panicked asks for; from paused it is fine),
//             then `migrate` to a helper that copies the stream into dumpd's FIFO
//             (snapshotTarget)
//   reboot    at RESUME (QEMU resumes the guest once RAM is write-protected: the
//             snapshot's instant is fixed) `system_reset`: the guest runs again
//   stream    the FIFO into the reservation, paced to `streamMiBps` when set; QEMU
//             copies out each page just before the rebooted guest first writes it
//   settle    end of stream and `completed`: entry `complete` with its CRC-32, or
//             `failed`; background-snapshot is turned off again
//
// Nothing is staged on the host's disk. When the probe, the capability or the start of
// the snapshot fails, the dump is taken the old way (dump-then-reboot, job.ts) and the
// catalog entry notes why. A failure after the reboot fails the dump, never the guest:
// the snapshot then drains into /dev/null, never cancelled.

import { constants as fsc, mkdirSync, openSync, rmSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { failpointHold } from '../agent/failpoints.js';
import type { NbdClientOptions } from '../nbd/client.js';
import { type DumpEntry, DumpError, type DumpFormat, REASON_MAX } from './catalog.js';
import { DumpDevice, type DumpWriter } from './device.js';
import { codeOf, type DumpResult, growPipe, mkfifo, runDump } from './job.js';
import {
  encodeSnapshotHeader,
  parseFlatView,
  parseRegisters,
  type SnapshotMeta,
} from './migration.js';
import type { QmpClient } from './qmp.js';

export interface EarlyRebootOptions {
  guest: string;
  qmp: QmpClient;
  uri: string;
  nbd?: NbdClientOptions;
  /** The format of a fallback dump (dump-then-reboot). */
  format: DumpFormat;
  keep: number;
  runDir: string;
  timeoutMs: number;
  /** When the guest panicked (or the dump was asked for), ms since the epoch. */
  panicAt: number;
  /** Cap on the stream, MiB/s (0: none). */
  streamMiBps?: number;
  /** Why the dump was taken (panic, request), for the log. */
  reason?: string;
  onProgress?: (bytes: number) => void;
  onStart?: (entry: DumpEntry) => void;
  /** The guest runs again (ms since the epoch). */
  onRunning?: (at: number) => void;
  log?: (line: string) => void;
}

const T = { timeoutMs: 30_000 };
const LIVE = new Set(['setup', 'active', 'pre-switchover', 'device', 'cancelling', 'wait-unplug']);

async function hmp(qmp: QmpClient, cmd: string): Promise<string> {
  return String(await qmp.execute('human-monitor-command', { 'command-line': cmd }, T));
}

async function setSnapshotCap(qmp: QmpClient, on: boolean): Promise<void> {
  await qmp.execute(
    'migrate-set-capabilities',
    { capabilities: [{ capability: 'background-snapshot', state: on }] },
    T,
  );
}

/**
 * QEMU caps a migration, the snapshot's stream included, at `max-bandwidth` (128 MiB/s
 * by default): lifted for the snapshot, to this value, and restored after. A dumpd that
 * died mid-stream recognises the value (daemon.ts) and sets QEMU's default again.
 */
export const SNAPSHOT_BANDWIDTH = 2 ** 50;
export const QEMU_DEFAULT_BANDWIDTH = 128 * 1024 * 1024;

async function maxBandwidth(qmp: QmpClient): Promise<number | undefined> {
  const p = await qmp
    .execute<{ 'max-bandwidth'?: number }>('query-migrate-parameters', undefined, T)
    .catch(() => ({}) as { 'max-bandwidth'?: number });
  return p['max-bandwidth'];
}

export async function setMaxBandwidth(qmp: QmpClient, bytesPerSecond: number): Promise<void> {
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': bytesPerSecond }, T);
}

/** Why QEMU refused, without the command's name in front. */
const why = (e: unknown) => String((e as Error).message ?? e).replace(/^[a-z-]+: /, '');

/**
 * Checks that a background snapshot can be taken and describes the guest; null with a
 * reason when not (nothing of the guest was touched).
 */
async function probe(
  o: EarlyRebootOptions,
): Promise<{ meta: SnapshotMeta; status: string } | { fallback: string }> {
  const caps = await o.qmp.execute<{ capability: string; state: boolean }[]>(
    'query-migrate-capabilities',
    undefined,
    T,
  );
  if (!caps.some((c) => c.capability === 'background-snapshot'))
    return { fallback: 'this QEMU has no background-snapshot capability' };
  const mig = await o.qmp.execute<{ status?: string }>('query-migrate', undefined, T);
  if (mig.status && LIVE.has(mig.status))
    return { fallback: `a migration of the guest is ${mig.status}` };
  const { status } = await o.qmp.execute<{ status: string }>('query-status', undefined, T);
  if (!['guest-panicked', 'paused', 'running', 'prelaunch'].includes(status))
    return { fallback: `the guest is ${status}` };
  try {
    await setSnapshotCap(o.qmp, true);
  } catch (e) {
    return { fallback: `QEMU refused background-snapshot: ${why(e)}` };
  }
  try {
    const cpus = parseRegisters(await hmp(o.qmp, 'info registers -a'));
    const memory = parseFlatView(await hmp(o.qmp, 'info mtree -f'));
    const v = await o.qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>(
      'query-version',
      undefined,
      T,
    );
    if (!memory.length) throw new Error('no RAM in the flat view of the system memory');
    if (!cpus.length) throw new Error('no CPU registers');
    return {
      status,
      meta: {
        guest: o.guest,
        qemu: `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`,
        panicAt: o.panicAt,
        pageSize: 4096,
        memory,
        cpus,
      },
    };
  } catch (e) {
    await setSnapshotCap(o.qmp, false).catch(() => {});
    return { fallback: `cannot describe the guest: ${why(e)}` };
  }
}

/** Takes the dump the old way, noting why in the result and the catalog. */
async function fallback(o: EarlyRebootOptions, reason: string): Promise<DumpResult> {
  o.log?.(`guest ${o.guest}: early reboot not possible (${reason}); dump-then-reboot instead`);
  const r = await runDump({
    guest: o.guest,
    qmp: o.qmp,
    uri: o.uri,
    ...(o.nbd ? { nbd: o.nbd } : {}),
    format: o.format,
    keep: o.keep,
    after: 'reboot',
    runDir: o.runDir,
    timeoutMs: o.timeoutMs,
    panicAt: o.panicAt,
    note: `dump-then-reboot: ${reason}`.slice(0, REASON_MAX),
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.onStart ? { onStart: o.onStart } : {}),
  });
  r.fallback = reason;
  if (r.runningAt) o.onRunning?.(r.runningAt);
  return r;
}

/** Resolves at RESUME; rejects when the migration fails first (polled: events are optional). */
async function pointInTime(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const resumed = qmp.waitEvent('RESUME', timeoutMs);
  resumed.catch(() => {});
  let done = false;
  const failed = (async () => {
    while (!done) {
      await new Promise((r) => setTimeout(r, 50));
      if (done) return;
      const m = await qmp
        .execute<{ status?: string; 'error-desc'?: string }>('query-migrate', undefined, T)
        .catch(() => ({}) as { status?: string; 'error-desc'?: string });
      if (m.status === 'failed' || m.status === 'cancelled')
        throw new DumpError(
          'DUMP_SNAPSHOT_FAILED',
          `the background snapshot ${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''}`,
        );
    }
  })();
  try {
    await Promise.race([resumed, failed]);
  } finally {
    done = true;
    failed.catch(() => {});
  }
}

/** Waits for QEMU's verdict on the migration once the stream has ended. */
async function migrationResult(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const m = await qmp.execute<{ status?: string; 'error-desc'?: string }>(
      'query-migrate',
      undefined,
      T,
    );
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled')
      throw new DumpError(
        'DUMP_QEMU_FAILED',
        `QEMU's background snapshot ${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''}`,
      );
    if (performance.now() > deadline)
      throw new DumpError('DUMP_TIMEOUT', `the snapshot stream ended but QEMU says ${m.status}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Reads the FIFO into the writer until the end of the stream, holding it while the
 * writer has too much in flight or the pace is ahead of `mibps`. Each read lands in the
 * writer's current piece (onread, as job.ts reads its FIFO). Returns the reader (to
 * destroy when the dump fails: the helper then drains the rest) and the end of the stream.
 */
function pump(
  fd: number,
  w: DumpWriter,
  o: { mibps: number; timeoutMs: number; onBytes: (n: number) => void },
): { reader: net.Socket; done: Promise<void> } {
  let holds = 0;
  let streamed = 0;
  const t0 = performance.now();
  const rate = o.mibps > 0 ? o.mibps * 1024 * 1024 : 0;
  let fail: (e: unknown) => void = () => {};
  const hold = () => {
    if (holds++ === 0) reader.pause();
    return () => {
      if (--holds === 0) reader.resume();
    };
  };
  // `onread` is in Node's documentation of net.Socket, not in its typings.
  const opts: net.SocketConstructorOpts & { onread: net.OnReadOpts } = {
    fd,
    readable: true,
    writable: false,
    onread: {
      buffer: () => w.window(),
      callback: (n: number): boolean => {
        let more: boolean;
        try {
          more = w.filled(n);
        } catch (e) {
          fail(e);
          return false;
        }
        streamed += n;
        o.onBytes(n);
        if (!more) {
          const release = hold();
          w.ready().then(release, (e: unknown) => fail(e));
        }
        if (rate) {
          const ahead = streamed / rate - (performance.now() - t0) / 1000;
          if (ahead > 0.005) setTimeout(hold(), ahead * 1000);
        }
        return holds === 0;
      },
    },
  };
  const reader = new net.Socket(opts);
  const done = new Promise<void>((resolve, reject) => {
    const limit = setTimeout(
      () => fail(new DumpError('DUMP_TIMEOUT', `the dump did not finish within ${o.timeoutMs} ms`)),
      o.timeoutMs,
    );
    limit.unref();
    fail = (e: unknown) => {
      clearTimeout(limit);
      reader.destroy();
      reject(e);
    };
    reader.on('end', () => {
      clearTimeout(limit);
      resolve();
    });
    reader.on('error', (e) => fail(e));
  });
  return { reader, done };
}

/** A path for sh -c. */
const shq = (p: string) => `'${p.replace(/'/g, `'\\''`)}'`;

/**
 * The migration's target: a shell QEMU starts (`exec:`) that copies the stream into
 * dumpd's FIFO and, should dumpd stop reading (a failure, a crash), reads the rest into
 * /dev/null. So the snapshot always runs to its end: QEMU 7.2 deadlocks when a background
 * snapshot's stream breaks while the rebooted guest waits for a page to be copied out
 * with the big lock held (a DMA of the firmware loading the kernel, for one) — the
 * migration thread waits for that lock to clean up, and nothing copies the page.
 * For the same reason dumpd never cancels a snapshot once the guest runs.
 */
export function snapshotTarget(fifo: string): string {
  return `exec:cat > ${shq(fifo)} 2>/dev/null; exec cat > /dev/null`;
}

export async function runEarlyReboot(o: EarlyRebootOptions): Promise<DumpResult> {
  const t0 = Date.now();
  const p = await probe(o);
  if ('fallback' in p) return fallback(o, p.fallback);

  let device: DumpDevice | null = null;
  let writer: DumpWriter | null = null;
  let entry: DumpEntry | null = null;
  let fifo: string | null = null;
  let reader: net.Socket | null = null;
  let bytes = 0;
  let runningAt = 0;
  let failure: unknown = null;
  let afterError: { code: string; message: string } | undefined;
  let bandwidth: number | undefined;
  const capOff = async () => {
    if (bandwidth !== undefined) {
      const b = bandwidth;
      bandwidth = undefined;
      await setMaxBandwidth(o.qmp, b).catch(() => {});
    }
    await setSnapshotCap(o.qmp, false).catch(() => {});
  };
  try {
    try {
      device = await DumpDevice.open(o.uri, o.nbd);
      await device.recover(Date.now(), o.guest);
      writer = await device.begin({
        guest: o.guest,
        format: 'migration',
        keep: o.keep,
        state: 'streaming',
        panicAt: o.panicAt,
      });
    } catch (e) {
      // No dump device: the guest still reboots at once (nothing to wait for).
      await capOff();
      throw e;
    }
    o.onStart?.(writer.entry);
    writer.append(encodeSnapshotHeader(p.meta));
    bytes = writer.length;

    mkdirSync(o.runDir, { recursive: true, mode: 0o700 });
    fifo = path.join(o.runDir, `${o.guest}.${writer.entry.id}.${process.pid}.mig`);
    rmSync(fifo, { force: true });
    await mkfifo(fifo);
    // Non-blocking, so opening does not wait for a writer; the helper's open then finds
    // a reader. Read from the first byte on: QEMU's reset of the guest writes guest RAM
    // (ROM blobs) from its main thread, which then waits for the snapshot to copy those
    // pages out, which waits for room in the FIFO.
    const fd = openSync(fifo, fsc.O_RDONLY | fsc.O_NONBLOCK);
    growPipe(fd);
    const w = writer;
    const pumped = pump(fd, w, {
      mibps: o.streamMiBps ?? 0,
      timeoutMs: Math.max(1000, o.timeoutMs - (Date.now() - t0)),
      onBytes: (n) => {
        bytes += n;
        o.onProgress?.(bytes);
      },
    });
    reader = pumped.reader;
    const streamed = pumped.done;
    streamed.catch(() => {});

    // Out of guest-panicked into paused (see the top), at once: the panicked kernel
    // spins with interrupts off for the microseconds between the two.
    try {
      if (p.status === 'running') await o.qmp.execute('stop', undefined, T);
      else
        await Promise.all([
          o.qmp.execute('cont', undefined, T),
          o.qmp.execute('stop', undefined, T),
        ]);
      const before = await maxBandwidth(o.qmp);
      if (before !== undefined && before !== SNAPSHOT_BANDWIDTH) {
        await setMaxBandwidth(o.qmp, SNAPSHOT_BANDWIDTH);
        bandwidth = before;
      }
      const fixed = pointInTime(o.qmp, 30_000);
      fixed.catch(() => {});
      await o.qmp.execute('migrate', { uri: snapshotTarget(fifo) }, T);
      await fixed;
    } catch (e) {
      // Nothing streamed and the guest is stopped (nothing waits for a page): cancel,
      // forget the entry, dump the old way.
      await o.qmp.execute('migrate_cancel', undefined, T).catch(() => {});
      reader?.destroy();
      await waitIdle(o.qmp, 30_000);
      await capOff();
      const id = writer.entry.id;
      writer = null;
      await device.remove(id).catch(() => {});
      await device.close().catch(() => {});
      device = null;
      return fallback(o, why(e));
    }

    // Said only once it is so: a fallback before this point is logged without a stream
    // that never was.
    o.log?.(
      `guest ${o.guest}: early reboot${o.reason ? ` (${o.reason})` : ''}: snapshot streaming to ${o.uri}`,
    );
    // The snapshot's instant is fixed: the guest boots again while the stream goes on.
    try {
      await o.qmp.execute('system_reset', undefined, T);
      const st = await o.qmp.execute<{ running: boolean }>('query-status', undefined, T);
      if (!st.running) await o.qmp.execute('cont', undefined, T);
      runningAt = Date.now();
      o.onRunning?.(runningAt);
    } catch (e) {
      afterError = { code: codeOf(e), message: (e as Error).message };
    }
    if (runningAt) await device.annotate(writer.entry.id, { runningAt }).catch(() => {});

    await streamed;
    await migrationResult(o.qmp, 30_000);
    await failpointHold('early-reboot-hold', path.join(o.runDir, `${o.guest}.hold`));
    entry = await w.finish(Date.now());
  } catch (e) {
    failure = e;
    // The helper drains the rest of the snapshot (see snapshotTarget); no cancel.
    reader?.destroy();
    if (writer) entry = await writer.fail(`${codeOf(e)}: ${(e as Error).message ?? e}`);
  } finally {
    reader?.destroy();
    if (fifo) rmSync(fifo, { force: true });
    // Off again, or the guest's next live migration would be a snapshot (once the
    // snapshot has ended: drained, after a failure).
    await waitIdle(o.qmp, failure ? o.timeoutMs : 30_000);
    await capOff();
    await device?.close().catch(() => {});
  }
  const r: DumpResult = {
    guest: o.guest,
    ok: failure === null,
    entry,
    bytes,
    durationMs: Date.now() - t0,
    after: 'reboot',
    mode: 'early-reboot',
    panicAt: o.panicAt,
    settledAt: Date.now(),
    ...(runningAt ? { runningAt } : {}),
    ...(afterError ? { afterError } : {}),
  };
  if (failure !== null)
    r.error = { code: codeOf(failure), message: (failure as Error).message ?? String(failure) };
  return r;
}

/** Waits (briefly) until no migration is live, so that capabilities may change. */
async function waitIdle(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const m = await qmp
      .execute<{ status?: string }>('query-migrate', undefined, T)
      .catch(() => ({ status: 'none' }));
    if (!m.status || !LIVE.has(m.status)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}
