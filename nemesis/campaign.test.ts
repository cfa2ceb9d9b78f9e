// The campaign itself, short and on a fixed seed: three agents on a real
// 3-member etcd, every client and fault kind (docs/cluster.md, "The nemesis
// campaign"), and every checker on the history. The seed fixes the schedule;
// the interleavings vary with the machine's load and the verdict must not.
// A failure prints the anomalies, the operations around each and the schedule;
// `npm run nemesis -- --seed 23 --minutes 2.5 --keep` replays it.

import { expect, it } from 'vitest';
import { describeWithTools } from '../test/helpers/tools.js';
import { runCampaign } from './campaign.js';
import { report } from './checkers.js';

describeWithTools(['etcd', 'etcdctl'], 'nemesis: a fixed-seed campaign', () => {
  it('seed 23, 150 s of clients and faults: every check passes', async () => {
    const r = await runCampaign({ seed: 23, seconds: 150 });
    const counts = Object.values(r.stats.faults).reduce((a, b) => a + b, 0);
    // it did something: operations of every kind and faults of every kind
    expect(r.history.ops.length).toBeGreaterThan(1000);
    expect(counts).toBeGreaterThan(10);
    expect(r.anomalies, report(r.history, r.anomalies)).toEqual([]);
  }, 1_800_000);
});
