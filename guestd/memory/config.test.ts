import { describe, expect, it } from 'vitest';
import {
  checkPool,
  DEFAULT_TUNING,
  DEFAULT_WEIGHT,
  MemoryError,
  memoryConfig,
  parseMemoryConfig,
} from './config.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function code(f: () => unknown): { code: string; message: string } {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(MemoryError);
    return { code: (e as MemoryError).code, message: (e as Error).message };
  }
  throw new Error('no error');
}

describe('memory config', () => {
  it('reads the section of policy.md', () => {
    const c = parseMemoryConfig(
      `
listen: 127.0.0.1:9411
guests: []
memory:
  pool: 448M
  interval: 1
  maxStep: 32M
  riseIntervals: 3
  guests:
    - name: vm1
      qmp: /run/qemu/vm1.qmp
      entitlement: 128M
      weight: 200
      max: 256M
      pagingDevice: vm1-swap
      agent: unix:/run/ballast/api.sock
    - name: vm2
      libvirt: qemu:///system
      entitlement: 96M
    - name: vm3
      entitlement: 100663296
`,
      16 * GiB,
    );
    expect(c).not.toBeNull();
    expect(c!.poolBytes).toBe(448 * MiB);
    expect(c!.tuning).toEqual({
      ...DEFAULT_TUNING,
      intervalMs: 1000,
      maxStep: 32 * MiB,
      riseIntervals: 3,
    });
    expect(c!.guests).toEqual([
      {
        name: 'vm1',
        qmp: '/run/qemu/vm1.qmp',
        entitlement: 128 * MiB,
        weight: 200,
        max: 256 * MiB,
        pagingDevice: 'vm1-swap',
        agent: 'unix:/run/ballast/api.sock',
      },
      { name: 'vm2', libvirt: 'qemu:///system', entitlement: 96 * MiB, weight: DEFAULT_WEIGHT },
      { name: 'vm3', entitlement: 96 * MiB, weight: DEFAULT_WEIGHT },
    ]);
  });

  it('is absent from a config without the section', () => {
    expect(parseMemoryConfig('listen: 127.0.0.1:9411\n', GiB)).toBeNull();
  });

  it('takes the pool as host memory minus a reserve', () => {
    const c = memoryConfig({ pool: { hostReserve: '2G' }, guests: [] }, 16 * GiB);
    expect(c.pool).toEqual({ hostReserve: 2 * GiB });
    expect(c.poolBytes).toBe(14 * GiB);
    expect(memoryConfig({ pool: { hostReserve: '2G' } }, GiB).poolBytes).toBe(0);
  });

  it('refuses a pool too small for the entitlements, with the numbers', () => {
    const e = code(() =>
      memoryConfig(
        {
          pool: '448M',
          guests: [
            { name: 'a', entitlement: '200M' },
            { name: 'b', entitlement: '200M' },
            { name: 'c', entitlement: '100M' },
          ],
        },
        16 * GiB,
      ),
    );
    expect(e.code).toBe('MEMORY_POOL_TOO_SMALL');
    expect(e.message).toBe(
      'the entitlements add up to 500 MiB (a 200 MiB + b 200 MiB + c 100 MiB), more than the pool of 448 MiB by 52 MiB: lower an entitlement or grow the pool',
    );
    // the reserve counts against the host's memory when loaded
    expect(
      code(() =>
        memoryConfig(
          { pool: { hostReserve: '1G' }, guests: [{ name: 'a', entitlement: '1G' }] },
          1.5 * GiB,
        ),
      ).code,
    ).toBe('MEMORY_POOL_TOO_SMALL');
    expect(() =>
      checkPool(448 * MiB, [{ name: 'a', entitlement: 448 * MiB, weight: 1 }]),
    ).not.toThrow();
  });

  it.each([
    [{ guests: [] }, /"pool" is required/],
    [{ pool: 'lots' }, /bad memory: pool "lots"/],
    [{ pool: { reserve: '1G' } }, /pool: unknown key "reserve"/],
    [{ pool: '1G', extra: 1 }, /unknown key "extra"/],
    [{ pool: '1G', guests: {} }, /guests must be a list/],
    [{ pool: '1G', guests: [{ entitlement: '1M' }] }, /"name" is required/],
    [{ pool: '1G', guests: [{ name: 'a b', entitlement: '1M' }] }, /bad guest name "a b"/],
    [{ pool: '1G', guests: [{ name: 'a' }] }, /"entitlement" is required/],
    [{ pool: '1G', guests: [{ name: 'a', entitlement: '1M', weight: 0 }] }, /weight must be/],
    [{ pool: '1G', guests: [{ name: 'a', entitlement: '1M', weight: 1.5 }] }, /weight must be/],
    [
      { pool: '1G', guests: [{ name: 'a', entitlement: '200M', max: '100M' }] },
      /entitlement 200 MiB is above max 100 MiB/,
    ],
    [
      {
        pool: '1G',
        guests: [
          { name: 'a', entitlement: '1M' },
          { name: 'a', entitlement: '1M' },
        ],
      },
      /listed twice/,
    ],
    [
      {
        pool: '1G',
        guests: [{ name: 'a', entitlement: '1M', qmp: '/q', libvirt: 'qemu:///system' }],
      },
      /"qmp" or "libvirt", not both/,
    ],
    [
      { pool: '1G', guests: [{ name: 'a', entitlement: '1M', agent: 'x' }] },
      /go with "pagingDevice"/,
    ],
    [{ pool: '1G', interval: 0 }, /interval must be/],
    [{ pool: '1G', riseIntervals: 0 }, /riseIntervals must be/],
    [{ pool: '1G', minChange: '128M' }, /minChange must not be above maxStep/],
    [{ pool: '1G', swapInLow: '2M' }, /swapInLow must not be above swapInHigh/],
    [{ pool: '1G', majorFaultsHigh: -1 }, /majorFaultsHigh must be a number/],
  ])('refuses %j', (raw, msg) => {
    const e = code(() => memoryConfig(raw, 16 * GiB));
    expect(e.code).toBe('MEMORY_BAD_CONFIG');
    expect(e.message).toMatch(msg);
  });

  it('refuses text that is not YAML', () => {
    expect(code(() => parseMemoryConfig('memory: [', GiB)).code).toBe('MEMORY_BAD_CONFIG');
  });
});
