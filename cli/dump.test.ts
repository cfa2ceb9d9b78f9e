import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { emptyCatalog, planDump, recoverInterrupted } from '../dumpd/catalog.js';
import { dumpdRequest, dumpTiming, interrupted } from './dump.js';

const MiB = 2 ** 20;

describe('dump ls: what an entry says about its size and rate', () => {
  it('an interrupted dump has no known size, duration or rate (not 0 B at 0 B/s)', () => {
    const p = planDump(emptyCatalog(), 64 * MiB, { guest: 'g', format: 'elf', now: 1000, keep: 2 });
    const r = recoverInterrupted(p.catalog, 61_000, 'g');
    const e = r!.catalog.entries[0]!;
    expect(interrupted(e)).toBe(true);
    expect(dumpTiming(e)).toEqual({ durationMs: null, bytesPerSecond: null });
  });

  it('a complete dump has its duration and rate', () => {
    const e = {
      createdAt: 1000,
      finishedAt: 3000,
      length: 8 * MiB,
      state: 'complete' as const,
      reason: '',
    };
    expect(interrupted(e)).toBe(false);
    expect(dumpTiming(e)).toEqual({ durationMs: 2000, bytesPerSecond: 4 * MiB });
  });
});

describe('dump now / memory status without dumpd', () => {
  it('says what to check when nothing listens', async () => {
    // a port that was free a moment ago
    const port = await new Promise<number>((resolve) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => resolve(p));
      });
    });
    await expect(dumpdRequest(`127.0.0.1:${port}`, 'GET', '/v1/guests')).rejects.toMatchObject({
      code: 'DUMP_DUMPD_UNREACHABLE',
      message: expect.stringContaining(
        'is `ballast dumpd` running (and listening yet)? Another listener: --dumpd ADDR or BALLAST_DUMPD',
      ),
    });
  });
});
