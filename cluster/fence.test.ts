import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { loadNative } from '../agent/native.js';
import { SparseFileBackend } from '../agent/sparse-file.js';
import type { IoRequest } from '../nbd/backend.js';
import { Fence, type FenceSource } from './fence.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

class Lease implements FenceSource {
  validUntil = performance.now() + 10_000;
  serve = true;
  leaseValidUntil(): number {
    return this.validUntil;
  }
  canServe(): boolean {
    return this.serve;
  }
}

const fences: Fence[] = [];
afterEach(() => {
  vi.useRealTimers();
  for (const f of fences.splice(0)) f.close();
});

function fence(src: FenceSource, holdMs = 200, watchdog?: string): Fence {
  const f = new Fence(src, { marginMs: 100, holdMs, log: () => {}, watchdog });
  fences.push(f);
  return f;
}

describe('Fence', () => {
  it('opens while the lease deadline (minus the margin) is ahead, holds, then fails', async () => {
    const lease = new Lease();
    const f = fence(lease);
    expect(f.gate()).toBe('open');
    lease.validUntil = performance.now() + 50; // inside the margin: fenced now
    expect(f.gate()).toBe('hold');
    expect(f.fenced()).toBe(true);
    let woken = 0;
    f.onOpen(() => woken++);
    await sleep(260);
    expect(woken).toBe(1); // held connections are told to ask again at the bound
    expect(f.gate()).toBe('fail');
  });

  it('opens again only once the lease is renewed and the agent may serve (caught up)', () => {
    const lease = new Lease();
    const f = fence(lease);
    lease.validUntil = performance.now() - 1;
    expect(f.gate()).toBe('hold');
    let woken = 0;
    f.onOpen(() => woken++);
    lease.validUntil = performance.now() + 10_000;
    lease.serve = false; // renewed, but the reservations are not caught up yet
    f.check();
    expect(f.gate()).toBe('hold');
    lease.serve = true;
    f.check();
    expect(woken).toBe(1);
    expect(f.gate()).toBe('open');
    expect(f.fences).toBe(1);
  });

  it('an agent that has just joined serves only once caught up, without counting a fence', () => {
    const lease = new Lease();
    lease.serve = false; // registered, the cache not yet at the registration's revision
    const f = fence(lease);
    expect(f.gate()).toBe('hold');
    let woken = 0;
    f.onOpen(() => woken++);
    f.check();
    expect(f.gate()).toBe('hold');
    lease.serve = true;
    f.check();
    expect(woken).toBe(1);
    expect(f.gate()).toBe('open');
    expect(f.fences).toBe(0);
  });

  it('a wall clock that jumps changes nothing: deadlines are monotonic', () => {
    const lease = new Lease();
    const f = fence(lease);
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(Date.now() + 86_400_000); // a day ahead
    expect(f.gate()).toBe('open');
    vi.setSystemTime(Date.now() - 2 * 86_400_000); // and back two
    expect(f.gate()).toBe('open');
    lease.validUntil = performance.now() - 1;
    expect(f.gate()).toBe('hold');
  });

  it('pets a watchdog only while the lease is valid, and disarms it on a clean stop', async () => {
    const dog = path.join(tmpdir(), `ballast-watchdog-${process.pid}`);
    writeFileSync(dog, '');
    const lease = new Lease();
    const f = fence(lease, 200, dog);
    await sleep(1100);
    const petted = readFileSync(dog, 'utf8');
    expect(petted).toMatch(/^1+$/);
    lease.validUntil = performance.now() - 1;
    await sleep(1100);
    expect(readFileSync(dog, 'utf8')).toBe(petted);
    f.close();
    expect(readFileSync(dog, 'utf8')).toBe(`${petted}V`);
  });
});

describe('the fence at the syscall (native/ballast_native.c)', () => {
  const native = loadNative();
  const FENCED = native.constants.FENCED;
  const dir = mkdtempSync(path.join(tmpdir(), 'ballast-fence-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  let n = 0;

  async function backend(f: Fence, opts: { fallocate?: boolean } = {}) {
    const b = await SparseFileBackend.open(path.join(dir, `f${n++}`), {
      size: 1 << 20,
      sharedLock: true,
      fence: f,
      ...opts,
    });
    return b;
  }

  function run(op: (req: IoRequest) => void, offset: number, buf: Buffer): Promise<number> {
    return new Promise((resolve) => {
      op({ offset, length: buf.length, buf, bufOffset: 0, done: resolve });
    });
  }

  const block = (byte: number) => Buffer.alloc(4096, byte);

  it('a write queued before the deadline is refused after it, with no JavaScript running', async () => {
    const lease = new Lease();
    const b = await backend(fence(new Lease()));
    lease.validUntil = performance.now() + 1100; // published deadline: 1 s from now
    const f = fence(lease);
    const token = f.token; // admitted now
    expect(native.pwriteInline(b.fd, block(1), 0, 4096, 0, token)).toBe(4096);
    // The gate is never asked again: as if the agent were frozen.
    while (performance.now() < lease.validUntil - 100) await sleep(100);
    expect(await native.pwriteAsync(b.fd, block(2), 0, 4096, 0, false, token)).toBe(-FENCED);
    expect(native.pwriteInline(b.fd, block(2), 0, 4096, 0, token)).toBe(-FENCED);
    expect(await native.fallocate(b.fd, 0, 0, 4096, token)).toBe(-FENCED);
    expect(
      readFileSync(b.path)
        .subarray(0, 4096)
        .every((x) => x === 1),
    ).toBe(true);
    expect(f.refused()).toBe(3);
    await b.close();
  });

  it('a write admitted before a fence is refused after the fence opened again (epoch)', async () => {
    const lease = new Lease();
    const f = fence(lease);
    const b = await backend(f);
    const before = f.token;
    lease.validUntil = performance.now() - 1;
    expect(f.gate()).toBe('hold');
    lease.validUntil = performance.now() + 10_000;
    f.check();
    expect(f.gate()).toBe('open');
    expect(await native.pwriteAsync(b.fd, block(3), 0, 4096, 0, false, before)).toBe(-FENCED);
    expect(await native.pwriteAsync(b.fd, block(4), 0, 4096, 0, false, f.token)).toBe(4096);
    await b.close();
  });

  it('a deadline that passed with no request asking still fences at the renewal', async () => {
    const lease = new Lease();
    lease.validUntil = performance.now() + 150;
    const f = fence(lease);
    const b = await backend(f);
    const before = f.token;
    await sleep(100); // past the deadline (minus the margin); nobody asks the gate
    lease.validUntil = performance.now() + 10_000; // a late keepalive acknowledgement
    f.check();
    expect(f.fences).toBe(1);
    expect(await native.pwriteAsync(b.fd, block(5), 0, 4096, 0, false, before)).toBe(-FENCED);
    expect(f.gate()).toBe('open'); // renewed and caught up: it opens at once
    await b.close();
  });

  it("the backend's writes, trims and zeroings are refused once fenced, and it stays on its thread", async () => {
    const lease = new Lease();
    const f = fence(lease);
    for (const fallocate of [true, false]) {
      const b = await backend(f, { fallocate });
      expect(b.share()).toBeNull(); // a worker thread has no gate for it
      expect(await run((r) => b.write(r, false), 0, block(7))).toBe(0);
      lease.validUntil = performance.now() - 1;
      expect(f.gate()).toBe('hold');
      expect(await run((r) => b.write(r, false), 0, block(8))).toBe(FENCED);
      expect(await run((r) => b.write(r, true), 4096, block(8))).toBe(FENCED);
      expect(await run((r) => b.trim(r, false), 0, block(0))).toBe(fallocate ? FENCED : 0);
      expect(await run((r) => b.zero(r, false, false, false), 0, block(0))).toBe(FENCED);
      const data = readFileSync(b.path);
      expect(data.subarray(0, 4096).every((x) => x === 7)).toBe(true);
      expect(data.subarray(4096, 8192).every((x) => x === 0)).toBe(true);
      lease.validUntil = performance.now() + 10_000;
      f.check();
      expect(await run((r) => b.write(r, false), 0, block(9))).toBe(0);
      await b.close();
    }
  });

  it('measures the window from the check to the return of the syscall when asked', async () => {
    const f = fence(new Lease());
    const b = await backend(f);
    native.fenceTiming(f.slot, true);
    for (let i = 0; i < 20; i++) {
      expect(await native.pwriteAsync(b.fd, block(i), 0, 4096, i * 4096, false, f.token)).toBe(
        4096,
      );
    }
    native.fenceTiming(f.slot, false);
    const st = native.fenceStats(f.slot);
    expect(st.window.reduce((x, y) => x + y, 0)).toBe(20);
    expect(st.windowNs).toBeGreaterThan(0);
    expect(st.windowMaxNs).toBeLessThanOrEqual(st.windowNs);
    await b.close();
  });
});
