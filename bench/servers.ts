// The three NBD servers under test: how to start each one on a Unix socket or
// on 127.0.0.1:PORT, how to tell it is ready, and how to stop it.

import { accessSync, existsSync, constants as fsc } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import type { ServerName } from './options.js';
import { Child, type ExitStatus, findProcess, memoryKiB } from './proc.js';

export type Endpoint = { transport: 'unix'; socket: string } | { transport: 'tcp'; port: number };

export function endpointUri(ep: Endpoint): string {
  return ep.transport === 'unix'
    ? `nbd+unix:///?socket=${encodeURIComponent(ep.socket)}`
    : `nbd://127.0.0.1:${ep.port}/`;
}

export interface ServerCommand {
  command: string;
  args: string[];
  /** Which executable in the spawned process tree is the server proper (for RSS). */
  exePattern: RegExp;
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
): ServerCommand {
  switch (server) {
    case 'ballast': {
      const where =
        ep.transport === 'unix' ? ['--socket', ep.socket] : ['--listen', `127.0.0.1:${ep.port}`];
      const args = ['serve', file, ...where];
      // bin/ballast is a node script. Spawned directly, its shebang execs node in
      // the same PID; if it is not executable, run it with this node instead.
      let executable = true;
      try {
        accessSync(ballastPath, fsc.X_OK);
      } catch {
        executable = false;
      }
      return executable
        ? { command: ballastPath, args, exePattern: /^node/ }
        : { command: process.execPath, args: [ballastPath, ...args], exePattern: /^node/ };
    }
    case 'nbdkit': {
      const where =
        ep.transport === 'unix' ? ['-U', ep.socket] : ['-i', '127.0.0.1', '-p', String(ep.port)];
      return {
        command: 'nbdkit',
        args: ['--exit-with-parent', '-f', ...where, 'file', `file=${file}`],
        exePattern: /^nbdkit/,
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
