// Each checker can fail: a bug put into one agent on purpose (agent/failpoints.ts
// `injected`), a short scripted scenario on a real etcd and three agents, and
// the checker that must catch it. The scenarios decide on what happened (the
// answers the clients got), never on how long anything took.

import { expect, it } from 'vitest';
import { describeWithTools } from '../test/helpers/tools.js';
import { runCampaign, type ScriptContext } from './campaign.js';
import { report } from './checkers.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Writes as `identity` through `host` until stop() (each write waits for the last). */
function writer(ctx: ScriptContext, identity: string, host: string, first: number) {
  let on = true;
  const done = (async () => {
    for (let i = 0; on; i++) {
      await ctx.io(identity, host, 'p0', 'write', first + (i % 4));
      await sleep(10);
    }
  })();
  return async () => {
    on = false;
    await done;
  };
}

async function holder(ctx: ScriptContext, type: number): Promise<void> {
  for (const [host, req] of [
    ['a', { action: 'register', as: 'host-a', key: '0x0', saKey: '0xa1' }],
    ['a', { action: 'reserve', as: 'host-a', key: '0xa1', type }],
    ['b', { action: 'register', as: 'host-b', key: '0x0', saKey: '0xb1' }],
  ] as const) {
    const op = await ctx.pr(host, 'p0', req);
    expect(op.status, op.note).toBe('ok');
  }
}

describeWithTools(['etcd', 'etcdctl'], 'nemesis: injected bugs are caught', () => {
  it('a grant applied early on one agent: both holders write in turn (io-allowed)', async () => {
    const r = await runCampaign({
      seed: 101,
      seconds: 0,
      agentEnv: { c: { BALLAST_FAILPOINTS: 'pr-grant-early' } },
      script: async (ctx) => {
        await holder(ctx, 1);
        const stopA = writer(ctx, 'host-a', 'a', 0);
        const stopB = writer(ctx, 'host-b', 'c', 4);
        ctx.partition('a');
        // a keeps serving host-a until its lease runs out; the preempt waits for that
        const pa = await ctx.pr('b', 'p0', {
          action: 'preempt-abort',
          as: 'host-b',
          key: '0xb1',
          saKey: '0xa1',
          type: 1,
        });
        expect(pa.status, pa.note).toBe('ok');
        await stopA();
        await stopB();
        ctx.heal('a');
      },
    });
    const found = r.anomalies.filter((a) => a.check === 'io-allowed');
    expect(found.length, report(r.history, r.anomalies)).toBeGreaterThan(0);
    expect(found[0]!.message).toMatch(/write through [ac] done/);
  }, 240_000);

  it('an abort skipped on one agent: the preempted connection still answers (abort)', async () => {
    const r = await runCampaign({
      seed: 102,
      seconds: 0,
      agentEnv: { c: { BALLAST_FAILPOINTS: 'pr-abort-skip' } },
      script: async (ctx) => {
        await holder(ctx, 3);
        await ctx.io('host-a', 'c', 'p0', 'write', 0);
        const pa = await ctx.pr('a', 'p0', {
          action: 'preempt-abort',
          as: 'host-b',
          key: '0xb1',
          saKey: '0xa1',
          type: 3,
        });
        expect(pa.status, pa.note).toBe('ok');
        await ctx.io('host-a', 'c', 'p0', 'write', 1);
      },
    });
    expect(
      r.anomalies.map((a) => a.check),
      report(r.history, r.anomalies),
    ).toContain('abort');
  }, 240_000);

  it('an event dropped on one agent: its follow stream misses it (events)', async () => {
    const r = await runCampaign({
      seed: 103,
      seconds: 0,
      agentEnv: { b: { BALLAST_FAILPOINTS: 'event-drop' } },
      script: async (ctx) => {
        for (const entries of [[{ identity: 'host-a', access: 'rw' }], null]) {
          const op = await ctx.acl('a', 'p0', entries);
          expect(op.status, op.note).toBe('ok');
        }
      },
    });
    const events = r.anomalies.filter((a) => a.check === 'events');
    expect(events.map((a) => a.message).join('\n'), report(r.history, r.anomalies)).toMatch(
      /follow stream of b: 1 event\(s\) never delivered/,
    );
  }, 240_000);
});
