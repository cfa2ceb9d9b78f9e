// What a storage pool sits on: the kind of medium (from sysfs) and how much
// room its filesystem has.
import * as fs from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { BallastError } from './errors.js';

export type Media = 'ssd' | 'hdd' | 'nvme' | 'unknown';

export interface MediaInfo {
  media: Media;
  /** The block device whose queue was read (the whole disk: `sda`, `nvme0n1`, `vda`). */
  device?: string;
}

export interface MediaOptions {
  /** Where sysfs is mounted (tests use a fake tree). Default `/sys`. */
  sysRoot?: string;
  /**
   * The mount table consulted when the filesystem has no device number of its
   * own (btrfs, whose st_dev is anonymous). Default `/proc/self/mountinfo`.
   */
  mountinfo?: string;
}

export interface FsCapacity {
  totalBytes: number;
  /** Free, including blocks reserved for root. */
  freeBytes: number;
  /** Free for an unprivileged user. */
  availBytes: number;
}

/** Enough for LUKS on LVM on md on partitions, and then some; stops loops. */
const MAX_DEPTH = 8;

/** Major and minor numbers of a Linux dev_t (glibc's encoding). */
export function splitDev(dev: bigint | number): [major: number, minor: number] {
  const d = BigInt(dev);
  const major = ((d & 0xfff00n) >> 8n) | ((d & 0xfffff00000000000n) >> 32n);
  const minor = (d & 0xffn) | ((d & 0xffffff00000n) >> 12n);
  return [Number(major), Number(minor)];
}

/**
 * The medium under `dir` (any path works): follows st_dev to its block device
 * in sysfs — a partition to its disk, a device-mapper or md device to its
 * first slave — and reads queue/rotational. `nvme` for a non-rotational
 * device named nvme*; `unknown` when there is no block device (tmpfs,
 * overlay, NFS, ZFS) or anything cannot be read. Never throws.
 */
export async function detectMedia(dir: string, opts: MediaOptions = {}): Promise<MediaInfo> {
  try {
    const st = await fs.promises.stat(dir, { bigint: true });
    let [major, minor] = splitDev(st.dev);
    if (major === 0) {
      const dev = await mountSourceDevice(dir, opts.mountinfo ?? '/proc/self/mountinfo');
      if (dev === undefined) return { media: 'unknown' };
      [major, minor] = splitDev(dev);
    }
    return await mediaOfDevice(major, minor, opts);
  } catch {
    return { media: 'unknown' };
  }
}

/** The medium of block device MAJ:MIN, from sysfs (see detectMedia). Never throws. */
export async function mediaOfDevice(
  major: number,
  minor: number,
  opts: Pick<MediaOptions, 'sysRoot'> = {},
): Promise<MediaInfo> {
  if (major === 0) return { media: 'unknown' };
  const sysRoot = opts.sysRoot ?? '/sys';
  let dir: string;
  try {
    dir = await fs.promises.realpath(join(sysRoot, 'dev', 'block', `${major}:${minor}`));
  } catch {
    return { media: 'unknown' }; // no such block device
  }
  for (let depth = 0; depth < MAX_DEPTH; depth++) {
    if (await exists(join(dir, 'partition'))) {
      dir = dirname(dir); // sda1 -> sda
      continue;
    }
    const slave = await firstEntry(join(dir, 'slaves'));
    if (slave === undefined) break;
    try {
      dir = await fs.promises.realpath(join(dir, 'slaves', slave)); // dm-0 -> sda2
    } catch {
      break;
    }
  }
  // Old kernels have no `partition` file: a device without a queue is looked up in its parent.
  let rotational = await readTrimmed(join(dir, 'queue', 'rotational'));
  if (rotational === undefined) {
    const parent = dirname(dir);
    rotational = await readTrimmed(join(parent, 'queue', 'rotational'));
    if (rotational !== undefined) dir = parent;
  }
  const device = basename(dir);
  if (rotational === '1') return { media: 'hdd', device };
  if (rotational === '0') return { media: device.startsWith('nvme') ? 'nvme' : 'ssd', device };
  return { media: 'unknown', device };
}

/**
 * For a filesystem with an anonymous st_dev (major 0): the device number of
 * the block device its mount names as source (btrfs mounts `/dev/sda2`), or
 * undefined when the source is not a block device (tmpfs, overlay, NFS).
 */
async function mountSourceDevice(dir: string, mountinfo: string): Promise<bigint | undefined> {
  const real = await fs.promises.realpath(dir);
  const text = await fs.promises.readFile(mountinfo, 'utf8');
  let best: { point: string; source: string } | undefined;
  for (const line of text.split('\n')) {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    const point = left[4];
    const source = right[1];
    if (point === undefined || source === undefined) continue;
    const p = unescapeMount(point);
    const inside = p === '/' || real === p || real.startsWith(`${p}/`);
    // The longest mount point wins; among equals, the last (it is mounted over the others).
    if (inside && (best === undefined || p.length >= best.point.length)) {
      best = { point: p, source: unescapeMount(source) };
    }
  }
  if (best === undefined || !best.source.startsWith('/')) return undefined;
  const st = await fs.promises.stat(best.source, { bigint: true });
  return st.isBlockDevice() ? st.rdev : undefined;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) =>
    String.fromCharCode(Number.parseInt(oct, 8)),
  );
}

async function exists(path: string): Promise<boolean> {
  try {
    await fs.promises.access(path);
    return true;
  } catch {
    return false;
  }
}

/** The alphabetically first entry of a directory; undefined if it is empty or missing. */
async function firstEntry(path: string): Promise<string | undefined> {
  try {
    const names = await fs.promises.readdir(path);
    return names.sort()[0];
  } catch {
    return undefined;
  }
}

async function readTrimmed(path: string): Promise<string | undefined> {
  try {
    return (await fs.promises.readFile(path, 'utf8')).trim();
  } catch {
    return undefined;
  }
}

/** Size and free space of the filesystem holding `dir`. */
export async function fsCapacity(dir: string): Promise<FsCapacity> {
  let s: fs.StatsFs;
  try {
    s = await fs.promises.statfs(dir);
  } catch (cause) {
    throw statError(dir, cause);
  }
  // Linux reports f_blocks/f_bfree/f_bavail in units of f_frsize, which Node
  // does not expose; it equals f_bsize on every local filesystem.
  return {
    totalBytes: s.blocks * s.bsize,
    freeBytes: s.bfree * s.bsize,
    availBytes: s.bavail * s.bsize,
  };
}

/** Bytes of storage a (sparse) file actually uses: st_blocks × 512. */
export async function allocatedBytes(path: string): Promise<number> {
  try {
    const st = await fs.promises.stat(path, { bigint: true });
    return Number(st.blocks * 512n);
  } catch (cause) {
    throw statError(path, cause);
  }
}

function statError(path: string, cause: unknown): BallastError {
  const code = (cause as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') {
    return new BallastError('BALLAST_FILE_NOT_FOUND', `${path} does not exist`, { cause });
  }
  return new BallastError('BALLAST_STAT_FAILED', `cannot stat ${path}: ${code ?? String(cause)}`, {
    cause,
  });
}
