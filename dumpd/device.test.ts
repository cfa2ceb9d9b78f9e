// DumpWriter against `ballast serve`: pieces read in place, checksummed, flushed as
// they go, and the space a dropped dump held under the new reservation trimmed past the
// new dump's end.

import { createHash, randomBytes } from 'node:crypto';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { crc32 } from '../agent/checksum.js';
import { type ServerHandle, startServer } from '../test/helpers/server.js';
import { DumpDevice, type DumpWriter } from './device.js';

let server: ServerHandle;
beforeAll(async () => {
  server = await startServer({ size: '96M' });
});
afterAll(async () => {
  await server?.stop();
});

/** Feeds `data` through window()/filled() in reads of up to `step` bytes. */
async function feed(w: DumpWriter, data: Buffer, step: number): Promise<void> {
  for (let pos = 0; pos < data.length; ) {
    const win = w.window();
    const n = Math.min(win.length, step, data.length - pos);
    data.copy(win, 0, pos, pos + n);
    pos += n;
    if (!w.filled(n)) await w.ready();
  }
}

it('writes and hashes a dump, and trims what a dropped dump left past the new one', async () => {
  const uri = `nbd+unix:///?socket=${server.socket}`;
  const dev = await DumpDevice.open(uri);
  try {
    const big = randomBytes(5 * 1024 * 1024 + 123);
    const w1 = await dev.begin({ guest: 'g', format: 'elf', keep: 1 });
    await feed(w1, big, 70_000);
    const e1 = await w1.finish();
    expect(e1.state).toBe('complete');
    expect(e1.length).toBe(big.length);
    expect(e1.checksum).toBe(`crc32:${crc32(big).toString(16).padStart(8, '0')}`);
    const back: Buffer[] = [];
    await dev.read(e1, (c) => {
      back.push(Buffer.from(c));
    });
    expect(Buffer.concat(back).equals(big)).toBe(true);

    // keep 1: the first dump is dropped and the second lands on the same space.
    const small = randomBytes(1024 * 1024 + 7);
    const w2 = await dev.begin({ guest: 'g', format: 'elf', keep: 1 });
    expect(w2.entry.offset).toBe(e1.offset);
    await feed(w2, small, 1 << 20);
    const e2 = await w2.finish();
    expect(e2.checksum).toBe(`crc32:${crc32(small).toString(16).padStart(8, '0')}`);
    expect(dev.catalog.entries.map((e) => e.id)).toEqual([e2.id]);
    // Past the second dump's last MiB, nothing of the first is left.
    const tail = e1.offset + 2 * 1024 * 1024;
    const rest = await dev.nbd.read(tail, e1.offset + big.length - tail);
    expect(rest.equals(Buffer.alloc(rest.length))).toBe(true);
  } finally {
    await dev.close();
  }
});

it('flushes every 32 MiB while the dump streams, not only at the end', async () => {
  const dev = await DumpDevice.open(`nbd+unix:///?socket=${server.socket}`);
  try {
    const nbd = dev.nbd;
    const flush = nbd.flush.bind(nbd);
    const at: number[] = [];
    let w: DumpWriter | null = null;
    nbd.flush = () => {
      at.push(w?.length ?? -1);
      return flush();
    };
    const data = randomBytes(70 * 1024 * 1024 + 5);
    w = await dev.begin({ guest: 'g', format: 'elf', keep: 1 });
    await feed(w, data, 1 << 20);
    const e = await w.finish();
    // While streaming: one after 32 MiB, and one after 64 MiB unless the first was still
    // running then (a flush is never sent while another runs); then one before `complete`.
    expect(at.length).toBeGreaterThanOrEqual(2);
    expect(at.length).toBeLessThanOrEqual(3);
    expect(at.slice(0, -1).every((n) => n >= 32 * 1024 * 1024 && n < data.length)).toBe(true);
    expect(at.at(-1)).toBe(data.length);
    expect(e.checksum).toBe(`crc32:${crc32(data).toString(16).padStart(8, '0')}`);
  } finally {
    await dev.close();
  }
});

it('reads back and verifies a dump whose entry carries a SHA-256 (catalog version 1)', async () => {
  const dev = await DumpDevice.open(`nbd+unix:///?socket=${server.socket}`);
  try {
    const data = randomBytes(3 * 1024 * 1024 + 11);
    const w = await dev.begin({ guest: 'old', format: 'elf', keep: 1 });
    await feed(w, data, 1 << 20);
    const e = await w.finish();
    const sha = `sha256:${createHash('sha256').update(data).digest('hex')}`;
    // As a dumpd of catalog version 1 would have recorded it.
    await dev.commit({
      ...dev.catalog,
      generation: dev.catalog.generation + 1,
      entries: dev.catalog.entries.map((x) => (x.id === e.id ? { ...x, checksum: sha } : x)),
    });
    await dev.refresh();
    const old = dev.find(e.id);
    expect(old.checksum).toBe(sha);
    expect(await dev.read(old, () => {})).toBe(sha);
    // Bytes that changed on the device no longer match.
    await dev.nbd.write(old.offset + 5, Buffer.from([0xff ^ (data[5] as number)]));
    expect(await dev.read(old, () => {})).not.toBe(sha);
  } finally {
    await dev.close();
  }
});
