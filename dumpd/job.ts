// One dump of one guest, start to finish:
//
//   check    query-dump-guest-memory-capability has the format; no dump active
//   reserve  open the device, recover interrupted dumps, catalog entry `writing`
//   dump     mkfifo; open its read end; dump-guest-memory detach=true file:FIFO (a
//            libvirt guest: virsh dump --memory-only FIFO, see libvirt.ts);
//            stream what QEMU writes into the reservation as it arrives
//   settle   EOF on the FIFO and DUMP_COMPLETED: entry `complete` with its CRC-32,
//            or `failed` with the reason (QEMU's error, no space, device lost)
//   after    reboot (system_reset + cont) | pause (stop) | poweroff (quit) | none
//
// Nothing of the dump touches the host's disk: the FIFO holds at most a pipe buffer.
// A failure before `settle` still marks the entry failed and still applies `after`,
// so a panicked guest is never left hanging because its dump device is unreachable.

import { execFile } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  closeSync,
  constants as fsc,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
} from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { type BallastNative, errnoName, loadNative } from '../agent/native.js';
import type { NbdClientOptions } from '../nbd/client.js';
import { type DumpEntry, DumpError, type DumpFormat } from './catalog.js';
import type { After } from './config.js';
import { DumpDevice, type DumpWriter } from './device.js';
import { libvirtDump } from './libvirt.js';
import type { QmpClient, QmpEvent } from './qmp.js';

const run = promisify(execFile);

export interface DumpJobOptions {
  guest: string;
  /** QEMU's monitor; or else `libvirt`. */
  qmp?: QmpClient;
  /** A libvirt guest: the dump goes through libvirtd (virsh dump --memory-only). */
  libvirt?: { uri: string; domain: string };
  /** The dump device's NBD URI. */
  uri: string;
  /** NBD client options (TLS credentials). */
  nbd?: NbdClientOptions;
  format: DumpFormat;
  keep: number;
  after: After;
  runDir: string;
  timeoutMs: number;
  /** Called as bytes arrive (total so far). */
  onProgress?: (bytes: number) => void;
  /** QEMU's own view from query-dump, polled about once a second while dumping. */
  onQemuProgress?: (completed: number, total: number) => void;
  /** Called once the entry is reserved (for logs). */
  onStart?: (entry: DumpEntry) => void;
  /** When the guest panicked (or the dump was asked for), ms; recorded in the entry. */
  panicAt?: number;
  /** Recorded in a complete entry (why an early reboot fell back to this path). */
  note?: string;
  /**
   * Who QEMU runs as (libvirt's QEMU is libvirt-qemu:kvm, not root): the FIFO is
   * handed to that user, since QEMU opens it by name.
   */
  fifoOwner?: { uid: number; gid: number };
  /** Applies the after-dump policy instead of QMP (a libvirt guest: through libvirt). */
  applyAfter?: (after: After) => Promise<void>;
}

export interface DumpResult {
  guest: string;
  ok: boolean;
  entry: DumpEntry | null;
  bytes: number;
  durationMs: number;
  after: After;
  /** Set when the dump failed: a stable code and a message. */
  error?: { code: string; message: string };
  /** Set when applying `after` failed. */
  afterError?: { code: string; message: string };
  /** How the dump was taken: the guest stopped for it, or rebooted while it streamed. */
  mode?: 'dump-then-reboot' | 'early-reboot';
  /** Why an early reboot was not possible (dump-then-reboot was used instead). */
  fallback?: string;
  /** When the guest panicked (or the dump was asked for), ms since the epoch. */
  panicAt?: number;
  /**
   * When dumpd found the guest already crashed (it was not watching when it did):
   * then panicAt is unknown (absent), as neither QMP nor libvirt tells when.
   */
  foundAt?: number;
  /** When the guest ran again (after: reboot), ms since the epoch. */
  runningAt?: number;
  /** When the dump was settled, ms since the epoch. */
  settledAt?: number;
}

export function codeOf(e: unknown): string {
  const c = (e as { code?: unknown })?.code;
  return typeof c === 'string' && /^[A-Z][A-Z0-9_]+$/.test(c) ? c : 'DUMP_FAILED';
}

/**
 * The FIFO's capacity, asked of the kernel (F_SETPIPE_SZ) once it is open: with it
 * QEMU keeps writing while dumpd is busy with a piece (the default, 64 KiB, is 1/16
 * of one), and dumpd's reads fill a piece in fewer, larger steps.
 */
const PIPE_SIZE = 1024 * 1024;

function nativeOrNull(): BallastNative | null {
  try {
    return loadNative();
  } catch {
    return null;
  }
}

export async function mkfifo(p: string): Promise<void> {
  const native = nativeOrNull();
  try {
    if (!native) await run('mkfifo', ['-m', '600', p]);
    else {
      const r = native.mkfifo(p, 0o600);
      if (r < 0) throw new Error(errnoName(-r));
    }
  } catch (e) {
    throw new DumpError('DUMP_FIFO', `cannot create the FIFO ${p}: ${(e as Error).message}`, {
      cause: e,
    });
  }
}

/**
 * Grows the pipe behind `fd` to PIPE_SIZE, or to what /proc/sys/fs/pipe-max-size
 * allows without CAP_SYS_RESOURCE; best effort (the default size works, only slower).
 */
export function growPipe(fd: number): void {
  const native = nativeOrNull();
  if (!native || native.setPipeSize(fd, PIPE_SIZE) >= 0) return;
  try {
    const max = Number(readFileSync('/proc/sys/fs/pipe-max-size', 'utf8'));
    if (max > 0 && max < PIPE_SIZE) native.setPipeSize(fd, max);
  } catch {}
}

/** How long one QMP command of the after-dump policy may take. */
const AFTER_TIMEOUT_MS = 30_000;

/** Applies the after-dump policy. */
export async function applyAfter(qmp: QmpClient, after: After): Promise<void> {
  const t = { timeoutMs: AFTER_TIMEOUT_MS };
  switch (after) {
    case 'none':
      return;
    case 'pause': {
      const st = await qmp.execute<{ running: boolean }>('query-status', undefined, t);
      if (st.running) await qmp.execute('stop', undefined, t);
      return;
    }
    case 'poweroff':
      await qmp.execute('quit', undefined, t).catch((e: unknown) => {
        // QEMU may close the socket before answering `quit`.
        if (codeOf(e) !== 'QMP_DISCONNECTED') throw e;
      });
      return;
    case 'reboot': {
      await qmp.execute('system_reset', undefined, t);
      const st = await qmp.execute<{ running: boolean }>('query-status', undefined, t);
      if (!st.running) await qmp.execute('cont', undefined, t);
      return;
    }
  }
}

export async function runDump(o: DumpJobOptions): Promise<DumpResult> {
  const t0 = Date.now();
  let writer: DumpWriter | null = null;
  let device: DumpDevice | null = null;
  let fifo: string | null = null;
  let bytes = 0;
  let failure: unknown = null;
  let entry: DumpEntry | null = null;
  try {
    const t = { timeoutMs: 30_000 };
    const qmp = o.qmp;
    if (qmp) {
      const caps = await qmp.execute<{ formats: string[] }>(
        'query-dump-guest-memory-capability',
        undefined,
        t,
      );
      if (!caps.formats.includes(o.format))
        throw new DumpError(
          'DUMP_FORMAT_UNSUPPORTED',
          `QEMU offers ${caps.formats.join(', ')}, not ${o.format}`,
        );
      const st = await qmp.execute<{ status: string }>('query-dump', undefined, t);
      if (st.status === 'active')
        throw new DumpError('DUMP_BUSY', 'QEMU is already dumping this guest');
    } else if (!o.libvirt) {
      throw new DumpError('DUMP_GUEST_OFFLINE', `guest ${o.guest}: neither QMP nor libvirt`);
    }

    device = await DumpDevice.open(o.uri, o.nbd);
    // Only this guest's: another dumpd may be writing a dump of another guest here.
    await device.recover(Date.now(), o.guest);
    writer = await device.begin({
      guest: o.guest,
      format: o.format,
      keep: o.keep,
      ...(o.panicAt ? { panicAt: o.panicAt } : {}),
    });
    o.onStart?.(writer.entry);

    // Searchable, not readable: a QEMU that is not root reaches its own FIFO by name.
    mkdirSync(o.runDir, { recursive: true, mode: 0o711 });
    chmodSync(o.runDir, 0o711);
    fifo = path.join(o.runDir, `${o.guest}.${writer.entry.id}.${process.pid}.fifo`);
    rmSync(fifo, { force: true });
    await mkfifo(fifo);
    if (o.fifoOwner) chownSync(fifo, o.fifoOwner.uid, o.fifoOwner.gid);
    // Non-blocking, so opening does not wait for a writer; QEMU's open then finds a reader.
    const fd = openSync(fifo, fsc.O_RDONLY | fsc.O_NONBLOCK);
    growPipe(fd);
    const w = writer;
    let fail: (e: unknown) => void = () => {};
    // Each read lands in the writer's current piece (onread), which is written and
    // hashed from there: no copy between the pipe and the NBD socket.
    // `onread` is in Node's documentation of net.Socket, not in its typings.
    const opts: net.SocketConstructorOpts & { onread: net.OnReadOpts } = {
      fd,
      readable: true,
      writable: false,
      onread: {
        buffer: () => w.window(),
        callback: (n: number) => {
          let more: boolean;
          try {
            more = w.filled(n);
          } catch (e) {
            // Closing the read end makes QEMU's next write fail (EPIPE): the dump stops.
            fail(e);
            return false;
          }
          bytes = w.length;
          o.onProgress?.(bytes);
          if (more) return true;
          // Too much in flight: stop reading until the writer catches up.
          w.ready().then(
            () => pipe.resume(),
            (e: unknown) => fail(e),
          );
          return false;
        },
      },
    };
    const pipe = new net.Socket(opts);
    pipe.pause();
    const streamed = new Promise<void>((resolve, reject) => {
      fail = (e) => {
        pipe.destroy();
        reject(e);
      };
      pipe.on('end', () => resolve());
      pipe.on('error', (e) => reject(e));
    });
    streamed.catch(() => {});
    // A QEMU that stops writing without closing the FIFO must not hold the dump forever.
    const limit = setTimeout(
      () =>
        pipe.destroy(
          new DumpError('DUMP_TIMEOUT', `the dump did not finish within ${o.timeoutMs} ms`),
        ),
      o.timeoutMs,
    );
    limit.unref();
    streamed.finally(() => clearTimeout(limit)).catch(() => {});
    if (!qmp) {
      // libvirtd opens the FIFO (as root) and gives QEMU the descriptor; virsh returns
      // once QEMU is done. A failed dump closes the FIFO, which ends the stream too.
      const lv = o.libvirt as { uri: string; domain: string };
      // dumpd holds a write end of its own until virsh returns, so that the reader
      // sees neither an EOF before libvirtd opens the FIFO nor one between its
      // open and QEMU's first write.
      const holder = openSync(fifo, fsc.O_WRONLY | fsc.O_NONBLOCK);
      pipe.resume();
      const done = libvirtDump(lv.uri, lv.domain, fifo, o.format, o.timeoutMs).finally(() =>
        closeSync(holder),
      );
      done.catch(() => {});
      const [s, d] = await Promise.allSettled([streamed, done]);
      if (d.status === 'rejected') throw d.reason;
      if (s.status === 'rejected') throw s.reason;
      entry = await writer.finish(Date.now(), o.note);
    } else {
      const completed = qmp.waitEvent('DUMP_COMPLETED', o.timeoutMs);
      completed.catch(() => {});
      try {
        await qmp.execute(
          'dump-guest-memory',
          {
            paging: false,
            protocol: `file:${fifo}`,
            detach: true,
            format: o.format,
          },
          t,
        );
      } catch (e) {
        pipe.destroy();
        throw e;
      }
      // QEMU holds the FIFO open now; the name is no longer needed.
      rmSync(fifo, { force: true });
      fifo = null;
      pipe.resume();
      const poll = setInterval(() => {
        qmp
          .execute<{ status: string; completed: number; total: number }>('query-dump', undefined, {
            timeoutMs: 5000,
          })
          .then(
            (q) => {
              if (q.status === 'active') o.onQemuProgress?.(q.completed, q.total);
            },
            () => {},
          );
      }, 1000);
      poll.unref();
      streamed.finally(() => clearInterval(poll)).catch(() => {});

      let streamError: unknown = null;
      await streamed.catch((e: unknown) => {
        streamError = e;
      });
      if (streamError) throw streamError;
      const ev: QmpEvent = await completed;
      const result = ev.data.result as { status?: string; completed?: number; total?: number };
      if (ev.data.error || result?.status !== 'completed')
        throw new DumpError(
          'DUMP_QEMU_FAILED',
          `QEMU's dump failed: ${String(ev.data.error ?? result?.status ?? 'unknown')}`,
        );
      entry = await writer.finish(Date.now(), o.note);
    }
  } catch (e) {
    failure = e;
    if (writer) entry = await writer.fail(`${codeOf(e)}: ${(e as Error).message ?? e}`);
    // Let a detached QEMU dump end before touching the guest again.
    if (writer && o.qmp) await waitDumpIdle(o.qmp, 30_000).catch(() => {});
  } finally {
    if (fifo) rmSync(fifo, { force: true });
  }
  const result: DumpResult = {
    guest: o.guest,
    ok: failure === null,
    entry,
    bytes,
    durationMs: Date.now() - t0,
    after: o.after,
    mode: 'dump-then-reboot',
    settledAt: Date.now(),
    ...(o.panicAt ? { panicAt: o.panicAt } : {}),
  };
  if (failure !== null)
    result.error = {
      code: codeOf(failure),
      message: (failure as Error).message ?? String(failure),
    };
  try {
    if (o.applyAfter) await o.applyAfter(o.after);
    else if (o.qmp) await applyAfter(o.qmp, o.after);
    if (o.after === 'reboot') result.runningAt = Date.now();
  } catch (e) {
    result.afterError = { code: codeOf(e), message: (e as Error).message };
  }
  // The guest runs again: now record when, in the entry (it waited for nothing here).
  if (result.runningAt && entry && device)
    result.entry = await device
      .annotate(entry.id, { runningAt: result.runningAt })
      .catch(() => entry);
  await device?.close().catch(() => {});
  return result;
}

async function waitDumpIdle(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const st = await qmp.execute<{ status: string }>('query-dump', undefined, { timeoutMs: 5000 });
    if (st.status !== 'active') return;
    await new Promise((r) => setTimeout(r, 100));
  }
}
