import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  allocatedBytes,
  detectMedia,
  fsCapacity,
  type MediaInfo,
  mediaOfDevice,
  splitDev,
} from './media.js';

const MEDIA = ['ssd', 'hdd', 'nvme', 'unknown'];

let dir: string;
let counter = 0;

beforeAll(() => {
  dir = fs.mkdtempSync(join(tmpdir(), 'ballast-media-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function makedev(major: number, minor: number): bigint {
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return (
    ((ma & 0xfffff000n) << 32n) | ((ma & 0xfffn) << 8n) | ((mi & 0xffffff00n) << 12n) | (mi & 0xffn)
  );
}

// ---- a fake sysfs ------------------------------------------------------------

const PCI = 'devices/pci0000:00';
/** Device directories (relative to the sysfs root) and what is in them. */
const TREE: Record<string, { rotational?: string; partition?: boolean; slaves?: string[] }> = {
  [`${PCI}/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda`]: { rotational: '1\n' },
  [`${PCI}/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1`]: { partition: true },
  [`${PCI}/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdb`]: { rotational: '0\n' },
  [`${PCI}/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdb/sdb1`]: { partition: true },
  // An old kernel: a partition without a `partition` file.
  [`${PCI}/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc`]: { rotational: '1\n' },
  [`${PCI}/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdc/sdc1`]: {},
  [`${PCI}/0000:00:1d.0/nvme/nvme0/nvme0n1`]: { rotational: '0\n' },
  [`${PCI}/0000:00:1d.0/nvme/nvme0/nvme0n1/nvme0n1p2`]: { partition: true },
  // dm-0 (LVM) on nvme0n1p2; dm-1 (LUKS) on dm-0; md0 (RAID1) on sdb1 and sda1.
  'devices/virtual/block/dm-0': { rotational: '1\n', slaves: ['nvme0n1p2'] },
  'devices/virtual/block/dm-1': { rotational: '1\n', slaves: ['dm-0'] },
  'devices/virtual/block/md0': { rotational: '0\n', slaves: ['sdb1', 'sda1'] },
  // A dm device without slaves (dm-zero): its own queue.
  'devices/virtual/block/dm-2': { rotational: '0\n', slaves: [] },
  // No queue at all.
  'devices/virtual/block/weird0': {},
};

/** Every device directory by name. */
const BY_NAME = new Map(Object.keys(TREE).map((p) => [p.slice(p.lastIndexOf('/') + 1), p]));

/** A fake sysfs: the device tree, and /sys/dev/block links "MAJ:MIN" -> device name. */
function fakeSys(links: Record<string, string>): string {
  const root = join(dir, `sys${counter++}`);
  for (const [path, d] of Object.entries(TREE)) {
    const full = join(root, path);
    fs.mkdirSync(full, { recursive: true });
    if (d.rotational !== undefined) {
      fs.mkdirSync(join(full, 'queue'), { recursive: true });
      fs.writeFileSync(join(full, 'queue', 'rotational'), d.rotational);
    }
    if (d.partition) fs.writeFileSync(join(full, 'partition'), '1\n');
  }
  for (const [path, d] of Object.entries(TREE)) {
    if (!d.slaves) continue;
    const slaves = join(root, path, 'slaves');
    fs.mkdirSync(slaves);
    for (const s of d.slaves) {
      fs.symlinkSync(relative(slaves, join(root, BY_NAME.get(s)!)), join(slaves, s));
    }
  }
  const block = join(root, 'dev', 'block');
  fs.mkdirSync(block, { recursive: true });
  for (const [majMin, name] of Object.entries(links)) {
    fs.symlinkSync(relative(block, join(root, BY_NAME.get(name)!)), join(block, majMin));
  }
  return root;
}

const SCENARIOS: Array<[name: string, expected: MediaInfo]> = [
  ['sda', { media: 'hdd', device: 'sda' }],
  ['sda1', { media: 'hdd', device: 'sda' }],
  ['sdb', { media: 'ssd', device: 'sdb' }],
  ['sdb1', { media: 'ssd', device: 'sdb' }],
  ['sdc1', { media: 'hdd', device: 'sdc' }],
  ['nvme0n1', { media: 'nvme', device: 'nvme0n1' }],
  ['nvme0n1p2', { media: 'nvme', device: 'nvme0n1' }],
  ['dm-0', { media: 'nvme', device: 'nvme0n1' }],
  ['dm-1', { media: 'nvme', device: 'nvme0n1' }],
  ['md0', { media: 'hdd', device: 'sda' }],
  ['dm-2', { media: 'ssd', device: 'dm-2' }],
  ['weird0', { media: 'unknown', device: 'weird0' }],
];

/** A real path on a filesystem with a real (non-anonymous) device number. */
function realDeviceDir(): { path: string; major: number; minor: number } | undefined {
  for (const path of [tmpdir(), process.cwd(), '/', '/etc', '/var']) {
    try {
      const [major, minor] = splitDev(fs.statSync(path, { bigint: true }).dev);
      if (major !== 0) return { path, major, minor };
    } catch {
      // try the next
    }
  }
  return undefined;
}

/** Any block device node in /dev (for the mountinfo fallback). */
function someBlockDevice(): { path: string; major: number; minor: number } | undefined {
  let names: string[];
  try {
    names = fs.readdirSync('/dev');
  } catch {
    return undefined;
  }
  for (const name of names.sort()) {
    const path = join('/dev', name);
    try {
      const st = fs.statSync(path, { bigint: true });
      if (st.isBlockDevice()) {
        const [major, minor] = splitDev(st.rdev);
        return { path, major, minor };
      }
    } catch {
      // not ours to read
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------

describe('splitDev', () => {
  it('decodes glibc dev_t numbers', () => {
    for (const [major, minor] of [
      [8, 1],
      [259, 3],
      [253, 0],
      [4095, 255],
      [4096, 256],
      [65535, 1048575],
      [0, 21],
    ] as const) {
      expect(splitDev(makedev(major, minor))).toEqual([major, minor]);
      expect(splitDev(Number(makedev(major, minor)))).toEqual([major, minor]);
    }
  });
});

describe('mediaOfDevice with a fake sysfs', () => {
  const links: Record<string, string> = {};
  SCENARIOS.forEach(([name], i) => {
    links[`300:${i}`] = name;
  });
  let sysRoot: string;
  beforeAll(() => {
    sysRoot = fakeSys(links);
  });

  SCENARIOS.forEach(([name, expected], i) => {
    it(`${name} -> ${expected.media} (${expected.device})`, async () => {
      expect(await mediaOfDevice(300, i, { sysRoot })).toEqual(expected);
    });
  });

  it('a device sysfs does not know, or major 0, is unknown', async () => {
    expect(await mediaOfDevice(300, 999, { sysRoot })).toEqual({ media: 'unknown' });
    expect(await mediaOfDevice(0, 0, { sysRoot })).toEqual({ media: 'unknown' });
    expect(await mediaOfDevice(8, 0, { sysRoot: join(dir, 'nowhere') })).toEqual({
      media: 'unknown',
    });
  });

  it('gives up on a loop of slaves', async () => {
    const root = join(dir, `loop${counter++}`);
    const a = join(root, 'devices/virtual/block/dm-8');
    const b = join(root, 'devices/virtual/block/dm-9');
    fs.mkdirSync(join(a, 'slaves'), { recursive: true });
    fs.mkdirSync(join(b, 'slaves'), { recursive: true });
    fs.symlinkSync('../../dm-9', join(a, 'slaves', 'dm-9'));
    fs.symlinkSync('../../dm-8', join(b, 'slaves', 'dm-8'));
    fs.mkdirSync(join(root, 'dev/block'), { recursive: true });
    fs.symlinkSync('../../devices/virtual/block/dm-8', join(root, 'dev/block/253:8'));
    const got = await mediaOfDevice(253, 8, { sysRoot: root });
    expect(got.media).toBe('unknown');
  });
});

describe('detectMedia', () => {
  it('on the temp directory and / returns one of the four without throwing', async () => {
    for (const path of [tmpdir(), '/', dir]) {
      const got = await detectMedia(path);
      expect(MEDIA).toContain(got.media);
      if (got.device !== undefined) expect(got.device).toMatch(/^[^/]+$/);
    }
  });

  it('is unknown for a path that does not exist', async () => {
    expect(await detectMedia(join(dir, 'missing'))).toEqual({ media: 'unknown' });
  });

  it.skipIf(!fs.existsSync('/dev/shm'))('is unknown on tmpfs', async () => {
    const [major] = splitDev(fs.statSync('/dev/shm', { bigint: true }).dev);
    if (major !== 0) return; // not a tmpfs here
    expect((await detectMedia('/dev/shm')).media).toBe('unknown');
  });

  const real = realDeviceDir();
  it.skipIf(real === undefined)('follows the directory’s st_dev into a fake sysfs', async () => {
    const { path, major, minor } = real!;
    for (const [name, expected] of SCENARIOS) {
      const sysRoot = fakeSys({ [`${major}:${minor}`]: name });
      expect(await detectMedia(path, { sysRoot }), name).toEqual(expected);
    }
    // A sysfs without the device.
    expect(await detectMedia(path, { sysRoot: fakeSys({}) })).toEqual({ media: 'unknown' });
  });

  describe('on a filesystem with an anonymous device (btrfs)', () => {
    // /proc has st_dev major 0 on every Linux system.
    function mountinfo(lines: string[]): string {
      const path = join(dir, `mountinfo${counter++}`);
      fs.writeFileSync(path, `${lines.join('\n')}\n`);
      return path;
    }

    const blk = someBlockDevice();
    it.skipIf(blk === undefined)('uses the block device its mount names', async () => {
      const { path, major, minor } = blk!;
      const sysRoot = fakeSys({ [`${major}:${minor}`]: 'nvme0n1p2' });
      const info = mountinfo([
        '1 0 254:0 / / rw,relatime - ext4 /dev/root rw',
        `22 1 0:21 / /proc rw,relatime shared:5 - btrfs ${path} rw,subvol=/`,
        '23 22 0:22 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw',
      ]);
      expect(await detectMedia('/proc', { sysRoot, mountinfo: info })).toEqual({
        media: 'nvme',
        device: 'nvme0n1',
      });
    });

    it('is unknown for overlay, tmpfs and network sources', async () => {
      const sysRoot = fakeSys({});
      for (const [type, source] of [
        ['overlay', 'overlay'],
        ['tmpfs', 'tmpfs'],
        ['nfs4', 'server:/export'],
        ['btrfs', join(dir, 'not-a-device')],
      ]) {
        const info = mountinfo([`22 1 0:21 / /proc rw - ${type} ${source} rw`]);
        expect(await detectMedia('/proc', { sysRoot, mountinfo: info })).toEqual({
          media: 'unknown',
        });
      }
      expect(await detectMedia('/proc', { sysRoot, mountinfo: join(dir, 'none') })).toEqual({
        media: 'unknown',
      });
    });

    it.skipIf(blk === undefined)(
      'picks the longest mount point, and the last of equals',
      async () => {
        const { path, major, minor } = blk!;
        const sysRoot = fakeSys({ [`${major}:${minor}`]: 'sdb' });
        const info = mountinfo([
          `1 0 254:0 / / rw - btrfs ${path} rw`,
          '22 1 0:21 / /proc rw - proc proc rw',
          `30 1 0:40 / /pro rw - btrfs ${path} rw`,
        ]);
        expect(await detectMedia('/proc', { sysRoot, mountinfo: info })).toEqual({
          media: 'unknown',
        });
        const over = mountinfo([
          '22 1 0:21 / /proc rw - proc proc rw',
          `23 1 0:21 / /proc rw - btrfs ${path} rw`,
        ]);
        expect(await detectMedia('/proc', { sysRoot, mountinfo: over })).toEqual({
          media: 'ssd',
          device: 'sdb',
        });
      },
    );
  });
});

describe('fsCapacity', () => {
  it('reports sane numbers', async () => {
    for (const path of [tmpdir(), '/', dir]) {
      const c = await fsCapacity(path);
      expect(c.availBytes).toBeGreaterThan(0);
      expect(c.totalBytes).toBeGreaterThanOrEqual(c.freeBytes);
      expect(c.freeBytes).toBeGreaterThanOrEqual(c.availBytes);
      for (const v of Object.values(c)) expect(Number.isSafeInteger(v)).toBe(true);
    }
  });

  it('fails with a code for a missing directory', async () => {
    await expect(fsCapacity(join(dir, 'missing'))).rejects.toMatchObject({
      code: 'BALLAST_FILE_NOT_FOUND',
    });
  });
});

describe('allocatedBytes', () => {
  it('counts only allocated blocks of a sparse file', async () => {
    const path = join(dir, `sparse${counter++}`);
    fs.writeFileSync(path, '');
    fs.truncateSync(path, 64 * 1024 * 1024);
    const empty = await allocatedBytes(path);
    expect(empty).toBeLessThan(1024 * 1024);
    const fd = fs.openSync(path, 'r+');
    fs.writeSync(fd, Buffer.alloc(256 * 1024, 1), 0, 256 * 1024, 8 * 1024 * 1024);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const used = await allocatedBytes(path);
    expect(used).toBeGreaterThanOrEqual(empty + 256 * 1024);
    expect(used).toBe(Number(fs.statSync(path, { bigint: true }).blocks) * 512);
    expect(used % 512).toBe(0);
  });

  it('fails with a code for a missing file', async () => {
    await expect(allocatedBytes(join(dir, 'missing'))).rejects.toMatchObject({
      code: 'BALLAST_FILE_NOT_FOUND',
    });
  });
});

// Keep `dirname` honest for readers of the fixture: a partition's disk is its parent directory.
it('fixture: every partition sits inside its disk', () => {
  for (const [path, d] of Object.entries(TREE)) {
    if (d.partition) expect(TREE[dirname(path)]?.rotational).toBeDefined();
  }
});
