// Secure by default: a local unprivileged user (uid 65534, through setpriv)
// tries what the agent's defaults once allowed: reading and writing a guest's
// device over NBD (Unix socket and TCP), creating devices, changing a
// reservation, scraping /metrics, any other mutating route, asking dumpd for a
// dump (which reads a guest's memory and may reboot it). Each is refused with
// its documented error; root's CLI works with the token it reads itself (with
// no flags at all on the default paths: root-defaults.test.ts), and a member of
// the socket's group (the kvm group QEMU runs in under libvirt) reaches the NBD
// socket.

import { execFileSync } from 'node:child_process';
import { accessSync, chmodSync, constants, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { parseConfig } from '../../dumpd/config.js';
import { Dumpd } from '../../dumpd/daemon.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { BALLAST_BIN, makeTempDir, REPO_ROOT } from '../helpers/server.js';
import {
  describeRun,
  describeWithTools,
  type RunResult,
  run,
  runOk,
  SYSTEM_PYTHON,
} from '../helpers/tools.js';

const NOBODY = 65534;

let nobodyBin: string | undefined;
/**
 * bin/ballast as uid 65534 can run it. A checkout inside a directory only root may
 * enter (a clone in `mktemp -d`) is out of its reach, so the CLI is then linked
 * (hard links, or a copy across file systems) into a directory it may enter.
 */
function ballastForNobody(): string {
  if (nobodyBin) return nobodyBin;
  let reachable = true;
  for (let d = path.dirname(BALLAST_BIN); ; d = path.dirname(d)) {
    if ((statSync(d).mode & 0o001) === 0) reachable = false;
    if (d === path.dirname(d)) break;
  }
  if (reachable) {
    accessSync(BALLAST_BIN, constants.R_OK);
    nobodyBin = BALLAST_BIN;
    return nobodyBin;
  }
  const dir = makeTempDir('ballast-nobody-');
  chmodSync(dir, 0o755);
  for (const part of ['package.json', 'bin', 'dist', 'node_modules', 'build']) {
    const from = path.join(REPO_ROOT, part);
    try {
      statSync(from);
    } catch {
      continue;
    }
    try {
      execFileSync('cp', ['-al', from, dir]);
    } catch {
      execFileSync('cp', ['-a', from, dir]);
    }
  }
  nobodyBin = path.join(dir, 'bin', 'ballast');
  return nobodyBin;
}

/** Runs a program as uid/gid 65534 with no supplementary groups (or only `groups`). */
function asNobody(cmd: string, args: string[], groups: number[] = []): Promise<RunResult> {
  const g = groups.length > 0 ? [`--groups=${groups.join(',')}`] : ['--clear-groups'];
  return run('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, ...g, '--', cmd, ...args], {
    timeoutMs: 30_000,
  });
}

/** An HTTP request made by uid 65534; prints "STATUS BODY" or "ERROR errno". */
function httpAsNobody(
  where: { port: number } | { socket: string },
  method: string,
  path: string,
  body?: unknown,
): Promise<RunResult> {
  const code = `
import http.client, socket, sys, json
where, method, path, body = json.loads(sys.argv[1])
try:
    if 'socket' in where:
        class U(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(where['socket'])
        c = U('localhost')
    else:
        c = http.client.HTTPConnection('127.0.0.1', where['port'], timeout=10)
    c.request(method, path, body=None if body is None else json.dumps(body),
              headers={'content-type': 'application/json'})
    r = c.getresponse()
    print(r.status, r.read().decode())
except OSError as e:
    print('ERROR', e.errno)
`;
  return asNobody(SYSTEM_PYTHON, ['-c', code, JSON.stringify([where, method, path, body ?? null])]);
}

/** The kvm group's id, if the host has one (the agent's default socket group). */
function kvmGid(): number | null {
  try {
    const line = readFileSync('/etc/group', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('kvm:'));
    const gid = line?.split(':')[2];
    return gid ? Number(gid) : null;
  } catch {}
  return null;
}

describeWithTools(['nbdinfo', 'nbdsh', 'setpriv'], 'secure defaults', () => {
  let agent: AgentHandle;
  const dev = 'swap-vm1';
  const isRoot = process.getuid?.() === 0;

  beforeAll(async () => {
    if (!isRoot) return;
    agent = await startAgent();
    // Let uid 65534 reach the sockets' directory: only the sockets' own modes guard them.
    chmodSync(agent.dir, 0o755);
    const r = await agent.cli('device', 'create', dev, '--size', '16M', '--role', 'paging');
    expect(r.code, describeRun(r)).toBe(0);
    await runOk('qemu-io', ['-f', 'raw', agent.uri(dev), '-c', 'write -P 0x5a 0 64k']);
  }, 60_000);

  afterAll(async () => {
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it.runIf(isRoot)('the sockets: NBD for root and its group, the API for root only', () => {
    const nbd = statSync(agent.nbdSocket);
    const api = statSync(agent.apiSocket);
    expect(api.mode & 0o777).toBe(0o600);
    expect(api.uid).toBe(0);
    if (kvmGid() !== null) {
      expect(nbd.mode & 0o777).toBe(0o660);
      expect(nbd.gid).toBe(kvmGid());
    } else {
      expect(nbd.mode & 0o777).toBe(0o600);
    }
    expect(statSync(`${agent.dataDir}/api-token`).mode & 0o777).toBe(0o600);
  });

  it.runIf(isRoot)(
    'an unprivileged user cannot read or write a device on the NBD socket',
    async () => {
      const r = await asNobody('nbdinfo', ['--size', agent.uri(dev)]);
      expect(r.code, describeRun(r)).not.toBe(0);
      expect(r.stderr).toMatch(/Permission denied/);
      const w = await asNobody('nbdsh', [
        '-u',
        agent.uri(dev),
        '-c',
        "h.pwrite(b'\\x00' * 4096, 0)",
      ]);
      expect(w.code, describeRun(w)).not.toBe(0);
      expect(w.stderr).toMatch(/Permission denied/);
      await runOk('qemu-io', ['-f', 'raw', agent.uri(dev), '-c', 'read -P 0x5a 0 64k']);
    },
    30_000,
  );

  it.runIf(isRoot)(
    'an unprivileged user cannot read or write a device over TCP: ERR_POLICY',
    async () => {
      const uri = `nbd://127.0.0.1:${agent.nbdPort}/${dev}`;
      const info = await asNobody('nbdinfo', ['--size', uri]);
      expect(info.code, describeRun(info)).not.toBe(0);
      expect(info.stderr).toMatch(/server policy prevents NBD_OPT_GO/); // NBD_REP_ERR_POLICY
      const w = await asNobody('nbdsh', ['-u', uri, '-c', "h.pwrite(b'\\x00' * 4096, 0)"]);
      expect(w.code, describeRun(w)).not.toBe(0);
      expect(w.stderr).toMatch(/server policy prevents NBD_OPT_GO/);
      // Nothing was written.
      await runOk('qemu-io', ['-f', 'raw', agent.uri(dev), '-c', 'read -P 0x5a 0 64k']);
    },
    30_000,
  );

  it.runIf(isRoot)(
    'an unprivileged user cannot use the API: the socket refuses, TCP demands the token',
    async () => {
      const sock = await httpAsNobody({ socket: agent.apiSocket }, 'GET', '/v1/devices');
      expect(sock.stdout.trim(), describeRun(sock)).toBe('ERROR 13'); // EACCES
      const tcp = { port: agent.apiPort };
      const tries: [string, string, unknown][] = [
        ['POST', '/v1/devices', { name: 'stolen', size: '1M' }],
        ['GET', '/v1/devices', undefined],
        ['DELETE', `/v1/devices/${dev}?force=true`, undefined],
        ['POST', `/v1/devices/${dev}/pr`, { action: 'register', as: 'x', saKey: '0x1' }],
        ['PUT', `/v1/devices/${dev}/acl`, { entries: null }],
        ['GET', '/metrics', undefined],
        // Every other route that changes something.
        ['POST', `/v1/devices/${dev}/resize`, { size: '32M' }],
        ['POST', `/v1/devices/${dev}/extend`, { pool: 'default', size: '+1M' }],
        ['POST', '/v1/pools/rescan', {}],
        ['POST', '/v1/notify', { name: 'stolen', url: 'http://127.0.0.1:9/' }],
        ['DELETE', '/v1/notify/stolen', undefined],
        ['POST', '/v1/events', { kind: 'dump.completed', subject: 'vm1' }],
        ['GET', '/v1/events', undefined],
      ];
      for (const [method, path, body] of tries) {
        const r = await httpAsNobody(tcp, method, path, body);
        expect(r.stdout, `${method} ${path}\n${describeRun(r)}`).toMatch(
          /^401 [\s\S]*BALLAST_UNAUTHORIZED/,
        );
      }
      // The health check stays open (deploy and load balancers use it).
      expect((await httpAsNobody(tcp, 'GET', '/healthz')).stdout).toMatch(/^200 /);
      // The CLI as that user: the documented exit codes.
      const cli = await asNobody(process.execPath, [
        ballastForNobody(),
        'device',
        'create',
        'stolen',
        '--size',
        '1M',
        '--agent',
        `http://127.0.0.1:${agent.apiPort}`,
      ]);
      expect(cli.code, describeRun(cli)).toBe(7);
      expect(cli.stderr).toContain('BALLAST_UNAUTHORIZED');
      const viaSocket = await asNobody(process.execPath, [
        ballastForNobody(),
        'device',
        'ls',
        '--agent',
        `unix:${agent.apiSocket}`,
      ]);
      expect(viaSocket.code, describeRun(viaSocket)).toBe(3);
      expect(viaSocket.stderr).toContain('BALLAST_AGENT_UNREACHABLE');
      // Root's view: nothing changed.
      const ls = await agent.cli('device', 'ls', '--json');
      expect(ls.code, describeRun(ls)).toBe(0);
      expect(ls.stdout).not.toContain('stolen');
      const pr = await agent.cli('pr', dev, 'show', '--json');
      expect(pr.code, describeRun(pr)).toBe(0);
      expect(pr.stdout).not.toContain('"x"');
      const show = await agent.cli('device', 'show', dev, '--json');
      expect(JSON.parse(show.stdout).size, describeRun(show)).toBe(16 * 1024 * 1024);
      const notify = await agent.cli('notify', 'ls', '--json');
      expect(notify.code, describeRun(notify)).toBe(0);
      expect(notify.stdout).not.toContain('stolen');
    },
    60_000,
  );

  it.runIf(isRoot && kvmGid() !== null)(
    "a member of the socket's group (QEMU under libvirt) reaches the NBD socket",
    async () => {
      const r = await asNobody('nbdinfo', ['--size', agent.uri(dev)], [kvmGid()!]);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stdout.trim()).toBe(String(16 * 1024 * 1024));
    },
  );

  it.runIf(isRoot)('root with the token reaches the TCP API', async () => {
    const r = await agent.cliTcp('device', 'ls');
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain(dev);
  });
});

describeWithTools(['setpriv'], "secure defaults: dumpd's control API", () => {
  // A dump reads a guest's memory onto its dump device and may reboot or power
  // the guest off: on dumpd's TCP listener it needs the token only root reads.
  let d: Dumpd;
  let addr: string;
  let dir: string;
  const isRoot = process.getuid?.() === 0;

  beforeAll(async () => {
    if (!isRoot) return;
    dir = makeTempDir('ballast-sd-dumpd-');
    chmodSync(dir, 0o755);
    const cfg = parseConfig(`
listen: 127.0.0.1:0
runDir: ${path.join(dir, 'run')}
guests:
  - { name: vm1, qmp: ${path.join(dir, 'vm1.qmp')}, device: "nbd+unix:///vm1-dump?socket=/nonexistent" }
`);
    d = new Dumpd(cfg, { resolveDevice: async () => '', log: () => {} });
    addr = await d.start();
  });

  afterAll(async () => {
    await d?.stop();
  });

  it.runIf(isRoot)('an unprivileged user cannot ask for a dump; root can', async () => {
    const token = path.join(dir, 'run', 'token');
    expect(statSync(token).mode & 0o777).toBe(0o600);
    const now = (extra: string[]) => [
      ballastForNobody(),
      'dump',
      'now',
      'vm1',
      '--dumpd',
      addr,
      ...extra,
    ];
    for (const extra of [[], ['--after', 'poweroff'], ['--dumpd-token-file', token]]) {
      const r = await asNobody(process.execPath, now(extra));
      expect(r.code, describeRun(r)).not.toBe(0);
      expect(r.stderr).toContain('DUMP_UNAUTHORIZED');
    }
    const raw = await httpAsNobody(
      { port: Number(addr.split(':').pop()) },
      'POST',
      '/v1/guests/vm1/dump?after=reboot',
    );
    expect(raw.stdout, describeRun(raw)).toMatch(/^401 [\s\S]*DUMP_UNAUTHORIZED/);
    // Root's CLI with the token gets past the check (the guest is not running).
    const root = await run(process.execPath, now(['--dumpd-token-file', token]));
    expect(root.stderr, describeRun(root)).toContain('DUMP_GUEST_OFFLINE');
  });
});
