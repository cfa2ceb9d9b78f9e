// Requests refused before they reach the reservation logic (a bad type, key
// or action) are on the device's audit trail too, as docs/errors.md says of
// every refused change; the reservation state is untouched.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';

describe.runIf(process.getuid?.() === 0)('PR audit of malformed requests', () => {
  let agent: AgentHandle;

  beforeAll(async () => {
    agent = await startAgent();
    expect((await agent.cli('device', 'create', 'swap0', '--size', '4M')).code).toBe(0);
  }, 60_000);

  afterAll(async () => {
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it('PR_BAD_TYPE, PR_BAD_KEY and PR_INVALID_REQUEST are audited', async () => {
    const post = (body: unknown) => agent.api('POST', '/v1/devices/swap0/pr', body);
    const ok = await post({ action: 'register', as: 'host-a', key: '0', saKey: '0xa' });
    expect(ok.status, ok.text).toBe(200);
    const badType = await post({ action: 'reserve', as: 'host-a', key: '0xa', type: 2 });
    expect([badType.status, badType.body.code]).toEqual([400, 'PR_BAD_TYPE']);
    const badKey = await post({ action: 'register', as: 'host-b', key: '0', saKey: 'zz' });
    expect([badKey.status, badKey.body.code]).toEqual([400, 'PR_BAD_KEY']);
    const badAction = await post({ action: 'steal', as: 'host-c', key: '0x1' });
    expect([badAction.status, badAction.body.code]).toEqual([400, 'PR_INVALID_REQUEST']);

    const audit = (await agent.api('GET', '/v1/devices/swap0/pr/audit')).body as {
      entries: { seq: number; actor: string; initiator: string; outcome: string; code?: string }[];
    };
    expect(audit.entries.map((e) => [e.seq, e.initiator, e.outcome, e.code ?? null])).toEqual([
      [0, 'host-a', 'changed', null],
      [1, 'host-a', 'refused', 'PR_BAD_TYPE'],
      [2, 'host-b', 'refused', 'PR_BAD_KEY'],
      [3, 'host-c', 'refused', 'PR_INVALID_REQUEST'],
    ]);
    expect(audit.entries.every((e) => e.actor === 'uid:0')).toBe(true);
    // The state is what the one good request made it, and survives a restart.
    await agent.stop();
    await agent.start();
    const show = (await agent.api('GET', '/v1/devices/swap0/pr')).body as {
      generation: number;
      registrations: { identity: string }[];
    };
    expect(show.registrations.map((r) => r.identity)).toEqual(['host-a']);
    expect(show.generation).toBe(1);
    const after = await agent.api('POST', '/v1/devices/swap0/pr', {
      action: 'reserve',
      as: 'host-a',
      key: '0xa',
      type: 'WE',
    });
    expect(after.status, after.text).toBe(200);
    const audit2 = (await agent.api('GET', '/v1/devices/swap0/pr/audit')).body as {
      entries: { seq: number }[];
    };
    expect(audit2.entries.map((e) => e.seq)).toEqual([0, 1, 2, 3, 4]);
  }, 60_000);
});
