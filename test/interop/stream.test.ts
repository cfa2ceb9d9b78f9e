// The agent's suspend streams against a real agent, no guest: a Unix-socket client plays
// QEMU's `migrate unix:PATH` into stream-in, and a Unix-socket server plays QEMU's
// `migrate-incoming unix:PATH` for stream-out. Covered: the bytes and their CRC-32 both
// ways (read back over NBD too), nothing written past the area's end, a write-denied
// identity refused at the start, a PREEMPT AND ABORT stopping a stream mid-way (nothing
// it sent afterwards on the device), the listening socket's timeout and cancel.

import { randomFillSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checksummer } from '../../agent/checksum.js';
import { hostKey } from '../../migrate/handoff.js';
import { NbdClient } from '../../nbd/client.js';
import { type AgentHandle, type ApiReply, startAgent } from '../helpers/agent.js';
import { MiB, makeTempDir } from '../helpers/server.js';

const SIZE = 64 * MiB;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface View {
  id: string;
  state: string;
  socket?: string;
  bytes: number;
  checksum?: string;
  direct?: boolean;
  sent?: number;
  peerClosed?: boolean;
}

function crc(b: Buffer): string {
  const h = checksummer('crc32');
  h.update(b);
  return h.digest();
}

/** Sends `data` into a stream-in socket as QEMU would, in chunks; resolves once all is sent and the agent closed its end. */
function feed(sock: string, data: Buffer, chunk = 256 * 1024): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = net.connect(sock);
    c.on('error', reject);
    c.on('connect', async () => {
      for (let at = 0; at < data.length; at += chunk) {
        if (!c.write(data.subarray(at, at + chunk))) await new Promise((r) => c.once('drain', r));
      }
      c.end();
    });
    c.on('close', () => resolve());
    c.resume();
  });
}

describe('agent streams: stream-in and stream-out of a device, no guest', () => {
  let a: AgentHandle;
  let dir: string;

  const api = (method: string, p: string, body?: unknown): Promise<ApiReply> =>
    a.api(method, p, body);
  const wait = (id: string) => api('POST', `/v1/streams/${id}/wait`, { timeoutMs: 30_000 });

  async function device(name: string): Promise<void> {
    const r = await api('POST', '/v1/devices', { name, size: String(SIZE), role: 'paging' });
    expect(r.status, r.text).toBe(201);
  }

  async function readBack(name: string, offset: number, length: number): Promise<Buffer> {
    const c = await NbdClient.connect(a.uri(name));
    try {
      return await c.read(offset, length);
    } finally {
      await c.close();
    }
  }

  beforeAll(async () => {
    dir = makeTempDir('ballast-stream-');
    a = await startAgent();
  });

  afterAll(async () => {
    await a?.stop();
  });

  it('takes a stream into the area and gives it back: same bytes, same CRC-32', async () => {
    await device('s1');
    const offset = 16 * MiB;
    // not a whole number of pieces nor of blocks: the tail goes through the page cache
    const data = randomFillSync(Buffer.alloc(21 * MiB + 1234));
    const r = await api('POST', '/v1/devices/s1/stream-in', { offset, end: SIZE - 4096 });
    expect(r.status, r.text).toBe(200);
    const s = r.body as unknown as View;
    expect(s.state).toBe('listening');
    expect(s.socket).toMatch(/\.sock$/);
    await feed(s.socket as string, data);
    const w = await wait(s.id);
    expect(w.status, w.text).toBe(200);
    const done = w.body as unknown as View;
    expect(done).toMatchObject({ state: 'done', bytes: data.length, checksum: crc(data) });
    expect(done.direct).toBe(true); // ext4 pools: the aligned writes bypassed the page cache
    expect(existsSync(s.socket as string)).toBe(false);
    // over NBD: the bytes, and nothing around them
    expect((await readBack('s1', offset, data.length)).equals(data)).toBe(true);
    expect((await readBack('s1', offset + data.length, MiB)).equals(Buffer.alloc(MiB))).toBe(true);

    // stream-out into a socket QEMU would listen on
    const sock = path.join(dir, 'incoming.sock');
    const got: Buffer[] = [];
    const server = net.createServer((c) => {
      c.on('data', (b: Buffer) => got.push(b));
    });
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    const o = await api('POST', '/v1/devices/s1/stream-out', {
      socket: sock,
      offset,
      length: data.length,
    });
    expect(o.status, o.text).toBe(200);
    const ow = await wait((o.body as unknown as View).id);
    expect(ow.status, ow.text).toBe(200);
    expect(ow.body).toMatchObject({
      state: 'done',
      bytes: data.length,
      sent: data.length,
      checksum: crc(data),
    });
    await sleep(100);
    server.close();
    expect(Buffer.concat(got).equals(data)).toBe(true);
  }, 60_000);

  it('a peer that stops reading: stream-out still reads and hashes every byte', async () => {
    await device('s2');
    const data = randomFillSync(Buffer.alloc(12 * MiB));
    const r = await api('POST', '/v1/devices/s2/stream-in', { offset: 8 * MiB });
    await feed((r.body as unknown as View).socket as string, data);
    expect((await wait((r.body as unknown as View).id)).status).toBe(200);
    const sock = path.join(dir, 'closes.sock');
    const server = net.createServer((c) => c.destroy());
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    const o = await api('POST', '/v1/devices/s2/stream-out', {
      socket: sock,
      offset: 8 * MiB,
      length: data.length,
    });
    const ow = await wait((o.body as unknown as View).id);
    server.close();
    expect(ow.status, ow.text).toBe(200);
    expect(ow.body).toMatchObject({ state: 'done', bytes: data.length, checksum: crc(data) });
    expect((ow.body as unknown as View).sent).toBeLessThan(data.length);
  }, 60_000);

  it('refuses bytes past the area’s end, and ranges outside the device', async () => {
    await device('s3');
    const offset = 8 * MiB;
    const end = offset + 5 * MiB;
    const r = await api('POST', '/v1/devices/s3/stream-in', { offset, end });
    const s = r.body as unknown as View;
    await feed(s.socket as string, randomFillSync(Buffer.alloc(8 * MiB))).catch(() => {});
    const w = await wait(s.id);
    expect(w.status, w.text).toBe(409);
    expect(w.body.code).toBe('BALLAST_STREAM_NO_ROOM');
    expect((await readBack('s3', end, 4 * MiB)).equals(Buffer.alloc(4 * MiB))).toBe(true);

    for (const body of [
      { offset: SIZE },
      { offset: 0, end: SIZE + 1 },
      { offset: 4 * MiB, end: 4 * MiB },
    ]) {
      const x = await api('POST', '/v1/devices/s3/stream-in', body);
      expect(x.status, x.text).toBe(400);
      expect(x.body.code).toBe('BALLAST_STREAM_RANGE');
    }
    const y = await api('POST', '/v1/devices/s3/stream-out', {
      socket: path.join(dir, 'none.sock'),
      offset: SIZE - MiB,
      length: 2 * MiB,
    });
    expect(y.body.code).toBe('BALLAST_STREAM_RANGE');
    const z = await api('POST', '/v1/devices/nope/stream-in', { offset: 0 });
    expect(z.status).toBe(404);
    expect(z.body.code).toBe('BALLAST_DEVICE_NOT_FOUND');
  }, 60_000);

  it('a preempted identity is refused, mid-stream and at the start', async () => {
    await device('s4');
    const pr = (body: Record<string, unknown>) => api('POST', '/v1/devices/s4/pr', body);
    for (const body of [
      { action: 'register-ignore', as: 'host-a', key: 0, saKey: hostKey('host-a') },
      { action: 'register-ignore', as: 'host-b', key: 0, saKey: hostKey('host-b') },
      { action: 'reserve', as: 'host-a', key: hostKey('host-a'), type: 1 },
    ]) {
      const p = await pr(body);
      expect(p.status, p.text).toBe(200);
    }
    // Write Exclusive held by host-a: host-b may not write
    const denied = await api('POST', '/v1/devices/s4/stream-in', { offset: 0, as: 'host-b' });
    expect(denied.status, denied.text).toBe(409);
    expect(denied.body.code).toBe('BALLAST_STREAM_DENIED');

    const offset = 16 * MiB;
    const r = await api('POST', '/v1/devices/s4/stream-in', { offset, as: 'host-a' });
    expect(r.status, r.text).toBe(200);
    const s = r.body as unknown as View;
    const c = net.connect(s.socket as string);
    c.on('error', () => {});
    await new Promise((resolve) => c.once('connect', resolve));
    const first = randomFillSync(Buffer.alloc(8 * MiB));
    c.write(first);
    for (let i = 0; i < 200; i++) {
      const g = (await api('GET', `/v1/streams/${s.id}`)).body as unknown as View;
      if (g.bytes >= first.length) break;
      await sleep(50);
    }
    const p = await pr({
      action: 'preempt-abort',
      as: 'host-b',
      key: hostKey('host-b'),
      saKey: hostKey('host-a'),
      type: 1,
    });
    expect(p.status, p.text).toBe(200);
    expect(p.body.aborted).toBe(1);
    // what host-a sends after the preempt never reaches the device
    c.write(Buffer.alloc(8 * MiB, 0xab));
    c.end();
    const w = await wait(s.id);
    expect(w.status, w.text).toBe(409);
    expect(w.body.code).toBe('BALLAST_STREAM_DENIED');
    expect((await readBack('s4', offset, first.length)).equals(first)).toBe(true);
    expect(
      (await readBack('s4', offset + first.length, 8 * MiB)).equals(Buffer.alloc(8 * MiB)),
    ).toBe(true);
    const again = await api('POST', '/v1/devices/s4/stream-in', { offset, as: 'host-a' });
    expect(again.body.code).toBe('BALLAST_STREAM_DENIED');
    // the new holder may
    const b = await api('POST', '/v1/devices/s4/stream-in', { offset, as: 'host-b' });
    expect(b.status, b.text).toBe(200);
    await api('DELETE', `/v1/streams/${(b.body as unknown as View).id}`);
  }, 60_000);

  it('nobody connects: the socket times out and is gone; a listening stream can be cancelled', async () => {
    await device('s5');
    const r = await api('POST', '/v1/devices/s5/stream-in', { offset: 0, timeoutMs: 300 });
    const s = r.body as unknown as View;
    expect(existsSync(s.socket as string)).toBe(true);
    const w = await wait(s.id);
    expect(w.status, w.text).toBe(504);
    expect(w.body.code).toBe('BALLAST_STREAM_TIMEOUT');
    expect(existsSync(s.socket as string)).toBe(false);
    expect(existsSync(path.dirname(s.socket as string))).toBe(false);

    const r2 = await api('POST', '/v1/devices/s5/stream-in', { offset: 0 });
    const s2 = r2.body as unknown as View;
    const busy = await api('POST', '/v1/devices/s5/stream-in', { offset: 0 });
    expect(busy.body.code).toBe('BALLAST_DEVICE_BUSY');
    const d = await api('DELETE', `/v1/streams/${s2.id}`);
    expect(d.status, d.text).toBe(200);
    expect(d.body.state).toBe('failed');
    expect(existsSync(s2.socket as string)).toBe(false);
    const w2 = await wait(s2.id);
    expect(w2.body.code).toBe('BALLAST_STREAM_CANCELLED');
    const gone = await api('GET', '/v1/streams/0123456789abcdef');
    expect(gone.status).toBe(404);
    expect(gone.body.code).toBe('BALLAST_STREAM_NOT_FOUND');
  }, 60_000);
});
