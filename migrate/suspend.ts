// Suspend a guest into its paging device and resume it on any host that serves the
// device. Nothing is staged on the host's disk: the agent that serves the device takes
// QEMU's migration stream on a Unix socket of its own and writes it into the device
// itself (stream-in, agent/stream.ts), and reads it back into the new QEMU's incoming
// socket (stream-out). Where that agent does not serve the device (another host's
// host-local device), or with `via: 'nbd'`, the stream goes through a private Unix
// socket of this process into the device over NBD (and back out of it) instead.
//
// suspend: zero the header (a crash mid-way leaves no image that points at a torn
//          stream), stop the guest, `migrate` to our socket, write each piece at its
//          place in the suspend area while hashing it, flush, write the header, quit QEMU.
//          Any failure before the header: the migration is cancelled, the guest continues.
// resume:  read the header, refuse another QEMU or machine type, feed the stream to a
//          QEMU started with -incoming defer -S while hashing it, refuse it if the hash
//          is wrong (that QEMU is told to quit, nothing was taken), take every device of
//          the guest for this host, `cont`, zero the header (resumed once only).

import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { type ChecksumAlg, checksummer, parseChecksum } from '../agent/checksum.js';
import { BallastError } from '../agent/errors.js';
import type { QmpClient } from '../dumpd/qmp.js';
import { NbdClient } from '../nbd/client.js';
import { exposureText, guestViews, overlapping } from './area.js';
import {
  type AgentApi,
  agentHost,
  type DeviceView,
  ensureHeld,
  guestDevices,
  MigrateError,
} from './handoff.js';
import {
  decodeHeader,
  encodeHeader,
  HEADER_BYTES,
  HeaderError,
  type ImageHeader,
  incompatibility,
  MiB,
  suspendArea,
} from './image.js';
import {
  connectQmp,
  qemuIdentity,
  runState,
  setCapabilities,
  tryExecute,
  waitMigration,
} from './qemu.js';

const PIECE = 4 * 1024 * 1024;
const IN_FLIGHT = 4;

/** Who moves the stream: the agent itself, this process over NBD, or the agent where it can. */
export type StreamVia = 'auto' | 'agent' | 'nbd';

export interface SuspendOptions {
  guest: string;
  qmp: string;
  /** The agent of the host the guest runs on. */
  api: AgentApi;
  /** The device to suspend into (default: the guest's paging device). */
  device?: string | undefined;
  /** Where the stream starts (default: suspendArea for the guest's RAM). */
  offset?: number | undefined;
  /** Leave QEMU running (paused, migrated) instead of quitting it. */
  keepQemu?: boolean | undefined;
  /** The stream's checksum (default crc32). */
  checksum?: ChecksumAlg | undefined;
  /** Default 'auto'. */
  via?: StreamVia | undefined;
  /**
   * Suspend even when the guest sees the suspend area (its swap there is overwritten);
   * `onWarning` is told why.
   */
  force?: boolean | undefined;
  onWarning?: ((message: string) => void) | undefined;
}

export interface SuspendReport {
  guest: string;
  device: string;
  offset: number;
  bytes: number;
  checksum: string;
  qemu: string;
  machine: string;
  ms: number;
  /** From stopping the guest to the header on disk: the stream's own time. */
  streamMs: number;
  mibPerSec: number;
  /** Who moved the stream. */
  via: 'agent' | 'nbd';
  /** The agent's writes bypassed the page cache (O_DIRECT). */
  direct?: boolean;
  /** What --force let through (the guest saw the suspend area). */
  warnings?: string[];
}

/** A RAM size as `--guest-ram` takes it: 128M, else bytes. */
function ramArg(bytes: number): string {
  return bytes % MiB === 0 ? `${bytes / MiB}M` : String(bytes);
}

async function pagingDevice(api: AgentApi, guest: string, named?: string): Promise<DeviceView> {
  const devs = await guestDevices(api, guest, named ? [named] : []);
  const d = named ? devs[0] : devs.find((x) => x.role === 'paging');
  if (!d) {
    throw new MigrateError(
      'MIGRATE_NO_DEVICES',
      `guest ${guest} has no paging device (name one with --device)`,
    );
  }
  return d;
}

async function openDevice(api: AgentApi, device: string): Promise<NbdClient> {
  const a = (await api.request('GET', `/v1/devices/${encodeURIComponent(device)}/attach`)) as {
    uri: string;
  };
  return NbdClient.connect(a.uri);
}

/** A stream of the agent (GET /v1/streams/ID), the fields used here. */
interface AgentStream {
  id: string;
  state: string;
  socket?: string;
  bytes: number;
  checksum?: string;
  ms?: number;
  direct?: boolean;
  sent?: number;
  peerClosed?: boolean;
}

/**
 * Errors that mean "this agent cannot move the stream itself": the device is another
 * host's (host-local), or the agent predates streams.
 */
const NO_AGENT_STREAM = new Set([
  'BALLAST_DEVICE_REMOTE',
  'BALLAST_NOT_FOUND',
  'BALLAST_METHOD_NOT_ALLOWED',
]);

/** Whether a refused stream call leaves the stream to this process over NBD. */
export function fallsBackToNbd(via: StreamVia, e: unknown): boolean {
  return via === 'auto' && e instanceof BallastError && NO_AGENT_STREAM.has(e.code);
}

/**
 * Starts a stream-in or stream-out on the agent; null when it cannot and `via` lets the
 * caller fall back to NBD.
 */
async function startStream(
  api: AgentApi,
  device: string,
  kind: 'stream-in' | 'stream-out',
  body: Record<string, unknown>,
  via: StreamVia,
): Promise<AgentStream | null> {
  try {
    return (await api.request(
      'POST',
      `/v1/devices/${encodeURIComponent(device)}/${kind}`,
      body,
    )) as AgentStream;
  } catch (e) {
    if (fallsBackToNbd(via, e)) return null;
    throw e;
  }
}

/** Waits for the agent's stream to end; its error (a BallastError with the agent's code) is thrown. */
async function waitStream(api: AgentApi, id: string): Promise<AgentStream> {
  for (;;) {
    const s = (await api.request('POST', `/v1/streams/${encodeURIComponent(id)}/wait`, {
      timeoutMs: 60_000,
    })) as AgentStream;
    if (s.state !== 'listening' && s.state !== 'running') return s;
  }
}

async function cancelStream(api: AgentApi, id: string): Promise<void> {
  await api.request('DELETE', `/v1/streams/${encodeURIComponent(id)}`).catch(() => {});
}

/** An error of the agent's stream as the suspend's own. */
function streamError(e: unknown): unknown {
  if (e instanceof BallastError && e.code === 'BALLAST_STREAM_NO_ROOM') {
    return new MigrateError('SUSPEND_NO_ROOM', e.message, { cause: e });
  }
  return e;
}

/** A failure's message, with its code when it has one. */
function failureText(e: unknown): string {
  return e instanceof BallastError && !(e instanceof MigrateError)
    ? `${e.code}: ${e.message}`
    : (e as Error).message;
}

function tempSocket(): { dir: string; sock: string } {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-suspend-'));
  return { dir, sock: path.join(dir, 'stream.sock') };
}

/**
 * Writes a byte stream at [offset, end) of the device in pieces of 4 MiB, hashing it.
 * `push` is synchronous (no promise per socket chunk); the caller pauses the socket while
 * `busy` says that IN_FLIGHT writes are out, and resumes on `onIdle`.
 */
class DeviceWriter {
  private piece = Buffer.allocUnsafe(PIECE);
  private fill = 0;
  private pos: number;
  private inFlight = 0;
  private readonly waiters: (() => void)[] = [];
  failed: Error | null = null;
  // CRC-32 by default, as dumps: it catches changed bytes at 3.5-5 GB/s, where SHA-256
  // (1.8 GB/s here) took a fifth of the stream's time on the main thread
  readonly hash;
  bytes = 0;

  constructor(
    private readonly nbd: NbdClient,
    private readonly offset: number,
    private readonly end: number,
    alg: ChecksumAlg,
  ) {
    this.pos = offset;
    this.hash = checksummer(alg);
  }

  get busy(): boolean {
    return this.inFlight >= IN_FLIGHT;
  }

  /** Calls `f` once fewer than IN_FLIGHT writes are out. */
  onIdle(f: () => void): void {
    if (!this.busy) f();
    else this.waiters.push(f);
  }

  push(chunk: Buffer): void {
    if (this.failed) return;
    this.hash.update(chunk);
    this.bytes += chunk.length;
    let at = 0;
    while (at < chunk.length) {
      const n = Math.min(chunk.length - at, PIECE - this.fill);
      chunk.copy(this.piece, this.fill, at, at + n);
      this.fill += n;
      at += n;
      if (this.fill === PIECE) this.writePiece();
    }
  }

  private writePiece(): void {
    if (this.fill === 0 || this.failed) return;
    if (this.pos + this.fill > this.end) {
      this.failed = new MigrateError(
        'SUSPEND_NO_ROOM',
        `the stream outgrew the suspend area (${this.end - this.offset} bytes)`,
      );
      this.wake();
      return;
    }
    this.inFlight++;
    this.nbd.write(this.pos, this.piece.subarray(0, this.fill)).then(
      () => {
        this.inFlight--;
        this.wake();
      },
      (e: Error) => {
        this.inFlight--;
        this.failed ??= e;
        this.wake();
      },
    );
    this.pos += this.fill;
    this.piece = Buffer.allocUnsafe(PIECE);
    this.fill = 0;
  }

  private wake(): void {
    while (this.waiters.length && (!this.busy || this.failed)) this.waiters.shift()?.();
  }

  async finish(): Promise<void> {
    this.writePiece();
    while (this.inFlight > 0) await new Promise<void>((r) => this.waiters.push(r));
    if (this.failed) throw this.failed;
    await this.nbd.flush();
  }
}

export async function suspendGuest(o: SuspendOptions): Promise<SuspendReport> {
  const t0 = performance.now();
  const via = o.via ?? 'auto';
  const alg = o.checksum ?? 'crc32';
  const dev = await pagingDevice(o.api, o.guest, o.device);
  const q = await connectQmp(o.qmp, 'guest');
  let nbd: NbdClient | null = null;
  let dir: string | null = null;
  let server: net.Server | null = null;
  let stream: AgentStream | null = null;
  let wasRunning = false;
  let stopped = false;
  const warnings: string[] = [];
  try {
    const state = await runState(q);
    if (state !== 'running' && state !== 'paused') {
      throw new MigrateError('MIGRATE_NOT_RUNNING', `the guest is ${state}`);
    }
    wasRunning = state === 'running';
    const id = await qemuIdentity(q);
    const ram = ((await q.execute('query-memory-size-summary')) as { 'base-memory': number })[
      'base-memory'
    ];
    // The header goes over NBD either way (two small writes).
    nbd = await openDevice(o.api, dev.name);
    const size = nbd.size;
    const area = suspendArea(size, ram);
    const offset = o.offset ?? area?.offset;
    const end = size - HEADER_BYTES;
    if (offset === undefined || offset < 0 || offset >= end) {
      throw new MigrateError(
        'SUSPEND_NO_ROOM',
        `device ${dev.name} (${size} bytes) has no room for a suspend area for ${ram} bytes of RAM`,
      );
    }
    // The stream must not overwrite what the guest sees (its swap): ask QEMU what that is.
    const over = overlapping(guestViews(await q.execute('query-block'), dev.name), offset);
    if (over.length > 0) {
      const how =
        offset === area?.offset
          ? ` (ballast attach ${dev.name} --guest-ram ${ramArg(ram)} prints its QEMU arguments, or --format libvirt its <disk>)`
          : '';
      const why = exposureText(dev.name, offset, over);
      if (!o.force) {
        throw new MigrateError(
          'SUSPEND_AREA_VISIBLE',
          `${why}. Give the guest only the part before it: a raw node with size=${offset} over the NBD node${how}; or suspend anyway with --force. Nothing was written; the guest goes on as it was.`,
        );
      }
      warnings.push(
        `${why} (--force: suspending anyway; size=${offset} gives the guest only the part before it${how})`,
      );
      o.onWarning?.(warnings[warnings.length - 1] as string);
    }
    await nbd.write(end, Buffer.alloc(HEADER_BYTES));
    await nbd.flush();

    let uri: string;
    let received: Promise<{ bytes: number; checksum: string; direct?: boolean }>;
    if (via !== 'nbd') {
      stream = await startStream(o.api, dev.name, 'stream-in', { offset, end, checksum: alg }, via);
    }
    if (stream) {
      uri = `unix:${stream.socket}`;
      const id = stream.id;
      received = waitStream(o.api, id).then(
        (r) => ({
          bytes: r.bytes,
          checksum: r.checksum ?? '',
          ...(r.direct !== undefined ? { direct: r.direct } : {}),
        }),
        (e) => {
          throw streamError(e);
        },
      );
    } else {
      const t = tempSocket();
      dir = t.dir;
      uri = `unix:${t.sock}`;
      const writer = new DeviceWriter(nbd, offset, end, alg);
      server = net.createServer();
      received = new Promise((resolve, reject) => {
        server?.once('connection', (c) => {
          server?.close();
          const fail = (e: Error) => {
            c.destroy();
            reject(e);
          };
          c.on('data', (chunk: Buffer) => {
            writer.push(chunk);
            if (writer.failed) fail(writer.failed);
            else if (writer.busy) {
              c.pause();
              writer.onIdle(() => (writer.failed ? fail(writer.failed) : c.resume()));
            }
          });
          c.on('end', () => {
            writer
              .finish()
              .then(() => resolve({ bytes: writer.bytes, checksum: writer.hash.digest() }), fail);
          });
          c.on('error', reject);
        });
      });
      await new Promise<void>((resolve, reject) => {
        server?.once('error', reject);
        server?.listen(t.sock, resolve);
      });
    }
    received.catch(() => {});
    const tStream = performance.now();
    if (wasRunning) {
      await q.execute('stop');
      stopped = true;
    }
    await setCapabilities(q, { 'pause-before-switchover': false, events: true });
    await q.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
    await q.execute('migrate', { uri });
    const [got] = await Promise.all([
      received,
      waitMigration(q, ['completed'], { timeoutMs: 600_000, step: 'suspend', t0 }),
    ]);
    stream = null; // done: nothing to cancel
    const header: ImageHeader = {
      format: 1,
      guest: o.guest,
      offset,
      length: got.bytes,
      checksum: got.checksum,
      qemu: id.version,
      machine: id.machine,
      ramBytes: ram,
      createdAt: new Date().toISOString(),
    };
    await nbd.write(end, encodeHeader(header));
    await nbd.flush();
    const streamMs = performance.now() - tStream;
    if (!o.keepQemu) await tryExecute(q, 'quit');
    const ms = performance.now() - t0;
    return {
      guest: o.guest,
      device: dev.name,
      offset,
      bytes: got.bytes,
      checksum: header.checksum,
      qemu: id.version,
      machine: id.machine,
      ms,
      streamMs,
      mibPerSec: got.bytes / 1048576 / (streamMs / 1000),
      via: server ? 'nbd' : 'agent',
      ...(got.direct !== undefined ? { direct: got.direct } : {}),
      ...(warnings.length > 0 ? { warnings } : {}),
    };
  } catch (e) {
    // The agent's stream first: it stops writing before the guest may run again.
    if (stream) await cancelStream(o.api, stream.id);
    await tryExecute(q, 'migrate_cancel');
    if (stopped) {
      // The guest goes on as if nothing happened once the migration is over.
      for (let i = 0; i < 100; i++) {
        const st = await runState(q).catch(() => 'unknown');
        if (st !== 'finish-migrate') break;
        await new Promise((r) => setTimeout(r, 50));
      }
      await tryExecute(q, 'cont');
    }
    if (e instanceof MigrateError) throw e;
    throw new MigrateError('SUSPEND_FAILED', `suspend failed: ${failureText(e)}`, {
      cause: e,
    });
  } finally {
    server?.close();
    q.close();
    await nbd?.close().catch(() => {});
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
}

export interface ResumeOptions {
  guest: string;
  /** The new QEMU, started with the guest's devices and -incoming defer -S. */
  qmp: string;
  /** The agent of the host it resumes on. */
  api: AgentApi;
  host?: string | undefined;
  device?: string | undefined;
  /** Default 'auto'. */
  via?: StreamVia | undefined;
}

export interface ResumeReport {
  guest: string;
  device: string;
  host: string;
  bytes: number;
  checksum: string;
  /** From migrate-incoming to the stream loaded and verified; then the whole resume. */
  streamMs: number;
  ms: number;
  mibPerSec: number;
  taken: { device: string; did: string }[];
  /** Who moved the stream. */
  via: 'agent' | 'nbd';
}

/** Reads the suspend header of a device (null: no suspended guest on it). */
export async function readImageHeader(nbd: NbdClient): Promise<ImageHeader | null> {
  const raw = await nbd.read(nbd.size - HEADER_BYTES, HEADER_BYTES);
  try {
    return decodeHeader(raw);
  } catch (e) {
    if (!(e instanceof HeaderError)) throw e;
    throw new MigrateError(
      'SUSPEND_BAD_IMAGE',
      `the suspend header is damaged: ${(e as Error).message}`,
    );
  }
}

/**
 * Feeds the stream at h.offset of the device over NBD into QEMU's incoming socket: its
 * checksum, of every byte read even if QEMU gave up, so that a damaged stream is
 * reported as such.
 */
async function feedOverNbd(
  nbd: NbdClient,
  h: ImageHeader,
  sock: string,
  hash: ReturnType<typeof checksummer>,
): Promise<string> {
  const c = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.connect(sock);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
  let broken: Error | null = null;
  c.on('error', (e) => {
    broken ??= e;
  });
  // Read ahead a few pieces.
  const reads: Promise<Buffer>[] = [];
  let next = 0;
  const more = () => {
    while (reads.length < IN_FLIGHT && next < h.length) {
      const n = Math.min(PIECE, h.length - next);
      reads.push(nbd.read(h.offset + next, n));
      next += n;
    }
  };
  more();
  while (reads.length) {
    const b = await (reads.shift() as Promise<Buffer>);
    more();
    hash.update(b);
    if (!broken && !c.destroyed && !c.write(b)) {
      await new Promise<void>((resolve) => {
        const done = () => {
          c.off('drain', done);
          c.off('close', done);
          resolve();
        };
        c.on('drain', done);
        c.on('close', done);
      });
    }
  }
  c.end();
  return hash.digest();
}

export async function resumeGuest(o: ResumeOptions): Promise<ResumeReport> {
  const t0 = performance.now();
  const via = o.via ?? 'auto';
  const host = o.host ?? (await agentHost(o.api));
  const dev = await pagingDevice(o.api, o.guest, o.device);
  const nbd = await openDevice(o.api, dev.name);
  let q: QmpClient | null = null;
  let started = false;
  try {
    const h = await readImageHeader(nbd);
    if (!h) {
      throw new MigrateError('SUSPEND_NO_IMAGE', `device ${dev.name} holds no suspended guest`);
    }
    if (h.guest !== o.guest) {
      throw new MigrateError(
        'SUSPEND_NO_IMAGE',
        `device ${dev.name} holds a suspended guest ${h.guest}, not ${o.guest}`,
      );
    }
    if (h.offset + h.length > nbd.size - HEADER_BYTES) {
      throw new MigrateError(
        'SUSPEND_BAD_IMAGE',
        `the suspend header puts the stream at ${h.offset}+${h.length}, past the suspend area of ${dev.name} (${nbd.size - HEADER_BYTES} bytes)`,
      );
    }
    q = await connectQmp(o.qmp, 'destination');
    const st = await runState(q);
    if (st !== 'inmigrate') {
      throw new MigrateError(
        'MIGRATE_DESTINATION_STATE',
        `the QEMU to resume into is ${st}; start it with -incoming defer -S`,
      );
    }
    const id = await qemuIdentity(q);
    const why = incompatibility(h, { qemu: id.version, machine: id.machine });
    if (why) throw new MigrateError('SUSPEND_INCOMPATIBLE', why);
    await setCapabilities(q, { 'late-block-activate': true, events: true });

    const { dir, sock } = tempSocket();
    const alg = parseChecksum(h.checksum)?.alg;
    if (!alg) throw new MigrateError('SUSPEND_BAD_IMAGE', `unknown checksum ${h.checksum}`);
    let sum: string;
    let fed = false;
    let usedVia: 'agent' | 'nbd' = 'nbd';
    const tStream = performance.now();
    try {
      await q.execute('migrate-incoming', { uri: `unix:${sock}` });
      started = true;
      const stream =
        via === 'nbd'
          ? null
          : await startStream(
              o.api,
              dev.name,
              'stream-out',
              { socket: sock, offset: h.offset, length: h.length, checksum: alg },
              via,
            );
      if (stream) {
        usedVia = 'agent';
        // The agent hashes every byte it read, also after QEMU gave up.
        const r = await waitStream(o.api, stream.id);
        sum = r.checksum ?? '';
      } else {
        sum = await feedOverNbd(nbd, h, sock, checksummer(alg));
      }
      fed = true;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    if (sum !== h.checksum) {
      throw new MigrateError(
        'SUSPEND_BAD_CHECKSUM',
        `the suspended stream on ${dev.name} does not match its checksum (${sum}, recorded ${h.checksum}); not resumed`,
      );
    }
    if (!fed) throw new MigrateError('SUSPEND_FAILED', 'the stream was not fed');
    await waitMigration(q, ['completed'], { timeoutMs: 600_000, step: 'resume', t0, pollMs: 20 });
    const streamMs = performance.now() - tStream;
    const taken: { device: string; did: string }[] = [];
    for (const d of await guestDevices(o.api, o.guest)) {
      taken.push({ device: d.name, did: await ensureHeld(o.api, d.name, host) });
    }
    await q.execute('cont');
    started = false;
    // Resumed once: the image is spent.
    const writer = await openDevice(o.api, dev.name);
    await writer.write(writer.size - HEADER_BYTES, Buffer.alloc(HEADER_BYTES));
    await writer.flush();
    await writer.close().catch(() => {});
    const ms = performance.now() - t0;
    return {
      guest: o.guest,
      device: dev.name,
      host,
      bytes: h.length,
      checksum: h.checksum,
      streamMs,
      ms,
      mibPerSec: h.length / 1048576 / (streamMs / 1000),
      taken,
      via: usedVia,
    };
  } catch (e) {
    if (started) await tryExecute(q, 'quit');
    if (e instanceof MigrateError) throw e;
    throw new MigrateError('SUSPEND_FAILED', `resume failed: ${failureText(e)}`, {
      cause: e,
    });
  } finally {
    q?.close();
    await nbd.close().catch(() => {});
  }
}
