// The campaign itself, short and on a fixed seed: three agents on a real
// 3-member etcd, every client and fault kind (docs/cluster.md, "The nemesis
// campaign"), and every checker on the history. The seed fixes the schedule;
// the interleavings vary with the machine's load and the verdict must not.
// A failure prints the anomalies, the operations around each and the schedule;
// `npm run nemesis -- --seed 23 --minutes 2.5 --keep` replays it.

import { rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect, it } from 'vitest';
import { describeWithTools } from '../test/helpers/tools.js';
import { runCampaign } from './campaign.js';
import { report } from './checkers.js';

describeWithTools(['etcd', 'etcdctl'], 'nemesis: a fixed-seed campaign', () => {
  it('seed 23, 150 s of clients and faults: every check passes', async () => {
    // kept only when a check fails, for `npm run nemesis -- --check FILE`
    const historyFile = path.join(os.tmpdir(), `ballast-nemesis-23-${process.pid}.json`);
    const r = await runCampaign({ seed: 23, seconds: 150, historyFile });
    if (r.anomalies.length === 0) rmSync(historyFile, { force: true });
    const counts = Object.values(r.stats.faults).reduce((a, b) => a + b, 0);
    // it did something: operations of every kind and faults of every kind
    expect(r.history.ops.length).toBeGreaterThan(1000);
    expect(counts).toBeGreaterThan(10);
    expect(r.anomalies, `${report(r.history, r.anomalies)}\n  history: ${historyFile}`).toEqual([]);
  }, 1_800_000);
});
