// Storage pools: a directory, the medium under it, a capacity (the
// filesystem's or a quota) and an overcommit limit for thin provisioning.

import { mkdirSync } from 'node:fs';
import type { Media, PoolConfig } from './config.js';
import { BallastError } from './errors.js';
import { detectMedia, fsCapacity } from './media.js';

export interface PoolStatus {
  name: string;
  path: string;
  media: Media;
  mediaSource: 'configured' | 'detected';
  device?: string;
  /** Bytes the pool may hold: the quota, or the filesystem size. */
  capacityBytes: number;
  /** Free on the filesystem (what can really still be written). */
  fsAvailBytes: number;
  overcommit: number;
  /** capacity × overcommit: the most that may be provisioned. */
  limitBytes: number;
  /** Sum of the sizes of the extents in this pool. */
  provisionedBytes: number;
  /** Blocks really in use by those extents. */
  allocatedBytes: number;
}

/** The capacity a hollow agent's pool reports without a quota (it has no file system): 1 PiB. */
export const HOLLOW_CAPACITY = 2 ** 50;

export class Pool {
  media: Media = 'unknown';
  device?: string;

  private constructor(
    readonly config: PoolConfig,
    /** A hollow agent's pool (Pool.hollow): no directory behind it. */
    readonly hollow = false,
  ) {}

  get name(): string {
    return this.config.name;
  }

  get path(): string {
    return this.config.path;
  }

  static async open(config: PoolConfig): Promise<Pool> {
    try {
      mkdirSync(config.path, { recursive: true, mode: 0o700 });
    } catch (e) {
      throw new BallastError(
        'BALLAST_POOL_UNAVAILABLE',
        `pool ${config.name}: cannot create ${config.path}: ${(e as Error).message}`,
      );
    }
    const p = new Pool(config);
    if (config.media) p.media = config.media;
    else {
      const m = await detectMedia(config.path).catch(() => ({
        media: 'unknown' as Media,
        device: undefined,
      }));
      p.media = m.media;
      p.device = m.device;
    }
    return p;
  }

  /**
   * A hollow agent's pool (`ballast agent --hollow`): its name and path as configured,
   * for the cluster to match, and nothing on disk: no directory is made or looked at,
   * the medium is the configured one (or unknown), the capacity the quota (or
   * HOLLOW_CAPACITY).
   */
  static hollow(config: PoolConfig): Pool {
    const p = new Pool(config, true);
    if (config.media) p.media = config.media;
    return p;
  }

  /**
   * Looks at the medium under the pool again (unless configured): a pool on a
   * device whose type changed (a loop device flipped to rotational, storage
   * moved underneath) reports the change.
   */
  async rescan(): Promise<{ before: Media; after: Media } | null> {
    if (this.config.media || this.hollow) return null;
    const before = this.media;
    const m = await detectMedia(this.config.path).catch(() => ({
      media: 'unknown' as Media,
      device: undefined,
    }));
    this.media = m.media;
    this.device = m.device;
    return before === m.media ? null : { before, after: m.media };
  }

  async capacity(): Promise<{ capacityBytes: number; fsAvailBytes: number; limitBytes: number }> {
    const fs = this.hollow
      ? { totalBytes: HOLLOW_CAPACITY, availBytes: this.config.quota ?? HOLLOW_CAPACITY }
      : await fsCapacity(this.path);
    const capacityBytes = this.config.quota ?? fs.totalBytes;
    return {
      capacityBytes,
      fsAvailBytes: fs.availBytes,
      limitBytes: Math.floor(capacityBytes * this.config.overcommit),
    };
  }

  async status(provisionedBytes: number, allocatedBytes: number): Promise<PoolStatus> {
    const c = await this.capacity();
    return {
      name: this.name,
      path: this.path,
      media: this.media,
      mediaSource: this.config.media ? 'configured' : 'detected',
      ...(this.device ? { device: this.device } : {}),
      capacityBytes: c.capacityBytes,
      fsAvailBytes: c.fsAvailBytes,
      overcommit: this.config.overcommit,
      limitBytes: c.limitBytes,
      provisionedBytes,
      allocatedBytes,
    };
  }
}
