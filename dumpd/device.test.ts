// DumpWriter against `ballast serve`: pieces read in place, hashed, and the space a
// dropped dump held under the new reservation trimmed past the new dump's end.

import { createHash, randomBytes } from 'node:crypto';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type ServerHandle, startServer } from '../test/helpers/server.js';
import { DumpDevice, type DumpWriter } from './device.js';

let server: ServerHandle;
beforeAll(async () => {
  server = await startServer({ size: '16M' });
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
    expect(e1.sha256).toBe(createHash('sha256').update(big).digest('hex'));
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
    expect(e2.sha256).toBe(createHash('sha256').update(small).digest('hex'));
    expect(dev.catalog.entries.map((e) => e.id)).toEqual([e2.id]);
    // Past the second dump's last MiB, nothing of the first is left.
    const tail = e1.offset + 2 * 1024 * 1024;
    const rest = await dev.nbd.read(tail, e1.offset + big.length - tail);
    expect(rest.equals(Buffer.alloc(rest.length))).toBe(true);
  } finally {
    await dev.close();
  }
});
