import { describe, expect, it } from 'vitest';
import { pagingState } from './paging.js';
import {
  deviceBytes,
  guestRamMapping,
  listenerInode,
  meminfoField,
  parseGuestStats,
  parseSmaps,
  psiAvg10,
} from './sources.js';

const MiB = 1024 * 1024;

// Trimmed from a QEMU 7.2 (TCG, -m 128, memory-backend-memfd) process here.
const SMAPS = `55d1c0a00000-55d1c0b00000 r-xp 00000000 08:01 123  /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
7f29affff000-7f29b7fff000 rw-s 00000000 00:01 1994                       /memfd:memory-backend-memfd (deleted)
Size:             131072 kB
KernelPageSize:        4 kB
Rss:               40960 kB
7f29b8000000-7f29f7fff000 rwxp 00000000 00:00 0 
Size:            1048572 kB
Rss:               65536 kB
7f2a00000000-7f2a08200000 rw-p 00000000 00:00 0 
Size:             133120 kB
Rss:                1024 kB
`;

describe('host and process readers', () => {
  it('reads MemAvailable and PSI', () => {
    expect(
      meminfoField('MemTotal:       16384000 kB\nMemAvailable:    8000000 kB\n', 'MemAvailable'),
    ).toBe(8000000 * 1024);
    expect(meminfoField('MemTotal: 1 kB\n', 'MemAvailable')).toBeNull();
    const psi =
      'some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\nfull avg10=0.75 avg60=0.10 avg300=0.00 total=2345\n';
    expect(psiAvg10(psi)).toBe(0.75);
    expect(psiAvg10(psi, 'some')).toBe(1.5);
    expect(psiAvg10('')).toBe(0);
  });

  it('finds the guest RAM mapping, not the translation buffer nor other anonymous memory', () => {
    const maps = parseSmaps(SMAPS);
    expect(maps).toHaveLength(4);
    const m = guestRamMapping(maps, 128 * MiB);
    expect(m?.name).toBe('/memfd:memory-backend-memfd (deleted)');
    expect(m?.rss).toBe(40 * MiB);
    // without a named backend: the anonymous mapping of the RAM's size (plus alignment)
    const anon = guestRamMapping(
      maps.filter((x) => !x.name.includes('memfd')),
      128 * MiB,
    );
    expect(anon?.size).toBe(133120 * 1024);
    expect(guestRamMapping(maps, 512 * MiB)).toBeNull();
  });

  it('finds the listening socket of a path in /proc/net/unix', () => {
    const t = `Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000003 00000000 00000000 0001 03 130261 /tmp/mq.sock
00000000d770614d: 00000002 00000000 00010000 0001 01 130260 /tmp/mq.sock
00000000d7706150: 00000002 00000000 00010000 0001 01 130270 /tmp/other.sock
`;
    expect(listenerInode(t, '/tmp/mq.sock')).toBe(130260);
    expect(listenerInode(t, '/tmp/none.sock')).toBeNull();
  });
});

describe('guest-stats', () => {
  it('reads the counters and drops the ones the guest did not give (2^64-1)', () => {
    // QEMU's 2^64-1 as JSON.parse reads it
    const none = JSON.parse('18446744073709551615') as number;
    expect(
      parseGuestStats({
        stats: {
          'stat-swap-in': 4096,
          'stat-swap-out': 8192,
          'stat-major-faults': 12,
          'stat-available-memory': 100 * MiB,
          'stat-total-memory': 120 * MiB,
          'stat-free-memory': none,
        },
        'last-update': 1700000000,
      }),
    ).toEqual({
      updatedAt: 1700000000,
      swapIn: 4096,
      swapOut: 8192,
      majorFaults: 12,
      available: 100 * MiB,
      total: 120 * MiB,
    });
    expect(parseGuestStats({ stats: { 'stat-swap-in': none }, 'last-update': 5 })).toEqual({
      updatedAt: 5,
    });
  });

  it('is nothing while the guest has sent no statistics', () => {
    expect(parseGuestStats({ stats: {}, 'last-update': 0 })).toBeNull();
    expect(parseGuestStats(null)).toBeNull();
  });
});

describe('the paging device', () => {
  it("sums a device's read and write bytes from the agent's /metrics", () => {
    const text = `# HELP ballast_nbd_bytes_total Bytes read or written by NBD requests
ballast_nbd_bytes_total{device="vm1-swap",op="read"} 4096
ballast_nbd_bytes_total{device="vm1-swap",op="write"} 12288
ballast_nbd_bytes_total{device="vm1-swap2",op="read"} 99
ballast_nbd_requests_total{device="vm1-swap",op="read"} 1
`;
    expect(deviceBytes(text, 'vm1-swap')).toEqual({ read: 4096, write: 12288 });
    expect(deviceBytes(text, 'nope')).toEqual({ read: 0, write: 0 });
  });

  const view = {
    state: 'ready',
    size: 256 * MiB,
    allocatedBytes: 10 * MiB,
    connections: 1,
    extents: [{ pool: 'p' }],
  };
  it('is ok when attached with room in its pool', () => {
    expect(pagingState(view, new Map([['p', 1024 * MiB]]), 64 * MiB)).toEqual({ state: 'ok' });
  });
  it('is full when its pool cannot take a step of swap-out', () => {
    expect(pagingState(view, new Map([['p', 8 * MiB]]), 64 * MiB).state).toBe('full');
    // fully allocated: swap-out rewrites allocated blocks and needs no room
    expect(
      pagingState({ ...view, allocatedBytes: 256 * MiB }, new Map([['p', 0]]), 64 * MiB).state,
    ).toBe('ok');
  });
  it('is unreachable when not attached or not served', () => {
    expect(pagingState({ ...view, connections: 0 }, new Map(), 64 * MiB)).toEqual({
      state: 'unreachable',
      why: 'no client attached',
    });
    expect(
      pagingState({ ...view, state: 'missing', problem: 'file gone' }, new Map(), 64 * MiB),
    ).toEqual({ state: 'unreachable', why: 'device missing: file gone' });
  });
});
