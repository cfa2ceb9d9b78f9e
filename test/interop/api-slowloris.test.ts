// An HTTP slowloris against the agent's TCP API: hundreds of connections that
// send their headers a byte at a time. `ballast device ls` goes on working,
// on the Unix socket and over TCP, with the agent's default limits.

import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { describeRun } from '../helpers/tools.js';

const SLOW = 400; // over the default cap of 128 per listener

describe.runIf(process.getuid?.() === 0)('API slowloris', () => {
  let agent: AgentHandle;
  const socks: net.Socket[] = [];
  let drip: NodeJS.Timeout | undefined;

  beforeAll(async () => {
    agent = await startAgent();
    expect((await agent.cli('device', 'create', 'vm1-swap', '--size', '8M')).code).toBe(0);
  }, 60_000);

  afterAll(async () => {
    clearInterval(drip);
    for (const s of socks) s.destroy();
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it('does not stop `ballast device ls`', async () => {
    for (let i = 0; i < SLOW; i++) {
      const s = net.connect(agent.apiPort, '127.0.0.1');
      s.on('error', () => {});
      s.write(`GET /v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\n`);
      socks.push(s);
    }
    drip = setInterval(() => {
      for (const s of socks) if (!s.destroyed) s.write('X');
    }, 500);
    await new Promise((r) => setTimeout(r, 1000));

    const viaSocket = await agent.cli('device', 'ls');
    expect(viaSocket.code, describeRun(viaSocket)).toBe(0);
    expect(viaSocket.stdout).toContain('vm1-swap');
    const viaTcp = await agent.cliTcp('device', 'ls');
    expect(viaTcp.code, describeRun(viaTcp)).toBe(0);
    expect(viaTcp.stdout).toContain('vm1-swap');
    // No more than the cap are held open.
    await new Promise((r) => setTimeout(r, 500));
    expect(socks.filter((s) => !s.destroyed && !s.closed).length).toBeLessThanOrEqual(128);
  }, 60_000);
});
