import { describe, expect, it } from 'vitest';
import { DEFAULT_QUOTA, judgeSizing } from './sizing.js';

const GiB = 1024 ** 3;
const base = {
  dbSize: 100 * 1024 * 1024,
  quota: 8 * GiB,
  revision: 5000,
  compactRevision: 4000,
  devices: 200,
  members: 3,
};

describe('what the agent expects of etcd', () => {
  it('is quiet about a small cluster on the default quota, or a large one on a raised quota', () => {
    expect(judgeSizing({ ...base, quota: DEFAULT_QUOTA })).toEqual([]);
    expect(judgeSizing({ ...base, devices: 100_000, members: 1000 })).toEqual([]);
    expect(judgeSizing({ ...base, quota: null, devices: 100_000 })).toEqual([]);
  });

  it('asks for a larger quota when a large cluster runs on the default', () => {
    for (const large of [{ devices: 10_000 }, { members: 100 }]) {
      const w = judgeSizing({ ...base, quota: DEFAULT_QUOTA, ...large });
      expect(w).toHaveLength(1);
      expect(w[0]).toMatch(/--quota-backend-bytes=8589934592/);
    }
  });

  it('warns when the database is past half its quota, and when nothing compacts the history', () => {
    const full = judgeSizing({ ...base, dbSize: 5 * GiB });
    expect(full).toHaveLength(1);
    expect(full[0]).toMatch(/5120 MiB of its 8192 MiB quota.*NOSPACE/);
    const never = judgeSizing({ ...base, revision: 2_000_002, compactRevision: 0 });
    expect(never).toHaveLength(1);
    expect(never[0]).toMatch(/2000001 revisions of history.*--auto-compaction-mode=periodic/);
    expect(judgeSizing({ ...base, revision: 2_000_002, compactRevision: 1_500_000 })).toEqual([]);
  });
});
