// A real libvirtd (and its virtlogd) for tests, without systemd and without touching
// the host's libvirt: both run in a private mount namespace (unshare -m) where
// /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
// /etc/libvirt are directories of the test's temp dir. Their sockets are therefore in
// the temp dir too (RUN/libvirt-sock), reached as qemu:///system?socket=RUN/libvirt-sock,
// with no authentication (root only: the socket is 0700). QEMU runs as Debian's
// compiled-in default, libvirt-qemu:kvm; its log is LOG/qemu/NAME.log.
//
// qemu.conf differs from Debian's defaults only where a container needs it: no
// cgroups (libvirtd has no systemd to ask), no private /dev for QEMU, and no
// AppArmor profile (the README says what AppArmor needs).

import { type ChildProcess, spawn } from 'node:child_process';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { type AgentHandle, startAgent } from './agent.js';
import { killAfterAll, makeTempDir } from './server.js';
import { type RunResult, run, toolEnv } from './tools.js';

/** What a libvirt test needs installed. */
export const LIBVIRT_TOOLS = ['libvirtd', 'virtlogd', 'virsh', 'unshare', 'qemu-system-x86_64'];

const MOUNTS: [string, string][] = [
  ['run', '/run/libvirt'],
  ['lib', '/var/lib/libvirt'],
  ['cache', '/var/cache/libvirt'],
  ['log', '/var/log/libvirt'],
  ['etc', '/etc/libvirt'],
];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class Libvirtd {
  private err = '';
  private constructor(
    readonly dir: string,
    private readonly child: ChildProcess,
  ) {}

  /** The connection URI (virsh -c, LIBVIRT_DEFAULT_URI, dumpd's `libvirt:`). */
  get uri(): string {
    return `qemu:///system?socket=${path.join(this.dir, 'run', 'libvirt-sock')}`;
  }

  /** libvirtd's own log (errors and warnings). */
  log(): string {
    try {
      return readFileSync(path.join(this.dir, 'libvirtd.log'), 'utf8') + this.err;
    } catch {
      return this.err;
    }
  }

  /** QEMU's log for a domain (its command line and stderr). */
  qemuLog(domain: string): string {
    try {
      return readFileSync(path.join(this.dir, 'log', 'qemu', `${domain}.log`), 'utf8');
    } catch {
      return '';
    }
  }

  /** The pid of a running domain's QEMU. */
  qemuPid(domain: string): number {
    return Number(readFileSync(path.join(this.dir, 'run', 'qemu', `${domain}.pid`), 'utf8'));
  }

  virsh(args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
    return run('virsh', ['-c', this.uri, ...args], { timeoutMs: 120_000, ...opts });
  }

  /** `hostUuid`: a host UUID of its own, so that two of them can migrate to each other. */
  static async start(opts: { hostUuid?: string } = {}): Promise<Libvirtd> {
    const dir = makeTempDir('ballast-lv-');
    chmodSync(dir, 0o755);
    for (const [sub] of MOUNTS) mkdirSync(path.join(dir, sub), { mode: 0o755 });
    for (const [sub] of MOUNTS) chmodSync(path.join(dir, sub), 0o755);
    // The mount points; libvirt's package makes all but /run/libvirt (made at boot).
    for (const [, target] of MOUNTS) mkdirSync(target, { recursive: true });
    const etc = path.join(dir, 'etc');
    writeFileSync(
      path.join(etc, 'libvirtd.conf'),
      [
        `unix_sock_dir = "${path.join(dir, 'run')}"`,
        'unix_sock_rw_perms = "0700"',
        'auth_unix_rw = "none"',
        'auth_unix_ro = "none"',
        `log_outputs = "3:file:${path.join(dir, 'libvirtd.log')}"`,
        ...(opts.hostUuid ? [`host_uuid = "${opts.hostUuid}"`] : []),
        '',
      ].join('\n'),
    );
    writeFileSync(
      path.join(etc, 'virtlogd.conf'),
      `log_outputs = "3:file:${path.join(dir, 'virtlogd.log')}"\n`,
    );
    writeFileSync(
      path.join(etc, 'qemu.conf'),
      ['cgroup_controllers = [ ]', 'namespaces = [ ]', 'security_driver = "none"', ''].join('\n'),
    );
    const script = [
      'set -e',
      ...MOUNTS.map(([sub, target]) => `mount --bind '${path.join(dir, sub)}' '${target}'`),
      `virtlogd -d -f /etc/libvirt/virtlogd.conf -p '${path.join(dir, 'virtlogd.pid')}'`,
      `exec libvirtd -f /etc/libvirt/libvirtd.conf -p '${path.join(dir, 'libvirtd.pid')}'`,
    ].join('\n');
    const child = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script], {
      env: toolEnv(),
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    killAfterAll(child);
    const d = new Libvirtd(dir, child);
    child.stderr?.on('data', (b: Buffer) => {
      d.err += b.toString();
    });
    child.once('exit', (code, signal) => {
      d.err += `\nlibvirtd exited (${code ?? signal})\n`;
    });
    // The first connection waits for the QEMU driver to probe QEMU's capabilities.
    const deadline = Date.now() + 120_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`libvirtd exited at start:\n${d.log()}`);
      if (existsSync(path.join(dir, 'run', 'libvirt-sock'))) {
        const r = await d.virsh(['version'], { timeoutMs: 120_000 });
        if (r.code === 0 && r.stdout.includes('QEMU')) return d;
      }
      if (Date.now() > deadline) throw new Error(`libvirtd did not come up:\n${d.log()}`);
      await sleep(200);
    }
  }

  /** Destroys every domain, then stops libvirtd and virtlogd. */
  async stop(): Promise<void> {
    const list = await this.virsh(['list', '--name']).catch(() => null);
    for (const name of list?.stdout.split('\n').filter((l) => l.trim()) ?? [])
      await this.virsh(['destroy', name.trim()]).catch(() => {});
    if (this.child.exitCode === null) {
      const gone = new Promise((r) => this.child.once('exit', r));
      this.child.kill('SIGTERM');
      const t = setTimeout(() => this.child.kill('SIGKILL'), 20_000);
      await gone;
      clearTimeout(t);
    }
    // A QEMU whose libvirtd died (or did not destroy it) is killed by its pid file.
    const pids = [path.join(this.dir, 'virtlogd.pid')];
    try {
      for (const f of readdirSync(path.join(this.dir, 'run', 'qemu')))
        if (f.endsWith('.pid')) pids.push(path.join(this.dir, 'run', 'qemu', f));
    } catch {}
    for (const f of pids) {
      try {
        const pid = Number(readFileSync(f, 'utf8'));
        if (pid > 1) process.kill(pid, 'SIGTERM');
      } catch {}
    }
  }
}

/**
 * An agent in DIR/agent whose NBD socket (DIR/agent/run/ballast/nbd.sock) libvirt's
 * QEMU, running as libvirt-qemu, must reach: the agent makes the socket's directory
 * itself, under the strictest umask, as a host's agent does.
 */
export async function startAgentForLibvirt(dir: string): Promise<AgentHandle> {
  const old = process.umask(0o077);
  try {
    const agentDir = path.join(dir, 'agent');
    mkdirSync(agentDir, { mode: 0o755 });
    chmodSync(agentDir, 0o755);
    return await startAgent({
      dir: agentDir,
      nbd: { listen: [], socket: path.join(agentDir, 'run', 'ballast', 'nbd.sock') },
    });
  } finally {
    process.umask(old);
  }
}
