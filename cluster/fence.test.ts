import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterEach, describe, expect, it, vi } from 'vitest';
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
