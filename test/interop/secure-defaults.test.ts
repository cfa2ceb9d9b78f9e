// Secure by default: a local unprivileged user (uid 65534, through setpriv)
// tries what the agent's defaults once allowed: reading and writing a guest's
// device over NBD (Unix socket and TCP), creating devices, changing a
// reservation, scraping /metrics. Each is refused with its documented error;
// root's CLI works with no flags, and a member of the socket's group (the kvm
// group QEMU runs in under libvirt) reaches the NBD socket.

import { chmodSync, readFileSync, statSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { BALLAST_BIN } from '../helpers/server.js';
import {
  describeRun,
  describeWithTools,
  type RunResult,
  run,
  runOk,
  SYSTEM_PYTHON,
} from '../helpers/tools.js';

const NOBODY = 65534;

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

  it.runIf(isRoot)('an unprivileged user cannot open a device on the NBD socket', async () => {
    const r = await asNobody('nbdinfo', ['--size', agent.uri(dev)]);
    expect(r.code, describeRun(r)).not.toBe(0);
    expect(r.stderr).toMatch(/Permission denied/);
  });

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
        BALLAST_BIN,
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
        BALLAST_BIN,
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
    const r = await run(process.execPath, [
      BALLAST_BIN,
      'device',
      'ls',
      '--agent',
      `http://127.0.0.1:${agent.apiPort}`,
      '--token-file',
      `${agent.dataDir}/api-token`,
    ]);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain(dev);
  });
});
