// The nemesis in the suite: a short campaign (about 3 minutes) with a fixed
// seed, every fault kind, and every checker on its history. It decides on what
// happened (the answers the clients got, what the agents and the shared file
// hold at the end), never on how fast: a loaded machine changes the
// interleavings, not the verdict. `npm run nemesis -- --seed N` replays the
// schedule of a failure it prints.

import { expect, it } from 'vitest';
import { describeWithTools } from '../test/helpers/tools.js';
import { runCampaign } from './campaign.js';
import { report } from './checkers.js';

const SEED = 23;

describeWithTools(['etcd', 'etcdctl'], 'nemesis: a short fixed-seed campaign', () => {
  it(`seed ${SEED}: every check passes on the recorded history`, async () => {
    const r = await runCampaign({
      seed: SEED,
      seconds: 90,
      workload: WORKLOAD,
    });
    const counts = r.stats.ops;
    // the run did what it is for: PR changes, I/O done and refused, faults
    expect((counts['pr.ok'] ?? 0) > 20, JSON.stringify(counts)).toBe(true);
    expect((counts['io.ok'] ?? 0) > 200, JSON.stringify(counts)).toBe(true);
    expect(Object.keys(r.stats.faults).length, JSON.stringify(r.stats.faults)).toBeGreaterThan(2);
    expect(r.anomalies, report(r.history, r.anomalies)).toEqual([]);
  }, 900_000);
});

// What this run leaves out while a known defect of issue #23 is still open on
// main (the checkers are the same: `npm run nemesis` runs everything):
// - events: the same event id carries different `time` values (defect 15);
// - malformed: a refusal made before the reservation logic can still go missing
//   from the audit trail while etcd is faulty (defect 9, seen after its fix).
const WORKLOAD = { events: false, malformed: false };
