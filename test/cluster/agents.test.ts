// Several agents, one catalog in a real 3-member etcd on loopback: each agent a
// "host" of its own (data dir, sockets, ports), one shared pool directory all of
// them declare. Real NBD clients (qemu-io, nbdinfo) judge the data path.

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { FaultProxy } from '../harness/fault-proxy.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { idKey, Receiver } from '../helpers/receiver.js';
import { BALLAST_BIN, makeTempDir } from '../helpers/server.js';
import { describeWithTools, run } from '../helpers/tools.js';
import { until as waitUntil } from '../helpers/wait.js';

const until = (what: string, pred: () => boolean | Promise<boolean>, ms = 15_000) =>
  waitUntil(what, pred, ms);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Dev {
  name: string;
  state: string;
  size: number;
  hosts?: string[];
}

async function qemuIo(uri: string, ...cmds: string[]) {
  return run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])]);
}

async function devices(a: AgentHandle): Promise<{ devices: Dev[]; stale?: unknown }> {
  const r = await a.api('GET', '/v1/devices');
  expect(r.status).toBe(200);
  return r.body as unknown as { devices: Dev[]; stale?: unknown };
}

describeWithTools(['etcd', 'etcdctl', 'qemu-io', 'nbdinfo'], 'cluster: agents on one etcd', () => {
  let etcd: EtcdCluster;
  let shared: string;
  const started: AgentHandle[] = [];

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    shared = makeTempDir('ballast-shared-');
  }, 60_000);
  afterAll(async () => {
    await Promise.all(started.map((a) => a.kill9().catch(() => {})));
    await etcd?.stop();
  });

  /** A fresh cluster name per test: one etcd, many clusters. */
  function clusterName(): string {
    return `t${randomBytes(4).toString('hex')}`;
  }

  async function agent(
    cluster: string,
    host: string,
    extra: { endpoints?: string[]; leaseTtl?: number; pool?: string; timeoutMs?: number } = {},
  ): Promise<AgentHandle> {
    const a = await startAgent({
      pools: [
        { name: 'shared', path: extra.pool ?? path.join(shared, cluster), shared: true },
        { name: 'local' },
      ],
      cluster: {
        name: cluster,
        etcd: extra.endpoints ?? etcd.endpoints,
        host,
        leaseTtl: extra.leaseTtl ?? 2,
        ...(extra.timeoutMs !== undefined ? { timeout: extra.timeoutMs } : {}),
      },
    });
    started.push(a);
    return a;
  }

  it('a device created on A is listed by B and C; written through C, read back through A', async () => {
    const name = clusterName();
    const [a, b, c] = await Promise.all([agent(name, 'a'), agent(name, 'b'), agent(name, 'c')]);
    const r = await a.cli('device', 'create', 'swap1', '--size', '16M', '--pool', 'shared');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    for (const x of [b, c]) {
      const d = (await devices(x)).devices.find((v) => v.name === 'swap1');
      expect(d).toMatchObject({ state: 'ready', size: 16 * 2 ** 20 });
      expect(d?.hosts).toEqual(['a', 'b', 'c']);
    }
    const ls = await b.cli('device', 'ls');
    expect(ls.stdout).toMatch(/swap1\s+16 MiB\s+data\s+-\s+shared\s+ready\s+0\s+\S+.*\s+a,b,c/);

    const uriC = (await c.cli('attach', 'swap1', '--format', 'uri')).stdout.trim();
    expect(uriC).toBe(c.uri('swap1'));
    const w = await qemuIo(uriC, 'write -P 0x5a 0 1M', 'write -P 0xc3 15M 1M');
    expect(w.code, w.stderr).toBe(0);
    const rd = await qemuIo(a.uri('swap1'), 'read -P 0x5a 0 1M', 'read -P 0xc3 15M 1M');
    expect(rd.code, rd.stderr + rd.stdout).toBe(0);
    expect(rd.stdout).not.toMatch(/Pattern verification failed/);

    // attach for a guest on another host: that host's socket
    const forB = await a.cli('attach', 'swap1', '--format', 'uri', '--host', 'b');
    expect(forB.stdout.trim()).toBe(b.uri('swap1'));

    // a host-local device belongs to its host: listed everywhere, changed only there
    expect((await b.cli('device', 'create', 'bonly', '--size', '1M', '--pool', 'local')).code).toBe(
      0,
    );
    await until('a lists bonly', async () =>
      (await devices(a)).devices.some((d) => d.name === 'bonly' && d.state === 'remote'),
    );
    const rm = await a.cli('device', 'rm', 'bonly', '--json');
    expect(rm.code).not.toBe(0);
    expect(rm.stdout).toMatch(/BALLAST_DEVICE_REMOTE/);
    expect(rm.stdout).toMatch(/host b/);

    // a resize is seen by every serving agent before the command returns
    expect((await a.cli('device', 'resize', 'swap1', '--size', '32M')).code).toBe(0);
    for (const x of [b, c]) {
      const info = await run('nbdinfo', ['--size', x.uri('swap1')]);
      expect(info.stdout.trim()).toBe(String(32 * 2 ** 20));
    }
    // and a delete everywhere
    expect((await c.cli('device', 'rm', 'swap1')).code).toBe(0);
    for (const x of [a, b]) {
      expect((await devices(x)).devices.map((d) => d.name)).not.toContain('swap1');
    }
    const status = await a.cli('cluster', 'status');
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toMatch(/members:\s+3 alive/);
    await Promise.all([a.stop(), b.stop(), c.stop()]);
  });

  it('two agents racing to create the same 100 names: each name exists once', async () => {
    const name = clusterName();
    // 200 creates at once on a loaded machine: etcd calls and acks are slow, not lost. The
    // store deadline and the lease are given room so the outcome, not the pace, is judged
    // (a store call past its deadline answers 504 without saying who won). A create that
    // is committed but not yet applied by every member in the agent's bound (504
    // BALLAST_CLUSTER_NOT_APPLIED) has won: that is what its answer says.
    const slack = { leaseTtl: 10, timeoutMs: 30_000 };
    const [a, b, c] = await Promise.all([
      agent(name, 'a', slack),
      agent(name, 'b', slack),
      agent(name, 'c', slack),
    ]);
    const names = Array.from({ length: 100 }, (_, i) => `r${i}`);
    const create = async (x: AgentHandle, n: string) => {
      const r = await x.api('POST', '/v1/devices', { name: n, size: '1M', pool: 'shared' });
      if (r.status === 201) return 'won';
      if (r.status === 409 && r.body.code === 'BALLAST_DEVICE_EXISTS') return 'lost';
      if (r.status === 504 && r.body.code === 'BALLAST_CLUSTER_NOT_APPLIED') return 'won';
      return `${r.status} ${r.text}`;
    };
    const results = await Promise.all(names.flatMap((n) => [create(a, n), create(b, n)]));
    for (let i = 0; i < names.length; i++) {
      const pair = [results[2 * i], results[2 * i + 1]].sort();
      expect(pair, names[i]).toEqual(['lost', 'won']);
    }
    const sorted = [...names].sort();
    await until(
      'c lists the 100 devices',
      async () =>
        JSON.stringify((await devices(c)).devices.map((d) => d.name).sort()) ===
        JSON.stringify(sorted),
      120_000,
    );
    // exactly one file per device on the shared storage
    expect(readdirSync(path.join(shared, name)).filter((f) => f.endsWith('.img'))).toHaveLength(
      100,
    );
    await Promise.all([a.stop(), b.stop(), c.stop()]);
  }, 300_000);

  it('members: a kill -9 expires within the TTL, a clean stop leaves; one host name, one agent', async () => {
    const name = clusterName();
    const [a, b] = await Promise.all([agent(name, 'a'), agent(name, 'b')]);
    await expect(agent(name, 'b')).rejects.toThrow(/BALLAST_CLUSTER_HOST_TAKEN/);
    expect((await a.cli('device', 'create', 'pr1', '--size', '1M', '--pool', 'shared')).code).toBe(
      0,
    );
    type View = { host: string; state: string; since?: string; joined?: string };
    const view = async (h: string) =>
      (
        (await a.api('GET', '/v1/cluster/members')).body as unknown as { members: View[] }
      ).members.find((x) => x.host === h);
    const killedAt = Date.now();
    await b.kill9();
    let gone: View | undefined;
    await until('b expired', async () => {
      gone = await view('b');
      return gone?.state === 'expired' && gone.since !== undefined;
    });
    // TTL 2 s; etcd checks expiry about every 500 ms
    expect(Date.now() - killedAt).toBeLessThan(2000 + 2500);
    // SINCE is when the lease was seen gone, not when b joined (which JSON keeps as joined)
    expect(Date.parse(gone!.since!)).toBeGreaterThanOrEqual(killedAt - 1000);
    expect(Date.parse(gone!.joined!)).toBeLessThan(killedAt);
    const table = await a.cli('cluster', 'members');
    expect(table.stdout).toMatch(new RegExp(`\\bb\\s+expired\\s+${gone!.since!}`));
    // the same host restarted on its data dir comes back at once
    await b.start();
    const c = await agent(name, 'c');
    const stoppedAt = Date.now();
    await c.stop();
    const m = await a.cli('cluster', 'members', '--json');
    const members = (JSON.parse(m.stdout) as { members: View[] }).members;
    const states = Object.fromEntries(members.map((x) => [x.host, x.state]));
    expect(states).toEqual({ a: 'alive', b: 'alive', c: 'left' });
    const left = members.find((x) => x.host === 'c')!;
    expect(Date.parse(left.since!)).toBeGreaterThanOrEqual(stoppedAt - 1000);
    expect(Date.parse(left.joined!)).toBeLessThanOrEqual(Date.parse(left.since!));
    // a PR change waits for the members alive when it is made: c, which left cleanly
    // before, is neither waited for nor said to have fenced itself
    const pr = await a.cli(
      'pr',
      'pr1',
      'register',
      '--as',
      'x',
      '--sa-key',
      '0x1',
      '--wait',
      '--json',
    );
    expect(pr.code, pr.stderr).toBe(0);
    const settled = (
      JSON.parse(pr.stdout) as { settled: { hosts: { host: string; how: string }[] } }
    ).settled;
    expect(settled.hosts.sort((x, y) => (x.host < y.host ? -1 : 1))).toEqual([
      { host: 'a', how: 'self' },
      { host: 'b', how: 'acked' },
    ]);
    const text = await a.cli('pr', 'pr1', 'register', '--as', 'y', '--sa-key', '0x2', '--wait');
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/waited .* s: .*b applied it/);
    expect(text.stdout).not.toMatch(/fenced itself|\bc\b/);
    await Promise.all([a.stop(), b.stop()]);
  });

  it('partitioned from etcd: reads from the cache marked stale, mutations fail fast; heal converges', async () => {
    const name = clusterName();
    const proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    try {
      const a = await agent(name, 'a', { endpoints: proxies.map((p) => p.url) });
      const [b, c] = await Promise.all([agent(name, 'b'), agent(name, 'c')]);
      expect(
        (await a.cli('device', 'create', 'before', '--size', '1M', '--pool', 'shared')).code,
      ).toBe(0);
      for (const p of proxies) p.partition();
      await until('a cut off', async () => (await devices(a)).stale !== undefined, 10_000);
      const ls = await a.cli('device', 'ls');
      expect(ls.code).toBe(0);
      expect(ls.stderr).toMatch(/stale/);
      expect(ls.stdout).toMatch(/before/);
      // refused at once by the agent's own guard (not after a store call timed out)
      const r = await a.cli('device', 'create', 'during-a', '--size', '1M', '--json');
      expect(r.code).toBe(3);
      expect(r.stdout).toMatch(/STORE_UNAVAILABLE/);
      expect(r.stdout).toMatch(/cut off from etcd/);
      await until('b sees a expire', async () => {
        const m = (await b.api('GET', '/v1/cluster/members')).body as {
          members: { host: string; state: string }[];
        };
        return m.members.find((x) => x.host === 'a')?.state === 'expired';
      });
      expect(
        (await b.cli('device', 'create', 'during-b', '--size', '1M', '--pool', 'shared')).code,
      ).toBe(0);
      for (const p of proxies) p.heal();
      await until(
        'a converged',
        async () => {
          const d = await devices(a);
          return d.stale === undefined && d.devices.some((x) => x.name === 'during-b');
        },
        20_000,
      );
      const names = (await devices(a)).devices.map((d) => d.name).sort();
      expect(names).toEqual(['before', 'during-b']);
      await until('c sees a alive', async () => {
        const m = (await c.api('GET', '/v1/cluster/members')).body as {
          members: { host: string; state: string }[];
        };
        return m.members.find((x) => x.host === 'a')?.state === 'alive';
      });
      expect(
        (await a.cli('device', 'create', 'after', '--size', '1M', '--pool', 'shared')).code,
      ).toBe(0);
      await Promise.all([a.stop(), b.stop(), c.stop()]);
    } finally {
      for (const p of proxies) await p.close();
    }
  });

  it('etcd leader killed during a burst of creates: what succeeded exists, what failed left nothing', async () => {
    const name = clusterName();
    const a = await agent(name, 'a', { leaseTtl: 5 });
    const outcomes: { name: string; status: number; text: string }[] = [];
    const burst = (async () => {
      for (let i = 0; i < 60; i++) {
        const n = `b${i}`;
        const r = await a.api('POST', '/v1/devices', { name: n, size: '1M', pool: 'shared' });
        outcomes.push({ name: n, status: r.status, text: r.text });
      }
    })();
    await sleep(300);
    const leader = await etcd.leader();
    await etcd.kill(leader, 'SIGKILL');
    await burst;
    await etcd.restart(leader);
    await until('a healthy', async () => (await devices(a)).stale === undefined);
    // A failed create answers NOT made: an intent of it that reached etcd late (its
    // answer lost with the leader) may be listed for a moment, as creating, until the
    // agent that made it removes it once etcd answers. One whose ready record was in
    // doubt answers "may have been made": once etcd answers, it is a device, or nothing.
    const failed = outcomes.filter((o) => o.status !== 201);
    for (const o of failed) expect(o.text, o.name).toMatch(/NOT made|may have been made/);
    const doubt = new Set(failed.filter((o) => !/NOT made/.test(o.text)).map((o) => o.name));
    let listed = new Map<string, string>();
    let files: string[] = [];
    const hasFile = (n: string) => files.some((f) => f.startsWith(`${n}.`));
    await until('the records of failed creates removed, those in doubt settled', async () => {
      listed = new Map((await devices(a)).devices.map((d) => [d.name, d.state]));
      files = readdirSync(path.join(shared, name)).filter((f) => f.endsWith('.img'));
      return failed.every((o) =>
        doubt.has(o.name) && listed.has(o.name)
          ? listed.get(o.name) === 'ready'
          : !listed.has(o.name) && !hasFile(o.name),
      );
    }).catch((e: Error) => {
      const left = failed.filter((o) => listed.has(o.name));
      throw new Error(
        `${e.message}: ${left.map((o) => `${o.name} (${listed.get(o.name)}) failed with ${o.status}: ${o.text}`).join('; ')}\n${a.stderr().slice(-4000)}`,
      );
    });
    for (const o of outcomes) {
      const file = hasFile(o.name);
      if (o.status === 201 || (doubt.has(o.name) && listed.has(o.name))) {
        expect(listed.get(o.name), o.name).toBe('ready');
        expect(file, `${o.name}'s file`).toBe(true);
      } else {
        expect(listed.has(o.name), `${o.name} failed with ${o.status} but exists`).toBe(false);
        expect(file, `${o.name} failed with ${o.status} but has a file`).toBe(false);
      }
    }
    expect(outcomes.filter((o) => o.status === 201).length).toBeGreaterThan(0);
    expect(files).toHaveLength(listed.size);
    await a.stop();
  });

  it('notifications across hosts: changes on A and B reach a recipient registered on C; its deliverer dies, another takes over', async () => {
    const name = clusterName();
    const [a, b, c] = await Promise.all([agent(name, 'a'), agent(name, 'b'), agent(name, 'c')]);
    const rx = new Receiver();
    await rx.start();
    const add = await c.cli(
      'notify',
      'add',
      'ops',
      '--url',
      rx.url,
      '--types',
      'device.*,member.*',
    );
    expect(add.code, add.stderr).toBe(0);
    // `ballast events --follow` on B sees what A does
    const follow = spawn(
      process.execPath,
      [BALLAST_BIN, 'events', '--follow', '--json', '--types', 'device.created'],
      {
        env: { ...process.env, BALLAST_AGENT: `unix:${b.apiSocket}` },
      },
    );
    let streamed = '';
    follow.stdout.on('data', (d: Buffer) => {
      streamed += d.toString();
    });
    let followErr = '';
    follow.stderr.on('data', (d: Buffer) => {
      followErr += d.toString();
    });
    // A stream without --since starts from now: it shows A's create only if it was
    // following before it. Devices made through B until the stream shows one say it is.
    let probes = 0;
    await until('the stream on B following', async () => {
      const p = await b.cli(
        'device',
        'create',
        `probe${probes++}`,
        '--size',
        '1M',
        '--pool',
        'shared',
      );
      expect(p.code, p.stderr).toBe(0);
      return streamed.includes('"probe');
    });
    expect(
      (await a.cli('device', 'create', 'from-a', '--size', '1M', '--pool', 'shared')).code,
    ).toBe(0);
    expect(
      (await b.cli('device', 'create', 'from-b', '--size', '1M', '--pool', 'shared')).code,
    ).toBe(0);
    await until(
      'C delivered both',
      async () => rx.got.filter((g) => g.type === 'io.ballast.device.created').length >= 2 + probes,
    );
    await until('the stream on B saw A', async () => streamed.includes('from-a')).catch((e) => {
      throw new Error(
        `${(e as Error).message}; the stream printed ${JSON.stringify(streamed.slice(-2000))}, on stderr ${JSON.stringify(followErr.slice(-2000))} (exit ${follow.exitCode})`,
      );
    });
    follow.kill('SIGINT');
    const ls = JSON.parse((await c.cli('notify', 'ls', '--json')).stdout) as {
      recipients: { deliveredBy: string }[];
    };
    const by = ls.recipients[0]!.deliveredBy;
    const victim = { a, b, c }[by as 'a' | 'b' | 'c'];
    const survivor = [a, b, c].find((x) => x !== victim)!;
    await victim.kill9();
    expect(
      (await survivor.cli('device', 'create', 'after-kill', '--size', '1M', '--pool', 'shared'))
        .code,
    ).toBe(0);
    await until('another agent delivered after the kill', async () =>
      rx.got.some((g) => g.subject === 'after-kill'),
    );
    await until('the expiry of the dead deliverer', async () =>
      rx.got.some((g) => g.type === 'io.ballast.member.expired' && g.subject === by),
    );
    const kinds = rx.ids().map((id) => rx.got.find((g) => g.id === id)!.type);
    expect(kinds.filter((k) => k === 'io.ballast.device.created')).toHaveLength(3 + probes);
    const keys = rx.ids().map(idKey);
    expect([...keys].sort((x, y) => x - y)).toEqual(keys);
    for (const x of [a, b, c]) if (x !== victim) await x.stop();
    await rx.stop();
  });

  it('an agent started while etcd does not answer waits for it (cluster.startTimeout), then joins', async () => {
    const proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    try {
      for (const p of proxies) p.partition();
      const starting = startAgent({
        dir: makeTempDir('ballast-late-'),
        pools: [{ name: 'default' }],
        cluster: {
          etcd: proxies.map((p) => p.url),
          host: 'late',
          name: clusterName(),
          leaseTtl: 2,
        },
      });
      let settled = '';
      starting.then(
        () => {
          settled = 'up';
        },
        (e: Error) => {
          settled = e.message;
        },
      );
      await until('the agent asking etcd', () => proxies.some((p) => p.connections > 0));
      // several of its 800 ms calls run out meanwhile; it keeps asking
      await sleep(3000);
      expect(settled).toBe('');
      for (const p of proxies) p.heal();
      const a = await starting;
      started.push(a);
      const st = (await a.api('GET', '/v1/cluster/status')).body as { healthy?: boolean };
      expect(st.healthy, JSON.stringify(st)).toBe(true);
      await a.stop();
    } finally {
      for (const p of proxies) await p.close().catch(() => {});
    }
  });

  it('bad input: unreachable etcd (exit 3), garbage under the prefix, a local store not joined', async () => {
    const dead = makeTempDir('ballast-dead-');
    await expect(
      startAgent({
        dir: dead,
        pools: [{ name: 'default' }],
        cluster: { etcd: ['http://127.0.0.1:9'], host: 'x', timeout: 500, startTimeout: 1 },
      }),
    ).rejects.toThrow(/exited \(3\)[\s\S]*BALLAST_CLUSTER_UNREACHABLE[\s\S]*127\.0\.0\.1:9/);

    const name = clusterName();
    const put = await run('etcdctl', [
      `--endpoints=${etcd.endpoints.join(',')}`,
      'put',
      `/ballast/${name}/devices/junk`,
      '{not json',
    ]);
    expect(put.code, put.stderr).toBe(0);
    await run('etcdctl', [`--endpoints=${etcd.endpoints[0]}`, 'put', `/ballast/${name}/zzz`, 'x']);
    const a = await agent(name, 'a');
    const st = (await a.api('GET', '/v1/status')).body as {
      problems: { device?: string }[];
      cluster: { foreignKeyCount: number };
    };
    expect(st.problems.some((p) => p.device === 'junk')).toBe(true);
    expect(st.cluster.foreignKeyCount).toBe(1);
    expect((await a.cli('device', 'create', 'ok', '--size', '1M', '--pool', 'shared')).code).toBe(
      0,
    );
    await a.stop();

    // a host that ran alone: its devices are imported by join, never silently dropped
    const solo = await startAgent({ pools: [{ name: 'default' }] });
    started.push(solo);
    expect((await solo.cli('device', 'create', 'mine', '--size', '2M')).code).toBe(0);
    expect((await solo.cli('device', 'create', 'ok', '--size', '2M')).code).toBe(0);
    await solo.stop();
    const cfg = { etcd: etcd.endpoints, host: 'solo', name, leaseTtl: 2 };
    await expect(
      startAgent({ dir: solo.dir, pools: [{ name: 'default' }], cluster: cfg }),
    ).rejects.toThrow(/BALLAST_CLUSTER_JOIN_NEEDED/);
    const clash = await solo.cli('cluster', 'join', '--config', solo.configFile);
    expect(clash.code).toBe(5);
    expect(clash.stderr).toMatch(/BALLAST_DEVICE_EXISTS[\s\S]*ok/);
    // with --json the error is JSON on stdout too, as every other command's
    const clashJson = await solo.cli('cluster', 'join', '--config', solo.configFile, '--json');
    expect(clashJson.code).toBe(5);
    expect(JSON.parse(clashJson.stdout)).toMatchObject({
      error: { code: 'BALLAST_DEVICE_EXISTS', message: expect.stringMatching(/\bok\b/) },
    });
    await a.start();
    expect((await a.cli('device', 'rm', 'ok')).code).toBe(0);
    const join = await solo.cli('cluster', 'join', '--config', solo.configFile);
    expect(join.code, join.stderr).toBe(0);
    expect(join.stdout).toMatch(/imported 2 device\(s\)/);
    await solo.start();
    const mine = (await devices(a)).devices.find((d) => d.name === 'mine');
    expect(mine).toMatchObject({ state: 'remote', hosts: ['solo'] });
    const w = await qemuIo(solo.uri('mine'), 'write -P 0x11 0 64k');
    expect(w.code, w.stderr).toBe(0);
    await Promise.all([a.stop(), solo.stop()]);
  });
});
