// `ballast deploy` against real OpenSSH servers: three sshd "hosts" on loopback
// ports, each with its own host key, authorized_keys and install prefix, and its
// agent on its own API and NBD ports. The agents are the real `ballast agent`
// from the packed release; their API (/healthz, /v1/status) judges the result.

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { releaseEntries } from '../../deploy/release.js';
import { freePort } from '../helpers/server.js';
import { keygen, Sshd } from '../helpers/sshd.js';
import { describeRun, describeWithTools, type RunResult, run } from '../helpers/tools.js';

const REPO = join(import.meta.dirname, '..', '..');
const BALLAST = join(REPO, 'bin', 'ballast');
const NAMES = ['h1', 'h2', 'h3'] as const;
type Name = (typeof NAMES)[number];

interface Host {
  name: Name;
  sshd: Sshd;
  prefix: string;
  api: number;
  nbd: number;
}

let root = '';
let stage = '';
let inventory = '';
let knownHosts = '';
let clientKey = '';
const hosts = {} as Record<Name, Host>;

/** Writes the inventory; `extra` adds per-host settings. */
function writeInventory(extra: Partial<Record<Name, Record<string, unknown>>> = {}): void {
  const doc = {
    defaults: {
      user: 'root',
      key: clientKey,
      timeouts: { connect: 10, step: 60, health: 20 },
      agent: { pools: [{ name: 'default', path: '{prefix}/pools/default' }] },
      // this Node, wherever it is installed: an sshd session's PATH may lack it
      service: {
        command: [process.execPath, '{release}/bin/ballast', 'agent', '--config', '{config}'],
      },
    },
    groups: { pair: {}, solo: {} },
    hosts: Object.fromEntries(
      NAMES.map((n) => {
        const h = hosts[n];
        return [
          n,
          {
            address: '127.0.0.1',
            port: h.sshd.port,
            prefix: h.prefix,
            groups: [n === 'h3' ? 'solo' : 'pair'],
            agent: {
              nbd: { listen: `127.0.0.1:${h.nbd}`, socket: '{prefix}/run/nbd.sock' },
              api: { listen: `127.0.0.1:${h.api}`, socket: '{prefix}/run/api.sock' },
            },
            ...extra[n],
          },
        ];
      }),
    ),
  };
  writeFileSync(inventory, stringify(doc));
}

/** The release to deploy: a copy of this package with its own version. */
function setVersion(version: string): void {
  const p = join(stage, 'package.json');
  const pkg = JSON.parse(readFileSync(p, 'utf8')) as { version: string };
  pkg.version = version;
  writeFileSync(p, `${JSON.stringify(pkg, null, 2)}\n`);
}

function deploy(args: string[], timeoutMs = 150_000): Promise<RunResult> {
  return run(
    process.execPath,
    [
      BALLAST,
      'deploy',
      args[0]!,
      '--inventory',
      inventory,
      '--known-hosts',
      knownHosts,
      ...args.slice(1),
    ],
    { timeoutMs },
  );
}

function releaseArgs(): string[] {
  return ['--release-dir', stage];
}

async function health(h: Host): Promise<{ status?: string; version?: string }> {
  const res = await fetch(`http://127.0.0.1:${h.api}/healthz`);
  return (await res.json()) as { status?: string; version?: string };
}

/** The host agent's bearer token (the TCP API demands it), from its data directory. */
function bearer(h: Host): Record<string, string> {
  const token = readFileSync(join(h.prefix, 'data', 'api-token'), 'utf8').trim();
  return { authorization: `Bearer ${token}` };
}

function current(h: Host, link = 'current'): string {
  return readlinkSync(join(h.prefix, link)).replace(/^deploys\//, '');
}

/** pid of the agent and the deploy it runs (from its environment). */
function agentProcess(h: Host): { pid: number; deploy: string } | null {
  try {
    const pid = Number(readFileSync(join(h.prefix, 'run', 'agent.pid'), 'utf8').trim());
    const env = readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
    const id = env.find((e) => e.startsWith('BALLAST_DEPLOY_ID='));
    return id ? { pid, deploy: id.slice('BALLAST_DEPLOY_ID='.length) } : null;
  } catch {
    return null;
  }
}

function expectOk(r: RunResult): void {
  expect(r.code, describeRun(r)).toBe(0);
}

describeWithTools(['sshd', 'ssh-keygen'], 'ballast deploy against OpenSSH sshd', () => {
  beforeAll(async () => {
    // With UsePAM no, sshd refuses every login to an account whose password is locked ("!").
    const shadow = readFileSync('/etc/shadow', 'utf8').match(/^root:([^:]*):/m)?.[1] ?? '';
    if (shadow.startsWith('!')) {
      throw new Error(
        'root\'s password is locked ("!" in /etc/shadow); sshd would refuse the tests\' logins: run usermod -p "*" root',
      );
    }
    root = mkdtempSync(join(tmpdir(), 'ballast-deploy-'));
    inventory = join(root, 'inventory.yaml');
    knownHosts = join(root, 'known_hosts');
    clientKey = join(root, 'id_ed25519');
    keygen(clientKey, 'deploy-test');
    const pub = readFileSync(`${clientKey}.pub`, 'utf8');
    for (const n of NAMES) {
      const sshd = new Sshd(n, join(root, `${n}-sshd`), await freePort(), pub);
      await sshd.start();
      hosts[n] = {
        name: n,
        sshd,
        prefix: join(root, n),
        api: await freePort(),
        nbd: await freePort(),
      };
    }
    stage = join(root, 'stage');
    mkdirSync(stage);
    for (const e of [...releaseEntries(REPO), 'package-lock.json']) {
      cpSync(join(REPO, e), join(stage, e), { recursive: true, verbatimSymlinks: true });
    }
    setVersion('9.0.1');
    writeInventory();
  });

  afterAll(async () => {
    for (const n of NAMES) {
      const h = hosts[n];
      if (!h) continue;
      const p = agentProcess(h);
      if (p) {
        try {
          process.kill(p.pid, 'SIGKILL');
        } catch {}
      }
      await h.sshd.stop();
    }
    if (root) rmSync(root, { recursive: true, force: true });
  });

  it('refuses hosts whose keys are not in known_hosts', async () => {
    const r = await deploy(['status']);
    expect(r.code, describeRun(r)).toBe(1);
    for (const n of NAMES) expect(r.stdout).toMatch(new RegExp(`${n} .*DEPLOY_HOST_KEY_UNKNOWN`));
    expect(existsSync(knownHosts)).toBe(false);
  });

  it('plans a fresh install on every host, recording the keys with --accept-new', async () => {
    const r = await deploy(['plan', '--accept-new', '--json', ...releaseArgs()]);
    expectOk(r);
    const plan = JSON.parse(r.stdout) as {
      host: string;
      action: string;
      upload: boolean;
      configDiff: string[];
    }[];
    expect(plan.map((p) => [p.host, p.action, p.upload])).toEqual([
      ['h1', 'install', true],
      ['h2', 'install', true],
      ['h3', 'install', true],
    ]);
    expect(plan[0]?.configDiff.join('\n')).toMatch(
      new RegExp(`^\\+ +listen: 127\\.0\\.0\\.1:${hosts.h1.api}$`, 'm'),
    );
    // each key recorded is named on stderr, with its fingerprint
    for (const n of NAMES)
      expect(r.stderr).toMatch(
        new RegExp(
          `^deploy: ${n} \\(\\[127\\.0\\.0\\.1\\]:\\d+\\): ssh-ed25519 key SHA256:\\S+ recorded in ${knownHosts}$`,
          'm',
        ),
      );
    // hashed entries that OpenSSH itself finds
    const lines = readFileSync(knownHosts, 'utf8').trim().split('\n');
    expect(lines).toHaveLength(3);
    expect(lines.every((l) => l.startsWith('|1|'))).toBe(true);
    for (const n of NAMES) {
      const found = execFileSync('ssh-keygen', [
        '-F',
        `[127.0.0.1]:${hosts[n].sshd.port}`,
        '-f',
        knownHosts,
      ]).toString();
      expect(found).toContain(hosts[n].sshd.publicKey());
    }
  });

  it('applies: one host at a time, each agent healthy on its own ports', async () => {
    const r = await deploy(['apply', ...releaseArgs()]);
    expectOk(r);
    for (const n of NAMES) expect(r.stdout).toMatch(new RegExp(`^${n}: deployed 9\\.0\\.1-`, 'm'));
    // rolling: h1 is done before h2 starts
    expect(r.stderr.indexOf('h1: done, healthy')).toBeLessThan(r.stderr.indexOf('h2: connecting'));
    expect(r.stderr).toContain('h1: checksum ok');
    for (const n of NAMES) {
      const h = hosts[n];
      expect(await health(h)).toMatchObject({ status: 'ok', version: '9.0.1' });
      expect(current(h)).toMatch(/^9\.0\.1-[0-9a-f]{12}\.[0-9a-f]{8}$/);
      expect(agentProcess(h)?.deploy).toBe(current(h));
    }
    // a device, to see in status
    const res = await fetch(`http://127.0.0.1:${hosts.h1.api}/v1/devices`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...bearer(hosts.h1) },
      body: JSON.stringify({ name: 'swap0', size: '16M' }),
    });
    expect(res.status).toBe(201);

    const s = await deploy(['status', '--json']);
    expectOk(s);
    const status = JSON.parse(s.stdout) as Record<string, unknown>[];
    expect(status.map((x) => [x.host, x.version, x.agent, x.health, x.devices])).toEqual([
      ['h1', '9.0.1', 'running', 'ok', 1],
      ['h2', '9.0.1', 'running', 'ok', 0],
      ['h3', '9.0.1', 'running', 'ok', 0],
    ]);
    const table = await deploy(['status']);
    expectOk(table);
    expect(table.stdout).toMatch(/^HOST +VERSION +DEPLOY +AGENT +HEALTH +DEVICES/);
  });

  it('a second apply with nothing changed does nothing', async () => {
    const before = NAMES.map((n) => agentProcess(hosts[n])?.pid);
    const r = await deploy(['apply', '--parallel', '3', '--json', ...releaseArgs()]);
    expectOk(r);
    const out = JSON.parse(r.stdout) as { host: string; status: string; result: string }[];
    expect(out.map((x) => [x.host, x.status, x.result])).toEqual(
      NAMES.map((n) => [n, 'ok', 'unchanged']),
    );
    expect(r.stderr).not.toContain('upload');
    expect(NAMES.map((n) => agentProcess(hosts[n])?.pid)).toEqual(before);
  });

  it('exec runs a command on every host, prefixed, with a summary of exit codes', async () => {
    const cmd = `echo "port \${SSH_CONNECTION##* }"; test "\${SSH_CONNECTION##* }" != ${hosts.h2.sshd.port}`;
    const r = await deploy(['exec', '--', cmd]);
    expect(r.code, describeRun(r)).toBe(1);
    for (const n of NAMES) expect(r.stdout).toContain(`${n} | port ${hosts[n].sshd.port}`);
    expect(r.stderr).toMatch(/^h1 +exit 0$/m);
    expect(r.stderr).toMatch(/^h2 +exit 1$/m);
    expect(r.stderr).toContain('DEPLOY_EXEC_FAILED');
    const ok = await deploy(['exec', '--group', 'pair', '--', 'echo', 'ok']);
    expectOk(ok);
    expect(ok.stdout).not.toContain('h3 |');
  });

  it('upgrades every host to a second version (three at a time)', async () => {
    const v1 = Object.fromEntries(NAMES.map((n) => [n, current(hosts[n])]));
    setVersion('9.0.2');
    const p = await deploy(['plan', '--json', ...releaseArgs()]);
    expectOk(p);
    expect((JSON.parse(p.stdout) as { action: string }[]).map((x) => x.action)).toEqual([
      'upgrade',
      'upgrade',
      'upgrade',
    ]);
    const r = await deploy(['apply', '--parallel', '3', ...releaseArgs()]);
    expectOk(r);
    for (const n of NAMES) {
      expect(await health(hosts[n])).toMatchObject({ status: 'ok', version: '9.0.2' });
      expect(current(hosts[n], 'previous')).toBe(v1[n]);
    }
    // the agent's state survives the upgrade
    const dev = await fetch(`http://127.0.0.1:${hosts.h1.api}/v1/devices/swap0`, {
      headers: bearer(hosts.h1),
    });
    expect(dev.status).toBe(200);
  });

  it('stops the rollout at a host that fails its health check, and rolls that host back', async () => {
    const v2 = Object.fromEntries(NAMES.map((n) => [n, current(hosts[n])]));
    setVersion('9.0.3');
    // h2's new agent runs but never becomes healthy
    const sick =
      'require(\'http\').createServer((q,s)=>{s.writeHead(503);s.end(\'{"status":"starting"}\')})' +
      `.listen(${hosts.h2.api},'127.0.0.1')`;
    writeInventory({
      h2: {
        service: { command: [process.execPath, '-e', sick, '{config}'] },
        timeouts: { health: 3 },
      },
    });
    const r = await deploy(['apply', ...releaseArgs()]);
    expect(r.code, describeRun(r)).toBe(1);
    expect(r.stderr).toContain('DEPLOY_ROLLOUT_FAILED');
    // The summary names the host's own code, not only that it failed.
    expect(r.stderr).toMatch(/rollout stopped: h2 \(failed: DEPLOY_HEALTH_FAILED\)/);
    expect(r.stdout).toMatch(/^h1: deployed 9\.0\.3-/m);
    expect(r.stdout).toMatch(/^h2: FAILED: DEPLOY_HEALTH_FAILED/m);
    expect(r.stdout).toContain(
      "`ballast deploy logs -g h2` shows the agent's log, and timeouts.health gives a slow host longer",
    );
    expect(r.stdout).toContain(`rolled back to ${v2.h2}`);
    expect(r.stdout).toMatch(/^h3: skipped \(an earlier host failed\)$/m);

    expect(await health(hosts.h1)).toMatchObject({ version: '9.0.3' });
    expect(current(hosts.h2)).toBe(v2.h2);
    expect(agentProcess(hosts.h2)?.deploy).toBe(v2.h2);
    expect(await health(hosts.h2)).toMatchObject({ status: 'ok', version: '9.0.2' });
    expect(current(hosts.h3)).toBe(v2.h3);
    expect(await health(hosts.h3)).toMatchObject({ version: '9.0.2' });
    writeInventory();
  });

  it('rollback takes a host back to its previous deploy', async () => {
    const before = current(hosts.h1);
    const prev = current(hosts.h1, 'previous');
    const r = await deploy(['rollback', '--group', 'h1']);
    expectOk(r);
    expect(r.stdout).toContain(`h1: rolled back to ${prev}`);
    expect(current(hosts.h1)).toBe(prev);
    expect(current(hosts.h1, 'previous')).toBe(before);
    expect(await health(hosts.h1)).toMatchObject({ version: '9.0.2' });
  });

  it("logs shows the tail of each agent's log", async () => {
    const r = await deploy(['logs', '--lines', '500']);
    expectOk(r);
    for (const n of NAMES) expect(r.stdout).toContain(`==> ${n} <==`);
    expect(r.stdout).toContain('=== ballast deploy: starting');
  });

  it('reaches a host through a jump host', async () => {
    writeInventory({ h3: { jump: 'h1' } });
    const r = await deploy(['status', '--json', '--group', 'h3']);
    writeInventory();
    expectOk(r);
    expect(JSON.parse(r.stdout)).toMatchObject([{ host: 'h3', agent: 'running', health: 'ok' }]);
  });

  it('Ctrl-C leaves every host on its old or its new release', async () => {
    setVersion('9.0.4');
    const old = { h1: current(hosts.h1), h2: current(hosts.h2) };
    const child: ChildProcess = spawn(
      process.execPath,
      [
        BALLAST,
        'deploy',
        'apply',
        '-g',
        'pair',
        '-i',
        inventory,
        '-k',
        knownHosts,
        ...releaseArgs(),
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stderr = '';
    let stdout = '';
    child.stdout?.on('data', (b: Buffer) => {
      stdout += b.toString();
    });
    const code = await new Promise<number | null>((resolve) => {
      child.stderr?.on('data', (b: Buffer) => {
        const had = stderr.includes('h1: starting');
        stderr += b.toString();
        if (!had && stderr.includes('h1: starting')) child.kill('SIGINT');
      });
      child.on('exit', (c) => resolve(c));
    });
    expect(code, `${stderr}\n${stdout}`).toBe(1);
    expect(stderr).toContain('DEPLOY_INTERRUPTED');
    expect(stdout).toMatch(/^h2: skipped \(interrupted\)$/m);
    for (const n of ['h1', 'h2'] as const) {
      const h = hosts[n];
      const cur = current(h);
      if (n === 'h2') expect(cur).toBe(old.h2);
      else expect(cur === old.h1 || cur.startsWith('9.0.4-'), cur).toBe(true);
      // what runs is what `current` names, and it is healthy
      expect(agentProcess(h)?.deploy).toBe(cur);
      expect(await health(h)).toMatchObject({ status: 'ok' });
    }
    setVersion('9.0.2');
  });

  it('refuses to work on a host another deploy holds', async () => {
    // -o: only flock holds the lock, so killing it lets the lock go (sleep would keep it).
    const holder = spawn('flock', ['-o', join(hosts.h1.prefix, '.deploy.lock'), 'sleep', '60'], {
      stdio: 'ignore',
    });
    try {
      await new Promise((r) => setTimeout(r, 300));
      const r = await deploy(['rollback', '--group', 'h1']);
      expect(r.code, describeRun(r)).toBe(1);
      expect(r.stdout).toContain('DEPLOY_HOST_BUSY');
    } finally {
      holder.kill();
    }
  });

  it('authenticates through an ssh-agent', async () => {
    const sock = join(root, 'agent.sock');
    const agent = spawn('ssh-agent', ['-D', '-a', sock], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 100 && !existsSync(sock); i++)
        await new Promise((r) => setTimeout(r, 50));
      execFileSync('ssh-add', ['-q', clientKey], { env: { ...process.env, SSH_AUTH_SOCK: sock } });
      writeInventory({ h1: { key: null, sshAgent: sock } });
      const r = await deploy(['status', '--json', '--group', 'h1']);
      expectOk(r);
      expect(JSON.parse(r.stdout)).toMatchObject([{ host: 'h1', agent: 'running' }]);
    } finally {
      agent.kill();
      writeInventory();
    }
  });

  it('gives connection failures their codes', async () => {
    const silent = net.createServer(() => {}); // accepts, never speaks SSH
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const otherKey = join(root, 'other_key');
    keygen(otherKey, 'not-authorized');
    const inv = join(root, 'failures.yaml');
    writeFileSync(
      inv,
      stringify({
        // Only the silent host is meant to time out: the others get a deadline that
        // a real sshd meets on a busy machine.
        defaults: { user: 'root', key: clientKey, timeouts: { connect: 60 } },
        hosts: {
          closed: { address: '127.0.0.1', port: await freePort() },
          silent: {
            address: '127.0.0.1',
            port: (silent.address() as net.AddressInfo).port,
            timeouts: { connect: 1 },
          },
          badkey: { address: '127.0.0.1', port: hosts.h1.sshd.port, key: otherKey },
          nokey: { address: '127.0.0.1', port: hosts.h1.sshd.port, key: join(root, 'nope') },
        },
      }),
    );
    try {
      const r = await run(process.execPath, [
        BALLAST,
        'deploy',
        'status',
        '-i',
        inv,
        '-k',
        knownHosts,
      ]);
      expect(r.code, describeRun(r)).toBe(1);
      expect(r.stdout).toMatch(/^closed .*DEPLOY_CONNECT_FAILED/m);
      expect(r.stdout).toMatch(/^silent .*DEPLOY_CONNECT_TIMEOUT/m);
      expect(r.stdout).toMatch(/^badkey .*DEPLOY_AUTH_FAILED/m);
      expect(r.stdout).toMatch(/^nokey .*DEPLOY_KEY_UNREADABLE/m);
    } finally {
      silent.close();
    }
  });

  it('asks a host for the key type known_hosts has for it', async () => {
    // The server offers ed25519 first; only its RSA key is known. OpenSSH clients then
    // ask for RSA, and so must we, or the host would look like it changed its key.
    const pub = readFileSync(`${clientKey}.pub`, 'utf8');
    const sshd = new Sshd('multi', join(root, 'multi-sshd'), await freePort(), pub, ['rsa']);
    await sshd.start();
    try {
      const kh = join(root, 'known_hosts_rsa');
      writeFileSync(kh, `[127.0.0.1]:${sshd.port} ${sshd.publicKey('rsa')}\n`);
      const inv = join(root, 'multi.yaml');
      writeFileSync(
        inv,
        stringify({
          defaults: { user: 'root', key: clientKey },
          hosts: { multi: { address: '127.0.0.1', port: sshd.port } },
        }),
      );
      const r = await run(process.execPath, [
        BALLAST,
        'deploy',
        'exec',
        '-i',
        inv,
        '-k',
        kh,
        '--',
        'echo',
        'hello',
      ]);
      expectOk(r);
      expect(r.stdout).toContain('multi | hello');
      expect(readFileSync(kh, 'utf8').trim().split('\n')).toHaveLength(1);
    } finally {
      await sshd.stop();
    }
  });

  it('refuses a host whose key changed, even with --accept-new', async () => {
    const before = readFileSync(knownHosts, 'utf8');
    await hosts.h3.sshd.regenerateHostKey();
    const r = await deploy(['status', '--accept-new']);
    expect(r.code, describeRun(r)).toBe(1);
    expect(r.stdout).toMatch(/^h3 .*DEPLOY_HOST_KEY_CHANGED/m);
    expect(r.stderr).toContain('h3: DEPLOY_HOST_KEY_CHANGED: HOST KEY CHANGED for h3');
    expect(r.stdout).toMatch(/^h1 +9\.0\.\d +/m);
    expect(readFileSync(knownHosts, 'utf8')).toBe(before);
    const a = await deploy(['apply', '--group', 'h3', '--accept-new', ...releaseArgs()]);
    expect(a.code, describeRun(a)).toBe(1);
    expect(a.stdout).toContain('DEPLOY_HOST_KEY_CHANGED');
    expect(a.stderr).toMatch(/DEPLOY_ROLLOUT_FAILED: .*h3 \(failed: DEPLOY_HOST_KEY_CHANGED\)/);
  });

  it('stop keeps an agent stopped; uninstall removes it and keeps its data', async () => {
    const h = hosts.h1;
    expect(agentProcess(h)).not.toBeNull();
    const s = await deploy(['stop', '--group', 'h1']);
    expectOk(s);
    expect(s.stdout.trim()).toBe('h1: stopped');
    expect(agentProcess(h)).toBeNull();
    await expect(health(h)).rejects.toThrow();
    const again = await deploy(['stop', '--group', 'h1']);
    expect(again.stdout.trim()).toBe('h1: was not running');

    const u = await deploy(['uninstall', '--group', 'h1']);
    expectOk(u);
    expect(u.stdout.trim()).toBe('h1: uninstalled');
    expect(u.stderr).toContain(`h1: uninstalled; ${h.prefix}/data and the pools kept`);
    for (const gone of ['releases', 'deploys', 'current', 'previous', 'log', 'run'])
      expect(existsSync(join(h.prefix, gone)), gone).toBe(false);
    expect(existsSync(join(h.prefix, 'data', 'api-token'))).toBe(true);
    // h2 was not touched.
    expect(await health(hosts.h2)).toMatchObject({ status: 'ok' });

    const p = await deploy(['uninstall', '--group', 'h1', '--purge']);
    expectOk(p);
    expect(existsSync(h.prefix) ? readdirSync(h.prefix, { recursive: true }) : 'gone').toBe('gone');
    // nothing to go back to, and why
    const r = await deploy(['rollback', '--group', 'h1']);
    expect(r.code, describeRun(r)).toBe(1);
    expect(r.stdout).toContain(
      'h1: DEPLOY_NO_PREVIOUS: h1: no previous deploy to go back to (current: none); an apply that changes',
    );
  });
});
