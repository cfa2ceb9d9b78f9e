// Real OpenSSH servers for the deploy tests: each on its own loopback port with
// its own host key, authorized_keys and config, run as root in the foreground.

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';

export const SSHD = '/usr/sbin/sshd';

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export function keygen(file: string, comment: string, type = 'ed25519'): void {
  rmSync(file, { force: true });
  rmSync(`${file}.pub`, { force: true });
  execFileSync('ssh-keygen', ['-q', '-t', type, '-N', '', '-C', comment, '-f', file]);
}

export class Sshd {
  private child: ChildProcess | null = null;
  private stderr = '';
  readonly hostKey: string;
  readonly config: string;

  constructor(
    readonly name: string,
    readonly dir: string,
    readonly port: number,
    authorizedKey: string,
    /** More host key types the server offers besides ed25519, e.g. ['rsa']. */
    readonly extraKeyTypes: string[] = [],
  ) {
    mkdirSync(dir, { recursive: true });
    this.hostKey = join(dir, 'ssh_host_ed25519_key');
    keygen(this.hostKey, `${name}-host`);
    for (const t of extraKeyTypes) keygen(join(dir, `ssh_host_${t}_key`), `${name}-host`, t);
    writeFileSync(join(dir, 'authorized_keys'), authorizedKey, { mode: 0o600 });
    this.config = join(dir, 'sshd_config');
    writeFileSync(
      this.config,
      [
        `ListenAddress 127.0.0.1:${port}`,
        `HostKey ${this.hostKey}`,
        ...extraKeyTypes.map((t) => `HostKey ${join(dir, `ssh_host_${t}_key`)}`),
        `AuthorizedKeysFile ${join(dir, 'authorized_keys')}`,
        'PidFile none',
        'StrictModes no',
        'UsePAM no',
        'PermitRootLogin prohibit-password',
        'PubkeyAuthentication yes',
        'PasswordAuthentication no',
        'KbdInteractiveAuthentication no',
        'AllowTcpForwarding yes',
        'MaxSessions 30',
        'MaxStartups 50',
        'Subsystem sftp internal-sftp',
        'LogLevel ERROR',
        '',
      ].join('\n'),
    );
  }

  /** The host's public key line (type and base64). */
  publicKey(type = 'ed25519'): string {
    const file = join(this.dir, `ssh_host_${type}_key.pub`);
    return readFileSync(file, 'utf8').split(' ').slice(0, 2).join(' ');
  }

  async start(): Promise<void> {
    mkdirSync('/run/sshd', { recursive: true, mode: 0o755 }); // privilege separation
    this.stderr = '';
    const child = spawn(SSHD, ['-D', '-e', '-f', this.config], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    child.stderr?.on('data', (b: Buffer) => {
      this.stderr += b.toString();
    });
    let exited = false;
    child.once('exit', () => {
      exited = true;
    });
    for (let i = 0; i < 200; i++) {
      if (exited) throw new Error(`sshd ${this.name} exited: ${this.stderr}`);
      if (await canConnect(this.port)) return;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`sshd ${this.name} did not listen on ${this.port}: ${this.stderr}`);
  }

  async stop(): Promise<void> {
    const c = this.child;
    this.child = null;
    if (!c || c.exitCode !== null) return;
    await new Promise<void>((resolve) => {
      c.once('exit', () => resolve());
      c.kill('SIGTERM');
    });
  }

  /** A reinstalled host: new host key, same address. */
  async regenerateHostKey(): Promise<void> {
    await this.stop();
    keygen(this.hostKey, `${this.name}-host-new`);
    await this.start();
  }
}
