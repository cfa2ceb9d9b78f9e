// dumpd tells the agent of a guest's dump device about each dump (POST /v1/events), so
// that the agent's notification recipients learn of it: a real agent, a real QEMU
// without a guest OS (-S: memory to dump, nothing to boot), `ballast events` reading
// the agent's event log. A post that cannot reach the agent is logged and the dump
// stands.

import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { postDumpEvent, resolveDevice } from '../../cli/dump.js';
import { parseConfig } from '../../dumpd/config.js';
import { Dumpd } from '../../dumpd/daemon.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { startQemu } from '../helpers/qemu.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';

/** As `ballast events --json` prints them: CloudEvents. */
interface LoggedEvent {
  id: string;
  type: string;
  subject?: string;
  data: Record<string, unknown>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describeWithTools(['qemu-system-x86_64'], 'dumpd posts dump events to its agent', () => {
  let agent: AgentHandle;
  let dir: string;
  const dumpds: Dumpd[] = [];

  const dumpEvents = async (): Promise<LoggedEvent[]> => {
    const r = await agent.cli('events', '--json', '--types', 'dump.*');
    expect(r.code, r.stderr).toBe(0);
    return r.stdout
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as LoggedEvent);
  };

  const dumpd = async (guest: string, agentAddr: string, log: string[]) => {
    const cfg = parseConfig(`
listen: 127.0.0.1:0
runDir: ${path.join(dir, 'run')}
defaults: { format: elf, after: none, keep: 2 }
guests:
  - { name: ${guest}, qmp: ${path.join(dir, `${guest}.qmp`)}, agent: "unix:${agent.apiSocket}", agentDevice: ${guest}-dump }
`);
    const d = new Dumpd(cfg, {
      resolveDevice: (ref) => resolveDevice(ref),
      // The device is reached through the agent; the events go to agentAddr.
      postEvent: (ref, ev) => postDumpEvent({ ...ref, agent: agentAddr }, ev),
      log: (s) => log.push(s),
    });
    dumpds.push(d);
    await d.start();
    for (let i = 0; !d.connectedGuests().includes(guest); i++) {
      if (i > 400) throw new Error(`dumpd never connected to ${guest}`);
      await sleep(50);
    }
    return d;
  };

  beforeAll(async () => {
    dir = makeTempDir('ballast-dd-ev-');
    agent = await startAgent();
    for (const name of ['e1-dump', 'e2-dump']) {
      const r = await agent.api('POST', '/v1/devices', { name, size: '64M', role: 'dump' });
      expect(r.status, r.text).toBe(201);
    }
    for (const g of ['e1', 'e2'])
      await startQemu(['-machine', 'pc,accel=tcg', '-m', '16', '-S'], {
        dir,
        qmp: path.join(dir, `${g}.qmp`),
      });
  });

  afterAll(async () => {
    for (const d of dumpds) await d.stop();
    await agent?.stop();
  });

  it('a dump produces a dump.completed event in the agent’s event log', async () => {
    const log: string[] = [];
    const d = await dumpd('e1', `unix:${agent.apiSocket}`, log);
    const r = await d.dump('e1', { after: 'none' });
    expect(r.ok, JSON.stringify(r)).toBe(true);
    let evs: LoggedEvent[] = [];
    for (let i = 0; i < 100 && evs.length === 0; i++) {
      evs = await dumpEvents();
      if (evs.length === 0) await sleep(100);
    }
    expect(evs).toHaveLength(1);
    expect(evs[0]).toMatchObject({
      type: 'io.ballast.dump.completed',
      subject: 'e1-dump',
      data: {
        guest: 'e1',
        device: 'e1-dump',
        id: r.entry?.id,
        state: 'complete',
        format: 'elf',
        bytes: r.bytes,
        checksum: r.entry?.checksum,
        mode: 'dump-then-reboot',
      },
    });
    expect(log).toContain('guest e1: dump.completed posted to the agent of e1-dump');
  });

  it('an agent that cannot be reached for the event: logged, the dump stands', async () => {
    const log: string[] = [];
    const nowhere = path.join(dir, 'no-agent.sock');
    const d = await dumpd('e2', `unix:${nowhere}`, log);
    const r = await d.dump('e2', { after: 'none' });
    expect(r.ok, JSON.stringify(r)).toBe(true);
    for (let i = 0; i < 100 && !log.some((l) => l.includes('not posted')); i++) await sleep(50);
    const warning = log.find((l) => l.includes('not posted'));
    expect(warning).toMatch(
      /^guest e2: warning: dump.completed not posted to the agent of e2-dump: .*no-agent\.sock/,
    );
    // Nothing reached the real agent about e2, and e1's event is still the only one.
    expect((await dumpEvents()).map((e) => e.subject)).toEqual(['e1-dump']);
    const ls = await agent.cli('dump', 'ls', 'e2-dump', '--agent', `unix:${agent.apiSocket}`);
    expect(ls.code, ls.stderr).toBe(0);
    expect(ls.stdout).toMatch(/\n1 +e2 +elf +complete /);
  });
});
