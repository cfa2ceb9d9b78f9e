// The NBD servers under test: how to start each one on a Unix socket or on
// 127.0.0.1:PORT, the URI fio connects with, how to tell it is ready, and how
// to stop it.

import { accessSync, existsSync, constants as fsc } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import {
  AGENT_DEVICE,
  type AgentFixture,
  type AgentNbd,
  type TlsFiles,
  writeAgentConfig,
} from './fixtures.js';
import type { ServerName } from './options.js';
import { Child, type ExitStatus, findProcess, memoryKiB } from './proc.js';

export type Endpoint = { transport: 'unix'; socket: string } | { transport: 'tcp'; port: number };

/**
 * The URI fio connects with. With `tls`, STARTTLS is required and the server's
 * certificate is not checked (libnbd in fio refuses credential files named in
 * the URI, so there is no CA to check it against, nor a client certificate).
 */
export function endpointUri(ep: Endpoint, opts: { tls?: boolean; exportName?: string } = {}) {
  const name = encodeURIComponent(opts.exportName ?? '');
  const query: string[] = [];
  if (ep.transport === 'unix') query.push(`socket=${encodeURIComponent(ep.socket)}`);
  if (opts.tls) query.push('tls-verify-peer=false');
  const q = query.length > 0 ? `?${query.join('&')}` : '';
  return ep.transport === 'unix'
    ? `${opts.tls ? 'nbds' : 'nbd'}+unix:///${name}${q}`
    : `${opts.tls ? 'nbds' : 'nbd'}://127.0.0.1:${ep.port}/${name}${q}`;
}

export interface ServerCommand {
  command: string;
  args: string[];
  /** Which executable in the spawned process tree is the server proper (for RSS). */
  exePattern: RegExp;
  /** What fio connects to. */
  uri: string;
}

/** What the TLS and agent kinds are started with (made once per run, see fixtures.ts). */
export interface ServerFixtures {
  tls?: TlsFiles;
  /** The agent data directory without a reservation (ballast-agent). */
  agent?: AgentFixture;
  /** The one with the bench identity's Write Exclusive reservation (ballast-pr, ballast-pr-tls). */
  agentPr?: AgentFixture;
}

/**
 * How to run the ballast launcher with `args`. bin/ballast is a node script:
 * spawned directly, its shebang execs node in the same PID; if it is not
 * executable, it is run with this node instead.
 */
export function ballastInvocation(ballastPath: string): { command: string; args: string[] } {
  try {
    accessSync(ballastPath, fsc.X_OK);
    return { command: ballastPath, args: [] };
  } catch {
    return { command: process.execPath, args: [ballastPath] };
  }
}

function need<T>(v: T | undefined, server: ServerName, what: string): T {
  if (v === undefined) throw new Error(`${server}: the ${what} was not prepared`);
  return v;
}

/**
 * The command line of `server` serving `file` on `ep`.
 *
 * qemu-nbd gets `-t` (--persistent) on top of the agreed flags: without it, it
 * exits when its first client disconnects, and fio's nbd engine connects once
 * to size the export and again to run, so nothing would be left to measure.
 */
export function serverCommand(
  server: ServerName,
  file: string,
  ep: Endpoint,
  ballastPath: string,
  fx: ServerFixtures = {},
  /** A name for this session's files (agent config, API socket). */
  session: string = server,
): ServerCommand {
  switch (server) {
    case 'ballast':
    case 'ballast-tls': {
      const where =
        ep.transport === 'unix' ? ['--socket', ep.socket] : ['--listen', `127.0.0.1:${ep.port}`];
      const args = ['serve', file, ...where];
      const tls = server === 'ballast-tls';
      if (tls) {
        const t = need(fx.tls, server, 'TLS certificate');
        args.push('--tls', 'require', '--tls-cert', t.cert, '--tls-key', t.key);
      }
      const b = ballastInvocation(ballastPath);
      return {
        command: b.command,
        args: [...b.args, ...args],
        exePattern: /^node/,
        uri: endpointUri(ep, { tls }),
      };
    }
    case 'ballast-agent':
    case 'ballast-pr':
    case 'ballast-pr-tls': {
      const agent = need(
        server === 'ballast-agent' ? fx.agent : fx.agentPr,
        server,
        'agent data directory',
      );
      const tls = server === 'ballast-pr-tls';
      const nbd: AgentNbd =
        ep.transport === 'unix'
          ? { socket: ep.socket, listen: null }
          : { socket: null, listen: `127.0.0.1:${ep.port}` };
      if (tls) nbd.tls = need(fx.tls, server, 'TLS certificate');
      const config = writeAgentConfig(agent, session, nbd);
      const b = ballastInvocation(ballastPath);
      return {
        command: b.command,
        args: [...b.args, 'agent', '--config', config],
        exePattern: /^node/,
        uri: endpointUri(ep, { tls, exportName: AGENT_DEVICE }),
      };
    }
    case 'nbdkit':
    case 'nbdkit-tls': {
      const where =
        ep.transport === 'unix' ? ['-U', ep.socket] : ['-i', '127.0.0.1', '-p', String(ep.port)];
      const tls = server === 'nbdkit-tls';
      const tlsArgs = tls
        ? ['--tls=require', `--tls-certificates=${need(fx.tls, server, 'TLS certificate').dir}`]
        : [];
      return {
        command: 'nbdkit',
        args: ['--exit-with-parent', '-f', ...where, ...tlsArgs, 'file', `file=${file}`],
        exePattern: /^nbdkit/,
        uri: endpointUri(ep, { tls }),
      };
    }
    case 'qemu-nbd': {
      const where =
        ep.transport === 'unix' ? ['-k', ep.socket] : ['-b', '127.0.0.1', '-p', String(ep.port)];
      return {
        command: 'qemu-nbd',
        args: [
          '-t',
          '-f',
          'raw',
          '-e',
          '4',
          '--discard=unmap',
          '--cache=writeback',
          ...where,
          file,
        ],
        exePattern: /^qemu-nbd/,
        uri: endpointUri(ep),
      };
    }
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error('no port'))));
    });
  });
}

/** Connects once and resolves true if the peer greets with the NBD magic. */
function probe(ep: Endpoint, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    let got = Buffer.alloc(0);
    let settled = false;
    const sock: Socket =
      ep.transport === 'unix' ? connect(ep.socket) : connect(ep.port, '127.0.0.1');
    const finish = (ok: boolean): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    sock.on('data', (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      if (got.length >= 8) finish(got.subarray(0, 8).toString('latin1') === 'NBDMAGIC');
    });
    sock.on('error', () => finish(false));
    sock.on('close', () => finish(false));
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface RunningServer {
  child: Child;
  startMs: number;
}

/**
 * Starts the server and waits until it answers with the NBD greeting. Throws
 * (after stopping it) if it exits or is not ready within `timeoutMs`.
 */
export async function startServer(cmd: ServerCommand, ep: Endpoint, timeoutMs = 20_000) {
  const t0 = performance.now();
  const child = new Child(cmd.command, cmd.args);
  const deadline = t0 + timeoutMs;
  while (performance.now() < deadline) {
    if (!child.running) {
      const st = child.exitStatus!;
      throw new Error(
        `exited before it was ready (code ${st.code}, signal ${st.signal})\n${child.output()}`,
      );
    }
    if (await probe(ep, 2_000)) {
      return { child, startMs: Math.round(performance.now() - t0) } satisfies RunningServer;
    }
    await sleep(50);
  }
  await child.stop(2_000);
  throw new Error(`not connectable within ${timeoutMs} ms\n${child.output()}`);
}

export interface ServerMemory {
  /** The PID whose /proc/PID/status was read. */
  pid: number;
  exe: string;
  how: string;
  vmHwmKiB: number;
  vmRssKiB: number;
}

/** Peak and current RSS of the server proper, read while it still runs. */
export function serverMemory(child: Child, exePattern: RegExp): ServerMemory | undefined {
  const p = findProcess(child.pid, exePattern);
  if (p === undefined) return undefined;
  const m = memoryKiB(p.pid);
  if (m === undefined) return undefined;
  return { pid: p.pid, exe: p.exe, how: p.note, vmHwmKiB: m.vmHwm, vmRssKiB: m.vmRss };
}

/**
 * SIGTERM and wait for the exit. When the server proper is a descendant of the
 * spawned process (a wrapper that forked), it is sent SIGTERM too and waited for,
 * so that no orphan keeps serving into the next session.
 */
export async function stopServer(
  child: Child,
  serverPid?: number,
): Promise<ExitStatus & { killed: boolean }> {
  const other = serverPid !== undefined && serverPid !== child.pid ? serverPid : undefined;
  if (other !== undefined) {
    try {
      process.kill(other, 'SIGTERM');
    } catch {
      // already gone
    }
  }
  const st = await child.stop(10_000);
  if (other !== undefined) {
    const deadline = performance.now() + 10_000;
    while (existsSync(`/proc/${other}`) && performance.now() < deadline) await sleep(50);
    if (existsSync(`/proc/${other}`)) {
      try {
        process.kill(other, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
      return { ...st, killed: true };
    }
  }
  return st;
}
