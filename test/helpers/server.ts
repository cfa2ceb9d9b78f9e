// Runs the server under test captive, nbdkit-style: a private Unix socket in a fresh
// temp dir (and optionally a free TCP port on 127.0.0.1), ready when it answers with
// an NBD greeting, stopped with SIGTERM. Anything a test forgets is killed in afterAll.
//
// BALLAST_TEST_SERVER=qemu-nbd|nbdkit runs the same tests against those servers
// instead, to check the tests themselves; Ballast-specific behaviour then fails.

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';
import { toolEnv } from './tools.js';

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const BALLAST_BIN = path.join(REPO_ROOT, 'bin', 'ballast');

export type ServerKind = 'ballast' | 'qemu-nbd' | 'nbdkit';

/** Which server the interop tests judge (BALLAST_TEST_SERVER, default ballast). */
export function serverKind(): ServerKind {
  const k = process.env.BALLAST_TEST_SERVER ?? 'ballast';
  if (k === '' || k === 'ballast') return 'ballast';
  if (k === 'qemu-nbd' || k === 'nbdkit') return k;
  throw new Error(`BALLAST_TEST_SERVER must be ballast, qemu-nbd or nbdkit, not ${k}`);
}

export const MiB = 1024 * 1024;

export interface ExportSpec {
  name: string;
  /** Backing file; default `<tempdir>/<name or disk>.img`. */
  file?: string;
  /** --size: bytes or a string such as 64M; the file is created sparse if missing. */
  size?: number | string;
  readOnly?: boolean;
  /** --description, or description=... in an --export spec. */
  description?: string;
}

export interface StartOptions {
  /** Several exports (--export name=...,file=...). */
  exports?: ExportSpec[];
  /** The single-export form: serve FILE [--size] [--name] [--read-only] [--description]. */
  file?: string;
  size?: number | string;
  name?: string;
  readOnly?: boolean;
  description?: string;
  /** Also listen on a free 127.0.0.1 port (--listen). */
  tcp?: boolean;
  /** More arguments for `ballast serve` (ignored by the stand-in servers). */
  extraArgs?: string[];
  /** How long to wait for the first greeting. */
  readyTimeoutMs?: number;
}

export interface ServerHandle {
  kind: ServerKind;
  /** The temp dir holding the socket (and default backing files). */
  dir: string;
  socket: string;
  port?: number;
  /** Backing file of the first export. */
  file: string;
  /** Export name → backing file. */
  files: Map<string, string>;
  /** Name of the first export ('' when none was given). */
  name: string;
  pid: number;
  /** nbd+unix:///NAME?socket=... (NAME defaults to the first export's). */
  uri(name?: string): string;
  /** nbd://127.0.0.1:PORT/NAME; throws unless started with tcp. */
  tcpUri(name?: string): string;
  stderr(): string;
  stdout(): string;
  /** The process has exited (resolves with its exit code, 128+signal when signalled). */
  exited: Promise<number>;
  /** SIGTERM, wait for exit (SIGKILL after `timeoutMs`), return the exit code. */
  stop(timeoutMs?: number): Promise<number>;
}

const live = new Set<ChildProcess>();
const tempDirs = new Set<string>();

afterAll(async () => {
  const waits: Promise<unknown>[] = [];
  for (const child of live) {
    waits.push(new Promise((resolve) => child.once('exit', resolve)));
    child.kill('SIGKILL');
  }
  await Promise.all(waits);
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
});

process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/** Kills `child` after the test file (or when the test process exits) if it still runs. */
export function killAfterAll(child: ChildProcess): void {
  live.add(child);
  child.once('exit', () => live.delete(child));
}

/** A fresh temp dir, removed after the test file. Short path: Unix socket names are limited. */
export function makeTempDir(prefix = 'ballast-it-'): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

/** Parses sizes like 1048576, 64M, 1G, 1GiB (the stand-ins need the byte count). */
export function parseSize(s: number | string): number {
  if (typeof s === 'number') return s;
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(s.trim());
  if (!m) throw new Error(`bad size ${s}`);
  const unit = (m[2] ?? '').toLowerCase();
  const shift = { '': 0, k: 10, m: 20, g: 30, t: 40 }[unit] ?? 0;
  return Number(m[1]) * 2 ** shift;
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 };

function uriName(name: string): string {
  return name.split('/').map(encodeURIComponent).join('/');
}

/** Resolves once `connect()` gives an NBD greeting ('NBDMAGIC' 'IHAVEOPT'). */
function probe(connect: () => net.Socket): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect();
    let got = Buffer.alloc(0);
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(2000, () => done(false));
    sock.on('error', () => done(false));
    sock.on('close', () => done(false));
    sock.on('data', (b: Buffer) => {
      got = Buffer.concat([got, b]);
      if (got.length >= 16) done(got.subarray(0, 16).toString('latin1') === 'NBDMAGICIHAVEOPT');
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Whether an NBD server greets on the Unix socket path or 127.0.0.1 port. */
export function greets(target: string | number): Promise<boolean> {
  return probe(() =>
    typeof target === 'string' ? net.connect(target) : net.connect(target, '127.0.0.1'),
  );
}

/** Polls until an NBD server greets on `target`, or `timeoutMs` passes. */
export async function waitForGreeting(target: string | number, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await greets(target)) return true;
    await sleep(50);
  }
  return false;
}

function normalize(opts: StartOptions, dir: string): (ExportSpec & { file: string })[] {
  const list: ExportSpec[] = opts.exports ?? [
    {
      name: opts.name ?? '',
      file: opts.file,
      size: opts.size,
      readOnly: opts.readOnly,
      description: opts.description,
    },
  ];
  if (list.length === 0) throw new Error('startServer: no exports');
  return list.map((e) => ({ ...e, file: e.file ?? path.join(dir, `${e.name || 'disk'}.img`) }));
}

type Spawned = { child: ChildProcess; argv: string[] };

function spawnServer(cmd: string, args: string[]): Spawned {
  const child = spawn(cmd, args, { env: toolEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  killAfterAll(child);
  return { child, argv: [cmd, ...args] };
}

function ballastArgs(
  opts: StartOptions,
  exps: (ExportSpec & { file: string })[],
  socket: string,
  port?: number,
): string[] {
  const args = [BALLAST_BIN, 'serve'];
  if (opts.exports) {
    for (const e of exps) {
      let spec = `name=${e.name},file=${e.file}`;
      if (e.size !== undefined) spec += `,size=${e.size}`;
      if (e.readOnly) spec += ',read-only';
      if (e.description !== undefined) spec += `,description=${e.description}`;
      args.push('--export', spec);
    }
  } else {
    const e = exps[0]!;
    args.push(e.file);
    if (e.size !== undefined) args.push('--size', String(e.size));
    if (opts.name !== undefined) args.push('--name', opts.name);
    if (e.readOnly) args.push('--read-only');
    if (e.description !== undefined) args.push('--description', e.description);
  }
  args.push('--socket', socket);
  if (port !== undefined) args.push('--listen', `127.0.0.1:${port}`);
  args.push(...(opts.extraArgs ?? []));
  return args;
}

/** The stand-ins: one process per listening address (qemu-nbd cannot do both). */
function standInArgs(
  kind: 'qemu-nbd' | 'nbdkit',
  exps: (ExportSpec & { file: string })[],
  dir: string,
  listen: string[],
): string[] {
  if (kind === 'qemu-nbd') {
    if (exps.length !== 1) throw new Error('qemu-nbd serves one export only');
    const e = exps[0]!;
    const args = [
      '--image-opts',
      `driver=raw,file.driver=file,file.filename=${e.file},file.locking=off`,
      '-x',
      e.name,
      '-t',
      '-e',
      '0',
      '--discard=unmap',
      ...listen,
    ];
    if (e.readOnly) args.push('-r');
    if (e.description !== undefined) args.push('-D', e.description);
    return args;
  }
  const args = ['-f', '--exit-with-parent', ...listen];
  if (exps.some((e) => e.readOnly)) args.push('-r');
  args.push('--filter=exportname');
  if (exps.length === 1) {
    const e = exps[0]!;
    args.push('file', e.file, 'exportname=', `exportname=${e.name}`, `default-export=${e.name}`);
    if (e.description !== undefined) args.push(`exportdesc=fixed:${e.description}`);
  } else {
    const links = path.join(dir, 'exports');
    if (!existsSync(links)) {
      mkdirSync(links);
      for (const e of exps) symlinkSync(e.file, path.join(links, e.name));
    }
    args.push('file', `dir=${links}`);
    for (const e of exps) args.push(`exportname=${e.name}`);
  }
  args.push('exportname-list=explicit', 'exportname-strict=true');
  return args;
}

/** Starts the server under test; resolves once it answers on every address. */
export async function startServer(opts: StartOptions = {}): Promise<ServerHandle> {
  const kind = serverKind();
  const dir = makeTempDir();
  const socket = path.join(dir, 'nbd.sock');
  const port = opts.tcp ? await freePort() : undefined;
  const exps = normalize(opts, dir);

  const procs: Spawned[] = [];
  if (kind === 'ballast') {
    procs.push(spawnServer(process.execPath, ballastArgs(opts, exps, socket, port)));
  } else {
    for (const e of exps) {
      if (e.size !== undefined && !existsSync(e.file)) {
        writeFileSync(e.file, '');
        truncateSync(e.file, parseSize(e.size));
      }
    }
    const cmd = kind;
    const unixListen = kind === 'qemu-nbd' ? ['-k', socket] : ['-U', socket];
    procs.push(spawnServer(cmd, standInArgs(kind, exps, dir, unixListen)));
    if (port !== undefined) {
      const tcpListen =
        kind === 'qemu-nbd'
          ? ['-b', '127.0.0.1', '-p', String(port)]
          : ['-i', '127.0.0.1', '-p', String(port)];
      procs.push(spawnServer(cmd, standInArgs(kind, exps, dir, tcpListen)));
    }
  }

  const main = procs[0]!;
  let err = '';
  let out = '';
  for (const p of procs) {
    p.child.stderr?.on('data', (b: Buffer) => {
      err += b.toString('utf8');
    });
    p.child.stdout?.on('data', (b: Buffer) => {
      out += b.toString('utf8');
    });
  }
  const exitedOf = (c: ChildProcess) =>
    new Promise<number>((resolve) => {
      if (c.exitCode !== null || c.signalCode !== null) {
        resolve(c.exitCode ?? 128 + (SIGNALS[c.signalCode ?? ''] ?? 64));
        return;
      }
      c.once('exit', (code, signal) => resolve(code ?? 128 + (SIGNALS[signal ?? ''] ?? 64)));
    });
  const exited = exitedOf(main.child);
  let gone: number | undefined;
  void Promise.race(procs.map((p) => exitedOf(p.child))).then((c) => {
    gone = c;
  });

  const stopAll = async (timeoutMs = 20_000): Promise<number> => {
    const codes = procs.map(async (p) => {
      const ex = exitedOf(p.child);
      if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGTERM');
      const timer = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
      const code = await ex;
      clearTimeout(timer);
      return code;
    });
    const all = await Promise.all(codes);
    return all[0]!;
  };

  // Ready when every address answers with a greeting.
  const deadline = Date.now() + (opts.readyTimeoutMs ?? 30_000);
  const targets: (() => net.Socket)[] = [() => net.connect(socket)];
  if (port !== undefined) targets.push(() => net.connect(port, '127.0.0.1'));
  for (const target of targets) {
    for (;;) {
      if (gone !== undefined) {
        await stopAll();
        throw new Error(
          `server exited (${gone}) before accepting connections\n$ ${main.argv.join(' ')}\n${err}${out}`,
        );
      }
      if (await probe(target)) break;
      if (Date.now() > deadline) {
        await stopAll(1000);
        throw new Error(
          `server did not accept connections in time\n$ ${main.argv.join(' ')}\n${err}${out}`,
        );
      }
      await sleep(50);
    }
  }

  const files = new Map(exps.map((e) => [e.name, e.file]));
  const first = exps[0]!;
  return {
    kind,
    dir,
    socket,
    port,
    file: first.file,
    files,
    name: first.name,
    pid: main.child.pid!,
    uri: (name = first.name) => `nbd+unix:///${uriName(name)}?socket=${socket}`,
    tcpUri: (name = first.name) => {
      if (port === undefined) throw new Error('server was started without tcp');
      return `nbd://127.0.0.1:${port}/${uriName(name)}`;
    },
    stderr: () => err,
    stdout: () => out,
    exited,
    stop: stopAll,
  };
}

let helpText: string | undefined;

/** Whether `ballast serve --help` mentions `flag` (for options newer than the tests). */
export function ballastServeHas(flag: string): boolean {
  if (serverKind() !== 'ballast') return false;
  if (helpText === undefined) {
    try {
      helpText = execFileSync(process.execPath, [BALLAST_BIN, 'serve', '--help'], {
        encoding: 'utf8',
        timeout: 20_000,
      });
    } catch {
      helpText = '';
    }
  }
  return helpText.includes(flag);
}

/** VmRSS of a process in bytes (Linux). */
export async function rssBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

/**
 * Waits (up to `timeoutMs`) for a server's log to match: a line about a connection a
 * worker thread served reaches the process's stderr through the main thread, a moment
 * after the client saw the outcome. Returns the log; the caller's expect() then judges it.
 */
export async function logSettled(
  log: () => string,
  pattern: string | RegExp,
  timeoutMs = 5_000,
): Promise<string> {
  const matches = () =>
    typeof pattern === 'string' ? log().includes(pattern) : pattern.test(log());
  const end = Date.now() + timeoutMs;
  while (!matches() && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  return log();
}
