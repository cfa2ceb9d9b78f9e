// SSH to one inventory host (directly or through one jump host) with ssh2:
// host keys checked against known_hosts, commands with a timeout each, SFTP
// uploads, and HTTP to the agent's API through a forwarded channel.

import { readFileSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import { Client, type ClientChannel, type ConnectConfig } from 'ssh2';
import { DeployError } from './errors.js';
import type { HostSpec, JumpSpec } from './inventory.js';
import type { KnownHosts } from './known-hosts.js';

/** ssh2's host key algorithms, in its default order. */
const HOST_KEY_ALGORITHMS = [
  'ssh-ed25519',
  'ecdsa-sha2-nistp256',
  'ecdsa-sha2-nistp384',
  'ecdsa-sha2-nistp521',
  'rsa-sha2-512',
  'rsa-sha2-256',
  'ssh-rsa',
];

export interface ExecResult {
  code: number;
  signal?: string;
  stdout: string;
  stderr: string;
}

export interface ExecOptions {
  timeoutMs: number;
  /** Called with each chunk as it arrives (for prefixed live output). */
  onStdout?: (chunk: Buffer) => void;
  onStderr?: (chunk: Buffer) => void;
  /** What the step is, for error messages. */
  step?: string;
}

export interface HttpResult {
  status: number;
  body: string;
}

/** Where an SSH connection goes: the host itself, or its jump host. */
type Endpoint = JumpSpec;

function connectConfig(
  ep: Endpoint,
  kh: KnownHosts,
  timeoutMs: number,
  failure: { error?: DeployError },
): ConnectConfig {
  const cfg: ConnectConfig = {
    host: ep.address,
    port: ep.port,
    username: ep.user,
    readyTimeout: timeoutMs,
    keepaliveInterval: 5000,
    keepaliveCountMax: 3,
    hostVerifier: (key: Buffer) => {
      try {
        kh.check(ep.label, ep.address, ep.port, key);
        return true;
      } catch (e) {
        failure.error = e as DeployError;
        return false;
      }
    },
  };
  const known = kh
    .preferredAlgorithms(ep.address, ep.port)
    .filter((a) => HOST_KEY_ALGORITHMS.includes(a));
  if (known.length > 0) {
    cfg.algorithms = {
      serverHostKey: [...known, ...HOST_KEY_ALGORITHMS.filter((a) => !known.includes(a))] as never,
    };
  }
  if (ep.key) {
    try {
      cfg.privateKey = readFileSync(ep.key);
    } catch (e) {
      throw new DeployError(
        'DEPLOY_KEY_UNREADABLE',
        `${ep.label}: cannot read key ${ep.key}${ep.keyAsWritten ? ` (key: ${JSON.stringify(ep.keyAsWritten)} is relative, so it is taken from the inventory's folder)` : ''}: ${(e as Error).message}`,
        { host: ep.label },
      );
    }
  }
  if (ep.sshAgent) cfg.agent = ep.sshAgent;
  return cfg;
}

function open(ep: Endpoint, kh: KnownHosts, timeoutMs: number, sock?: Duplex): Promise<Client> {
  const failure: { error?: DeployError } = {};
  const cfg = connectConfig(ep, kh, timeoutMs, failure);
  if (sock) cfg.sock = sock as never;
  return new Promise((resolve, reject) => {
    const c = new Client();
    let settled = false;
    const done = (err: Error | null) => {
      if (settled) return;
      settled = true;
      if (err) {
        c.end();
        reject(err);
      } else {
        resolve(c);
      }
    };
    c.once('ready', () => done(null));
    c.on('error', (e: Error & { level?: string; code?: string }) => {
      if (settled) return;
      const where = `${ep.label} (${ep.user}@${ep.address}:${ep.port})`;
      if (failure.error) return done(failure.error);
      if (e.level === 'client-authentication') {
        return done(
          new DeployError(
            'DEPLOY_AUTH_FAILED',
            `${where}: the server accepted none of our keys (${e.message})`,
            { host: ep.label, cause: e },
          ),
        );
      }
      if (e.level === 'client-timeout' || /Timed out/.test(e.message)) {
        return done(
          new DeployError(
            'DEPLOY_CONNECT_TIMEOUT',
            `${where}: no SSH session within ${Math.round(timeoutMs / 1000)} s`,
            { host: ep.label, cause: e },
          ),
        );
      }
      done(
        new DeployError('DEPLOY_CONNECT_FAILED', `${where}: ${e.code ?? ''} ${e.message}`.trim(), {
          host: ep.label,
          cause: e,
        }),
      );
    });
    c.once('close', () =>
      done(
        failure.error ??
          new DeployError(
            'DEPLOY_CONNECT_FAILED',
            `${ep.label}: the connection closed during the handshake`,
            {
              host: ep.label,
            },
          ),
      ),
    );
    try {
      c.connect(cfg);
    } catch (e) {
      done(
        new DeployError('DEPLOY_CONNECT_FAILED', `${ep.label}: ${(e as Error).message}`, {
          host: ep.label,
          cause: e,
        }),
      );
    }
  });
}

function forward(c: Client, host: string, port: number): Promise<ClientChannel> {
  return new Promise((resolve, reject) => {
    c.forwardOut('127.0.0.1', 0, host, port, (err, stream) =>
      err ? reject(err) : resolve(stream),
    );
  });
}

/** One SSH session to a host. */
export class Session {
  private constructor(
    readonly host: HostSpec,
    private readonly client: Client,
    private readonly jump: Client | undefined,
  ) {}

  static async connect(host: HostSpec, kh: KnownHosts): Promise<Session> {
    const ms = host.timeouts.connectMs;
    const target: Endpoint = { ...host, label: host.name };
    if (!host.jump) return new Session(host, await open(target, kh, ms), undefined);
    const j: JumpSpec = host.jump;
    const jump = await open(j, kh, ms);
    try {
      const sock = await forward(jump, host.address, host.port).catch((e: Error) => {
        throw new DeployError(
          'DEPLOY_CONNECT_FAILED',
          `${host.name}: jump host ${j.label} could not reach ${host.address}:${host.port}: ${e.message}`,
          { host: host.name, cause: e },
        );
      });
      return new Session(host, await open(target, kh, ms, sock), jump);
    } catch (e) {
      jump.end();
      throw e;
    }
  }

  close(): void {
    this.client.end();
    this.jump?.end();
  }

  /** A step that could not start on this host (the channel or SFTP refused). */
  private stepFailed(step: string, err: Error): DeployError {
    return new DeployError('DEPLOY_STEP_FAILED', `${this.host.name}: ${step}: ${err.message}`, {
      host: this.host.name,
      cause: err,
    });
  }

  private stepTimedOut(step: string, timeoutMs: number): DeployError {
    return new DeployError(
      'DEPLOY_STEP_TIMEOUT',
      `${this.host.name}: ${step} did not finish within ${Math.round(timeoutMs / 1000)} s`,
      { host: this.host.name },
    );
  }

  /** Runs a shell command; resolves with its exit code (never rejects on non-zero). */
  exec(command: string, opts: ExecOptions): Promise<ExecResult> {
    const step = opts.step ?? 'command';
    return new Promise((resolve, reject) => {
      this.client.exec(command, (err, stream) => {
        if (err) {
          reject(this.stepFailed(step, err));
          return;
        }
        const out: Buffer[] = [];
        const errs: Buffer[] = [];
        let timedOut = false;
        const timer = setTimeout(() => {
          timedOut = true;
          try {
            stream.signal('KILL');
          } catch {}
          stream.close();
        }, opts.timeoutMs);
        stream.on('data', (b: Buffer) => {
          out.push(b);
          opts.onStdout?.(b);
        });
        stream.stderr.on('data', (b: Buffer) => {
          errs.push(b);
          opts.onStderr?.(b);
        });
        stream.on('close', (code: number | null, signal?: string) => {
          clearTimeout(timer);
          if (timedOut) {
            reject(this.stepTimedOut(step, opts.timeoutMs));
            return;
          }
          const r: ExecResult = {
            code: code ?? 255,
            stdout: Buffer.concat(out).toString('utf8'),
            stderr: Buffer.concat(errs).toString('utf8'),
          };
          if (signal) r.signal = signal;
          resolve(r);
        });
      });
    });
  }

  /**
   * Starts a command that prints the line `marker` once it holds something (a lock) and
   * keeps it until its stdin closes: resolves with the release function after that line,
   * or with the exit code if the command ends first. The hold ends with the session.
   */
  hold(
    command: string,
    marker: string,
    step: string,
    timeoutMs: number,
  ): Promise<(() => void) | number> {
    return new Promise((resolve, reject) => {
      this.client.exec(command, (err, stream) => {
        if (err) {
          reject(this.stepFailed(step, err));
          return;
        }
        let settled = false;
        const timer = setTimeout(() => {
          if (settled) return;
          settled = true;
          stream.close();
          reject(this.stepTimedOut(step, timeoutMs));
        }, timeoutMs);
        let seen = '';
        stream.on('data', (b: Buffer) => {
          if (settled) return;
          seen = (seen + b.toString('utf8')).slice(-4096);
          if (!seen.split('\n').includes(marker)) return;
          settled = true;
          clearTimeout(timer);
          resolve(() => stream.end());
        });
        stream.stderr.resume();
        stream.on('close', (code: number | null) => {
          clearTimeout(timer);
          if (settled) return;
          settled = true;
          resolve(code ?? 255);
        });
      });
    });
  }

  /** Runs a command that must succeed; the error carries its stderr. */
  async run(command: string, step: string, timeoutMs = this.host.timeouts.stepMs): Promise<string> {
    const r = await this.exec(command, { timeoutMs, step });
    if (r.code !== 0) {
      const detail = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-5).join('\n  ');
      throw new DeployError(
        'DEPLOY_STEP_FAILED',
        `${this.host.name}: ${step} failed (exit ${r.code})${detail ? `:\n  ${detail}` : ''}`,
        { host: this.host.name },
      );
    }
    return r.stdout;
  }

  /** Copies a local file to `remote` over SFTP. */
  upload(local: string, remote: string, timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const fail = (e: Error) => reject(this.stepFailed('upload', e));
      const timer = setTimeout(() => reject(this.stepTimedOut('upload', timeoutMs)), timeoutMs);
      this.client.sftp((err, sftp) => {
        if (err) {
          clearTimeout(timer);
          fail(err);
          return;
        }
        sftp.fastPut(local, remote, { mode: 0o600 }, (e) => {
          clearTimeout(timer);
          sftp.end();
          if (e) fail(e);
          else resolve();
        });
      });
    });
  }

  /** GET over a channel forwarded to host:port as seen from the remote host. */
  async httpGet(
    host: string,
    port: number,
    path: string,
    timeoutMs: number,
    token?: string,
  ): Promise<HttpResult> {
    const stream = await forward(this.client, host, port);
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      const timer = setTimeout(() => {
        stream.close();
        reject(new Error(`no answer from ${host}:${port}${path} within ${timeoutMs} ms`));
      }, timeoutMs);
      stream.on('data', (b: Buffer) => chunks.push(b));
      stream.on('error', (e: Error) => {
        clearTimeout(timer);
        reject(e);
      });
      stream.on('close', () => {
        clearTimeout(timer);
        const text = Buffer.concat(chunks).toString('utf8');
        const m = /^HTTP\/1\.[01] (\d{3})[^\r\n]*\r\n([\s\S]*?)\r\n\r\n([\s\S]*)$/.exec(text);
        if (!m) {
          reject(new Error(`no HTTP answer from ${host}:${port}`));
          return;
        }
        resolve({ status: Number(m[1]), body: m[3] ?? '' });
      });
      const auth = token ? `Authorization: Bearer ${token}\r\n` : '';
      stream.end(
        `GET ${path} HTTP/1.0\r\nHost: ${host}:${port}\r\n${auth}Connection: close\r\n\r\n`,
      );
    });
  }
}
