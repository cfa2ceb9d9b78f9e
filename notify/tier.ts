// Tier changes: a device's tier is the set of media under its extents' pools.
// A pool rescan (periodic, SIGHUP, `ballast pool rescan`) that finds a pool's
// medium changed yields a tier.changed event for every device on that pool;
// a pool crossing its fullness threshold yields pool.full.

import type { Media } from '../agent/config.js';

export interface TierDevice {
  name: string;
  extents: { pool: string }[];
}

/** The sorted set of media under the extents (`unknown` for a pool this host lacks). */
export function tierOf(d: TierDevice, media: (pool: string) => Media | undefined): Media[] {
  return [...new Set(d.extents.map((e) => media(e.pool) ?? 'unknown'))].sort();
}

export interface TierChange {
  device: string;
  before: Media[];
  after: Media[];
  pools: string[];
}

/** The devices whose tier differs between two views of the pools' media. */
export function tierChanges(
  devices: TierDevice[],
  before: (pool: string) => Media | undefined,
  after: (pool: string) => Media | undefined,
): TierChange[] {
  const out: TierChange[] = [];
  for (const d of devices) {
    const b = tierOf(d, before);
    const a = tierOf(d, after);
    if (b.join() !== a.join()) {
      out.push({
        device: d.name,
        before: b,
        after: a,
        pools: [...new Set(d.extents.map((e) => e.pool))],
      });
    }
  }
  return out;
}
