// `ballast agent` end to end, driven by its API and by the CLI as a user runs
// them, judged by qemu-io and qemu-img: devices created, listed, resized,
// extended across two pools and deleted; bad input answered with its stable
// code, HTTP status and exit code; SIGHUP reload; SIGTERM drain.

import { statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, httpRequest, startAgent } from '../helpers/agent.js';
import { MiB } from '../helpers/server.js';
import { describeRun, describeWithTools, type RunResult, run, runOk } from '../helpers/tools.js';

const expectOk = (r: RunResult) => expect(r.code, describeRun(r)).toBe(0);

/** Fails with this exit code and names the stable code on stderr. */
const expectFail = (r: RunResult, exit: number, code: string) => {
  expect(r.code, describeRun(r)).toBe(exit);
  expect(r.stderr, describeRun(r)).toContain(code);
};

const qemuIoClean = async (uri: string, ...cmds: string[]) => {
  const r = await run('qemu-io', ['-f', 'raw', uri, ...cmds.flatMap((c) => ['-c', c])]);
  expect(r.code, describeRun(r)).toBe(0);
  expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|failed:/);
  return r;
};

describeWithTools(['qemu-io', 'qemu-img'], 'ballast agent: API and CLI end to end', () => {
  let agent: AgentHandle;

  beforeAll(async () => {
    agent = await startAgent({
      pools: [
        { name: 'fast', media: 'ssd' },
        { name: 'bulk', media: 'hdd', quota: '256M', overcommit: 2 },
      ],
      // TCP clients must be named: this host's loopback is.
      nbd: { identities: ['127.0.0.1=local'] },
    });
  });

  afterAll(async () => {
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it('lists the configured pools, media and limits (table and --json)', async () => {
    const table = await agent.cli('pool', 'ls');
    expectOk(table);
    expect(table.stdout).toMatch(/^NAME\s+MEDIA\s+CAPACITY/);
    expect(table.stdout).toMatch(/bulk\s+hdd\s+256 MiB\s+512 MiB \(x2\)/);
    const j = await agent.cli('pool', 'ls', '--json');
    expectOk(j);
    const pools = (JSON.parse(j.stdout) as { pools: Record<string, unknown>[] }).pools;
    expect(pools.map((p) => p.name)).toEqual(['fast', 'bulk']);
    const bulk = pools[1]!;
    expect(bulk).toMatchObject({
      media: 'hdd',
      mediaSource: 'configured',
      capacityBytes: 256 * MiB,
      limitBytes: 512 * MiB,
      overcommit: 2,
      provisionedBytes: 0,
    });
    const show = await agent.cli('pool', 'show', 'fast', '--json');
    expectOk(show);
    expect(JSON.parse(show.stdout)).toMatchObject({ name: 'fast', media: 'ssd' });
  });

  it('creates a paging device for a guest, shows it, and exports it under its name', async () => {
    const r = await agent.cli(
      'device',
      'create',
      'swap-vm1',
      '--size',
      '64M',
      '--role',
      'paging',
      '--guest',
      'vm1',
      '--pool',
      'fast',
    );
    expectOk(r);
    expect(r.stdout).toContain('created paging device swap-vm1: 64 MiB in pool fast for guest vm1');
    const show = JSON.parse((await agent.cli('device', 'show', 'swap-vm1', '--json')).stdout);
    expect(show).toMatchObject({
      name: 'swap-vm1',
      size: 64 * MiB,
      role: 'paging',
      guest: 'vm1',
      state: 'ready',
      exported: true,
    });
    const file = show.extents[0].file as string;
    expect(path.dirname(file)).toBe(path.join(agent.dir, 'pools', 'fast'));
    expect(statSync(file).size).toBe(64 * MiB);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    // Thin: nothing allocated yet.
    expect(show.allocatedBytes).toBe(0);

    const info = await runOk('qemu-img', ['info', '--output=json', agent.uri('swap-vm1')]);
    expect(JSON.parse(info.stdout)['virtual-size']).toBe(64 * MiB);
    await qemuIoClean(agent.uri('swap-vm1'), 'write -P 0x5a 0 1M', 'read -P 0x5a 0 1M');

    const ls = await agent.cli('device', 'ls');
    expectOk(ls);
    expect(ls.stdout).toMatch(/swap-vm1\s+64 MiB\s+paging\s+vm1\s+fast\s+ready\s+0\s+1 MiB/);
  });

  it('extends a device into a second pool; qemu-io sees one address space across both', async () => {
    expectOk(
      await agent.cli(
        'device',
        'create',
        'span',
        '--size',
        '8M',
        '--pool',
        'fast',
        '--role',
        'data',
      ),
    );
    const ext = await agent.cli('device', 'extend', 'span', '--pool', 'bulk', '--size', '+8M');
    expectOk(ext);
    expect(ext.stdout).toContain('extended span to 16 MiB over pools fast,bulk');
    const d = JSON.parse((await agent.cli('device', 'show', 'span', '--json')).stdout);
    expect(d.extents.map((e: { pool: string; size: number }) => [e.pool, e.size])).toEqual([
      ['fast', 8 * MiB],
      ['bulk', 8 * MiB],
    ]);
    const uri = agent.uri('span');
    // Writes that straddle the boundary at 8 MiB, and one at the very end.
    await qemuIoClean(
      uri,
      'write -P 0x11 0 4M',
      'write -P 0x22 7M 2M',
      'write -P 0x33 15M 1M',
      'read -P 0x11 0 4M',
      'read -P 0x22 7M 2M',
      'read -P 0x33 15M 1M',
      'read -P 0 4M 3M',
      'read -P 0 9M 6M',
    );
    // Past the end is refused.
    const past = await run('qemu-io', ['-f', 'raw', uri, '-c', 'write 16M 512']);
    expect(past.stdout + past.stderr).toMatch(/out of range|Input\/output error|No space/i);
    // The bytes are where the extents say: 1 MiB of 0x22 on each side of the boundary.
    const [a, b] = d.extents.map((e: { file: string }) => e.file) as [string, string];
    const fa = (await import('node:fs')).readFileSync(a);
    const fb = (await import('node:fs')).readFileSync(b);
    expect(fa.subarray(7 * MiB, 8 * MiB).every((x) => x === 0x22)).toBe(true);
    expect(fb.subarray(0, MiB).every((x) => x === 0x22)).toBe(true);
    expect(fb.subarray(7 * MiB).every((x) => x === 0x33)).toBe(true);

    const pool = JSON.parse((await agent.cli('pool', 'show', 'bulk', '--json')).stdout);
    expect(pool.provisionedBytes).toBe(8 * MiB);
    expect(pool.allocatedBytes).toBeGreaterThanOrEqual(2 * MiB);
  });

  it('resizes: grows (+SIZE and absolute), refuses to shrink without --force', async () => {
    const grow = await agent.cli('device', 'resize', 'span', '--size', '+4M');
    expectOk(grow);
    expect(grow.stdout).toContain('resized span to 20 MiB');
    const info = await runOk('qemu-img', ['info', '--output=json', agent.uri('span')]);
    expect(JSON.parse(info.stdout)['virtual-size']).toBe(20 * MiB);
    await qemuIoClean(agent.uri('span'), 'write -P 0x44 19M 1M', 'read -P 0x44 19M 1M');

    expectFail(
      await agent.cli('device', 'resize', 'span', '--size', '4M'),
      5,
      'BALLAST_SHRINK_REFUSED',
    );
    const shrink = await agent.cli('device', 'resize', 'span', '--size', '4M', '--force');
    expectOk(shrink);
    const d = JSON.parse((await agent.cli('device', 'show', 'span', '--json')).stdout);
    expect(d.size).toBe(4 * MiB);
    expect(d.extents).toHaveLength(1);
    await qemuIoClean(agent.uri('span'), 'read -P 0x11 0 4M');
  });

  it('attach prints QEMU arguments, libvirt XML and the URI for the device', async () => {
    const q = await agent.cli('attach', 'swap-vm1', '--format', 'qemu');
    expectOk(q);
    expect(q.stdout.trim()).toBe(
      `-blockdev driver=nbd,node-name=ballast-swap-vm1,server.type=unix,server.path=${agent.nbdSocket},export=swap-vm1 ` +
        '-device virtio-blk-pci,drive=ballast-swap-vm1,id=ballast-swap-vm1-dev,serial=swap-vm1',
    );
    const x = await agent.cli('attach', 'swap-vm1', '--format', 'libvirt');
    expectOk(x);
    expect(x.stdout).toContain("<disk type='network' device='disk'>");
    expect(x.stdout).toContain("<source protocol='nbd' name='swap-vm1'>");
    expect(x.stdout).toContain(`<host transport='unix' socket='${agent.nbdSocket}'/>`);
    const u = await agent.cli('attach', 'swap-vm1', '--format', 'uri', '--transport', 'tcp');
    expectOk(u);
    expect(u.stdout.trim()).toBe(`nbd://127.0.0.1:${agent.nbdPort}/swap-vm1`);
    // The TCP URI works too.
    await qemuIoClean(u.stdout.trim(), 'read -P 0x5a 0 1M');
  });

  it('refuses to delete a device with a client connected, unless forced', async () => {
    expectOk(await agent.cli('device', 'create', 'held', '--size', '1M'));
    // qemu-io in interactive mode keeps its connection until stdin closes.
    const { spawn } = await import('node:child_process');
    const held = spawn('qemu-io', ['-f', 'raw', agent.uri('held')], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const gone = new Promise<void>((r) => held.once('exit', () => r()));
    try {
      // Wait until the agent counts the connection.
      for (let i = 0; i < 200; i++) {
        const d = JSON.parse((await agent.cli('device', 'show', 'held', '--json')).stdout);
        if (d.connections === 1) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      expectFail(await agent.cli('device', 'rm', 'held'), 5, 'BALLAST_DEVICE_BUSY');
      expectOk(await agent.cli('device', 'rm', 'held', '--force'));
      expectFail(await agent.cli('device', 'show', 'held'), 4, 'BALLAST_DEVICE_NOT_FOUND');
      // The export is gone for new clients.
      const r = await run('qemu-img', ['info', agent.uri('held')]);
      expect(r.code).not.toBe(0);
    } finally {
      held.stdin.end('quit\n');
      await gone;
    }
  });

  it('status reports listeners, counts and no problems', async () => {
    const s = await agent.cli('status');
    expectOk(s);
    expect(s.stdout).toContain(`NBD:         127.0.0.1:${agent.nbdPort}, unix:${agent.nbdSocket}`);
    expect(s.stdout).toMatch(/devices:\s+2/);
    expect(s.stdout).toContain('problems:    none');
    const j = JSON.parse((await agent.cli('status', '--json')).stdout);
    expect(j).toMatchObject({ pools: 2, devices: 2, problems: [], tokenRequired: true });
  });

  it('answers bad input with stable codes, HTTP statuses and exit codes', async () => {
    // Names with path tricks or out of the alphabet.
    for (const name of ['../etc', 'a/b', 'UPPER', '.hidden', 'x'.repeat(64), 'a..b']) {
      expectFail(await agent.cli('device', 'create', name, '--size', '1M'), 8, 'BALLAST_BAD_NAME');
    }
    const badName = await agent.api('POST', '/v1/devices', { name: '../x', size: 1024 });
    expect(badName.status).toBe(400);
    expect(badName.body.code).toBe('BALLAST_BAD_NAME');
    expect(typeof badName.body.message).toBe('string');
    // Sizes.
    for (const size of ['12Q', '-1', '0', '1.5.5G', 'lots']) {
      expectFail(await agent.cli('device', 'create', 'sz', '--size', size), 8, 'BALLAST_BAD_SIZE');
    }
    expectFail(
      await agent.cli('device', 'resize', 'swap-vm1', '--size', '+x'),
      8,
      'BALLAST_BAD_SIZE',
    );
    const noSize = await agent.api('POST', '/v1/devices', { name: 'nosize' });
    expect([noSize.status, noSize.body.code]).toEqual([400, 'BALLAST_BAD_REQUEST']);
    // Role: the CLI refuses it as usage (2); the API with its code.
    const role = await agent.cli('device', 'create', 'r', '--size', '1M', '--role', 'swap');
    expect(role.code, describeRun(role)).toBe(2);
    const apiRole = await agent.api('POST', '/v1/devices', { name: 'r', size: 1024, role: 'swap' });
    expect([apiRole.status, apiRole.body.code]).toEqual([400, 'BALLAST_BAD_ROLE']);
    // A full pool: bulk may hold 512 MiB provisioned, 8 MiB are used.
    expectFail(
      await agent.cli('device', 'create', 'huge', '--size', '600M', '--pool', 'bulk'),
      6,
      'BALLAST_POOL_FULL',
    );
    const full = await agent.api('POST', '/v1/devices', {
      name: 'huge',
      size: '600M',
      pool: 'bulk',
    });
    expect([full.status, full.body.code]).toEqual([507, 'BALLAST_POOL_FULL']);
    expectFail(
      await agent.cli('device', 'extend', 'swap-vm1', '--pool', 'bulk', '--size', '+1G'),
      6,
      'BALLAST_POOL_FULL',
    );
    // Unknown things.
    expectFail(await agent.cli('device', 'show', 'nope'), 4, 'BALLAST_DEVICE_NOT_FOUND');
    const jsonErr = await agent.cli('device', 'show', 'nope', '--json');
    expectFail(jsonErr, 4, 'BALLAST_DEVICE_NOT_FOUND');
    expect(JSON.parse(jsonErr.stdout)).toEqual({
      error: { code: 'BALLAST_DEVICE_NOT_FOUND', message: 'no device named "nope"' },
    });
    expectFail(await agent.cli('device', 'rm', 'nope'), 4, 'BALLAST_DEVICE_NOT_FOUND');
    expectFail(await agent.cli('attach', 'nope'), 4, 'BALLAST_DEVICE_NOT_FOUND');
    expectFail(await agent.cli('pool', 'show', 'nope'), 4, 'BALLAST_POOL_NOT_FOUND');
    expectFail(
      await agent.cli('device', 'create', 'p', '--size', '1M', '--pool', 'nope'),
      4,
      'BALLAST_POOL_NOT_FOUND',
    );
    const nf = await agent.api('GET', '/v1/devices/nope');
    expect([nf.status, nf.body.code]).toEqual([404, 'BALLAST_DEVICE_NOT_FOUND']);
    const ep = await agent.api('GET', '/v1/nothing');
    expect([ep.status, ep.body.code]).toEqual([404, 'BALLAST_NOT_FOUND']);
    const meth = await agent.api('PUT', '/v1/devices');
    expect([meth.status, meth.body.code]).toEqual([405, 'BALLAST_METHOD_NOT_ALLOWED']);
    // A second device of the same name.
    expectFail(
      await agent.cli('device', 'create', 'swap-vm1', '--size', '1M'),
      5,
      'BALLAST_DEVICE_EXISTS',
    );
    // Nothing of the failed creates was left behind.
    const lsRun = await agent.cli('device', 'ls', '--json');
    expect(lsRun.code, describeRun(lsRun)).toBe(0);
    const ls = JSON.parse(lsRun.stdout);
    expect(ls.devices.map((d: { name: string }) => d.name).sort()).toEqual(['span', 'swap-vm1']);
  });

  it('an agent that is not there: exit 3, BALLAST_AGENT_UNREACHABLE', async () => {
    const r = await run(process.execPath, [
      (await import('../helpers/server.js')).BALLAST_BIN,
      'device',
      'ls',
      '--agent',
      `unix:${path.join(agent.dir, 'no.sock')}`,
    ]);
    expectFail(r, 3, 'BALLAST_AGENT_UNREACHABLE');
  });

  it('SIGHUP reloads the config: a new pool appears; a bad config is refused and reported', async () => {
    const cfg = (await import('node:fs')).readFileSync(agent.configFile, 'utf8');
    writeFileSync(
      agent.configFile,
      `${cfg}  - {"name":"extra","path":"${path.join(agent.dir, 'pools', 'extra')}"}\n`,
    );
    agent.child.kill('SIGHUP');
    let names: string[] = [];
    for (let i = 0; i < 200 && !names.includes('extra'); i++) {
      await new Promise((r) => setTimeout(r, 50));
      names = ((await agent.api('GET', '/v1/pools')).body.pools as { name: string }[]).map(
        (p) => p.name,
      );
    }
    expect(names).toEqual(['fast', 'bulk', 'extra']);

    writeFileSync(agent.configFile, `${cfg}  - { name: broken, path: relative/path }\n`);
    agent.child.kill('SIGHUP');
    let err: unknown = null;
    for (let i = 0; i < 200 && !err; i++) {
      await new Promise((r) => setTimeout(r, 50));
      err = (await agent.api('GET', '/v1/status')).body.lastReloadError;
    }
    expect(String(err)).toMatch(
      /BALLAST_CONFIG_INVALID: .*pools\[2\]\.path: must be an absolute path/,
    );
    // The running config stays.
    expect(((await agent.api('GET', '/v1/pools')).body.pools as unknown[]).length).toBe(3);
    writeFileSync(agent.configFile, cfg);
  });
});

describeWithTools([], 'ballast agent: configuration errors and the API token', () => {
  it('a bad config file stops the start with BALLAST_CONFIG_INVALID naming the key', async () => {
    const { makeTempDir, BALLAST_BIN } = await import('../helpers/server.js');
    const dir = makeTempDir('ballast-cfg-');
    const cases: [string, RegExp][] = [
      ['nbd: [unclosed\n', /BALLAST_CONFIG_INVALID: .*not valid YAML/],
      ['pools:\n  - { name: a, path: /x, media: floppy }\n', /pools\[0\]\.media: must be one of/],
      ['pools:\n  - { name: a, path: /x, quota: lots }\n', /pools\[0\]\.quota: .*bad size/],
      ['pools:\n  - { name: "a/b", path: /x }\n', /pools\[0\]\.name:/],
      ['api: { listen: "nowhere" }\n', /api\.listen: must be HOST:PORT/],
      ['nbd: { colour: blue }\n', /nbd\.colour: unknown key/],
      [
        'pools:\n  - { name: a, path: /x, overcommit: -1 }\n',
        /pools\[0\]\.overcommit: must be a number/,
      ],
    ];
    for (const [text, want] of cases) {
      const f = path.join(dir, 'bad.yaml');
      writeFileSync(f, `dataDir: ${dir}/data\n${text}`);
      const r = await run(process.execPath, [BALLAST_BIN, 'agent', '--config', f]);
      expect(r.code, describeRun(r)).toBe(1);
      expect(r.stderr, describeRun(r)).toMatch(/error BALLAST_CONFIG_INVALID/);
      expect(r.stderr, describeRun(r)).toMatch(want);
    }
    const missing = await run(process.execPath, [
      BALLAST_BIN,
      'agent',
      '--config',
      path.join(dir, 'none.yaml'),
    ]);
    expectFail(missing, 1, 'BALLAST_CONFIG_UNREADABLE');
  });

  it('a second agent on the same data directory is refused with STORE_LOCKED', async () => {
    const a = await startAgent();
    try {
      const { BALLAST_BIN } = await import('../helpers/server.js');
      const cfg = path.join(a.dir, 'second.yaml');
      writeFileSync(
        cfg,
        `dataDir: ${a.dataDir}\nnbd: { listen: 127.0.0.1:0, socket: null }\napi: { listen: 127.0.0.1:0, socket: null }\n`,
      );
      const r = await run(process.execPath, [BALLAST_BIN, 'agent', '--config', cfg]);
      expectFail(r, 1, 'STORE_LOCKED');
    } finally {
      expect(await a.stop()).toBe(0);
    }
  });

  it('with requireToken the TCP API demands the bearer token from the 0600 token file', async () => {
    const a = await startAgent({ api: { requireToken: true } });
    try {
      const tokenFile = path.join(a.dataDir, 'api-token');
      expect(statSync(tokenFile).mode & 0o777).toBe(0o600);
      const token = (await import('node:fs')).readFileSync(tokenFile, 'utf8').trim();
      expect(token).toMatch(/^[0-9a-f]{64}$/);
      const url = `http://127.0.0.1:${a.apiPort}`;
      const { BALLAST_BIN } = await import('../helpers/server.js');
      const cli = (...args: string[]) =>
        run(process.execPath, [BALLAST_BIN, ...args], { env: { BALLAST_AGENT: url } });

      expectFail(await cli('device', 'ls'), 7, 'BALLAST_UNAUTHORIZED');
      const bad = await httpRequest({ port: a.apiPort }, 'GET', '/v1/devices', undefined, {
        authorization: 'Bearer wrong-token-wrong-token',
      });
      expect([bad.status, bad.body.code]).toEqual([401, 'BALLAST_UNAUTHORIZED']);
      // /healthz stays open for probes; /metrics does not.
      expect((await httpRequest({ port: a.apiPort }, 'GET', '/healthz')).status).toBe(200);
      expect((await httpRequest({ port: a.apiPort }, 'GET', '/metrics')).status).toBe(401);

      expectOk(await cli('device', 'ls', '--token-file', tokenFile));
      const viaEnv = await run(process.execPath, [BALLAST_BIN, 'device', 'ls', '--json'], {
        env: { BALLAST_AGENT: url, BALLAST_TOKEN: token },
      });
      expectOk(viaEnv);
      // The Unix socket (mode 0600) needs none.
      expect(statSync(a.apiSocket).mode & 0o777).toBe(0o600);
      expectOk(await a.cli('device', 'ls'));
    } finally {
      expect(await a.stop()).toBe(0);
    }
    // The token survives a restart unchanged.
  });
});
