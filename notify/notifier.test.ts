import { afterEach, describe, expect, it } from 'vitest';
import type { Store } from '../agent/store/store.js';
import { openMemoryStore } from '../test/helpers/memory-store.js';
import { Receiver } from '../test/helpers/receiver.js';
import { Notifier, retryAfterMs, retryDelay, validateRecipient } from './notifier.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
// A hang guard, never a judge of speed: a loaded machine (load 20 on 2 cores) took more
// than 10 s for a delivery that waits on nothing.
async function until(pred: () => boolean, ms = 90_000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms`);
    await sleep(20);
  }
}

const cleanup: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function setup(): Promise<{ store: Store; n: Notifier }> {
  const store = await openMemoryStore();
  const n = new Notifier({
    store,
    cluster: 'c',
    host: 'h',
    log: () => {},
    retryBaseMs: 20,
    retryCapMs: 100,
    timeoutMs: 500,
  });
  await n.start();
  cleanup.push(async () => {
    await n.stop();
    await store.close();
  });
  return { store, n };
}

const ready = (name: string, size = 1, updatedAt = 't') =>
  JSON.stringify({ name, size, state: 'ready', extents: [], updatedAt });

describe('Notifier', () => {
  it('a recipient whose cursor fell behind a compaction gets the state at the oldest revision kept, then every event after it', async () => {
    const { store, n } = await setup();
    const rx = new Receiver();
    await rx.start();
    cleanup.push(() => rx.stop());
    await n.add({ name: 'r', url: rx.url });
    await store.put('devices/d0', ready('d0'));
    await until(() => rx.ids().length === 1);
    rx.always = 503; // down for a while
    const { revision: made } = await store.put('devices/d1', ready('d1'));
    await store.put('devices/d1', ready('d1', 2, 't2'));
    await sleep(100);
    // d1's creation is forgotten; its resize is still in the history.
    await store.compact(made);
    // The delivery is stuck on an event still in memory; a restart reads from the cursor.
    await n.stop();
    rx.always = null;
    const n2 = new Notifier({ ...n.opts, retryBaseMs: 20, retryCapMs: 100 });
    await n2.start();
    cleanup.push(() => n2.stop());
    await store.put('devices/d2', ready('d2'));
    await until(() => rx.got.some((g) => g.subject === 'd2'));
    const resync = rx.got.find((g) => g.type === 'io.ballast.resync')!;
    expect(resync.id).toBe(`${made}.999999`);
    expect(resync.data).toMatchObject({
      revision: made,
      devices: [
        { name: 'd0', size: 1 },
        { name: 'd1', size: 1 },
      ],
    });
    expect(rx.got.map((g) => `${g.type} ${g.subject ?? ''}`)).toEqual([
      'io.ballast.device.created d0',
      'io.ballast.resync ',
      'io.ballast.device.resized d1',
      'io.ballast.device.created d2',
    ]);
  });

  it('backs off exponentially with jitter up to the cap; Retry-After wins when longer', () => {
    const lo = () => 0;
    const hi = () => 1;
    expect(retryDelay(0, 200, 300_000, undefined, hi)).toBe(200);
    expect(retryDelay(0, 200, 300_000, undefined, lo)).toBe(100);
    expect(retryDelay(3, 200, 300_000, undefined, hi)).toBe(1600);
    const grown = [0, 5, 10, 11, 15, 40, 1000].map((a) =>
      retryDelay(a, 200, 300_000, undefined, hi),
    );
    expect(grown).toEqual([200, 6400, 204_800, 300_000, 300_000, 300_000, 300_000]);
    for (let a = 0; a < 50; a++) {
      const w = retryDelay(a, 200, 300_000);
      expect(w).toBeLessThanOrEqual(300_000);
      expect(w).toBeGreaterThanOrEqual(Math.min(300_000, 200 * 2 ** a) / 2);
    }
    expect(retryDelay(0, 200, 300_000, 5000, hi)).toBe(5000);
    expect(retryDelay(12, 200, 300_000, 5000, hi)).toBe(300_000);
    expect(retryDelay(0, 200, 300_000, 86_400_000, hi)).toBe(3_600_000);
  });

  it('validates recipients and Retry-After', () => {
    expect(() => validateRecipient({ name: 'x', url: 'file:///etc/passwd' })).toThrow(/http/);
    expect(() => validateRecipient({ name: 'X!', url: 'http://127.0.0.1/' })).toThrow(/name/);
    expect(() =>
      validateRecipient({ name: 'x', url: 'http://127.0.0.1/', types: 'a.b.c' }),
    ).toThrow();
    expect(() =>
      validateRecipient({ name: 'x', url: 'http://127.0.0.1/', secret: 'short' }),
    ).toThrow(/16/);
    expect(retryAfterMs('3')).toBe(3000);
    expect(retryAfterMs(null)).toBeUndefined();
    expect(retryAfterMs(new Date(Date.now() + 5000).toUTCString())).toBeGreaterThan(3000);
  });
});
