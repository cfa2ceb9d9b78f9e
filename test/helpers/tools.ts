// Real NBD clients that judge the server, and how to run them.
//
// `describeWithTools(['qemu-img'], 'title', () => { ... })` declares a suite that needs
// those programs. When one is missing the suite is skipped outside CI, with a message
// naming the Debian package to install; under CI (`CI` set) it fails instead, so a
// machine without the tools cannot pass by skipping everything.

import { execFileSync, spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import path from 'node:path';
import { describe, it } from 'vitest';
import { guestKernel } from '../../bench/guest-kit.js';

/** The Debian package that ships each tool. */
const PACKAGE: Record<string, string> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'python3-libnbd',
  nbdkit: 'nbdkit',
  fio: 'fio',
  sshd: 'openssh-server',
  'ssh-keygen': 'openssh-client',
  'qemu-system-x86_64': 'qemu-system-x86',
  prometheus: 'prometheus',
  'virt-xml-validate': 'libvirt-clients',
  virsh: 'libvirt-clients',
  libvirtd: 'libvirt-daemon-system',
  virtlogd: 'libvirt-daemon-system',
  unshare: 'util-linux',
  xmllint: 'libxml2-utils',
  readelf: 'binutils',
  cpio: 'cpio',
  busybox: 'busybox-static',
  /** Not a program: a guest kernel in /boot (see guestKernel). */
  vmlinuz: 'linux-image-amd64',
  openssl: 'openssl',
  etcd: 'etcd-server',
  etcdctl: 'etcd-client',
  setpriv: 'util-linux',
  losetup: 'mount',
  'mkfs.ext4': 'e2fsprogs',
  e2fsck: 'e2fsprogs',
};

/** nbdsh is a shell script that runs `python3 -m nbd`; it needs the system python. */
export const SYSTEM_PYTHON = '/usr/bin/python3';

/** PATH with /usr/bin first, so nbdsh's `python3` is the one that has the nbd module. */
export function systemPath(): string {
  // The sbin directories last: mount, losetup and mkfs live there, and a non-login PATH may lack them.
  return ['/usr/bin', '/bin', process.env.PATH ?? '', '/usr/sbin', '/sbin'].join(path.delimiter);
}

function onPath(name: string): boolean {
  for (const dir of systemPath().split(path.delimiter)) {
    if (!dir) continue;
    try {
      accessSync(path.join(dir, name), constants.X_OK);
      return true;
    } catch {
      // try the next directory
    }
  }
  return false;
}

function works(cmd: string, args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: 'ignore', timeout: 20_000, env: toolEnv() });
    return true;
  } catch {
    return false;
  }
}

const cache = new Map<string, boolean>();

/** Whether one tool is installed and usable. */
export function haveTool(name: string): boolean {
  let ok = cache.get(name);
  if (ok === undefined) {
    ok = name === 'vmlinuz' ? guestKernel() !== null : onPath(name);
    if (ok && name === 'nbdsh') ok = works(SYSTEM_PYTHON, ['-c', 'import nbd']);
    if (ok && name === 'fio') ok = works('fio', ['--enghelp=nbd']);
    // sshd lives in /usr/sbin, which a non-login PATH may lack
    if (!ok && name === 'sshd') ok = works('/usr/sbin/sshd', ['-V']);
    cache.set(name, ok);
  }
  return ok;
}

export function missingTools(names: readonly string[]): string[] {
  return names.filter((n) => !haveTool(n));
}

function installHint(missing: readonly string[]): string {
  const pkgs = [...new Set(missing.map((n) => PACKAGE[n] ?? n))];
  return `missing ${missing.join(', ')}: apt-get install -y ${pkgs.join(' ')}`;
}

/**
 * For the top of a test file or a `describe`: true when every tool is there. When one
 * is missing: under CI it throws (the file fails, saying what to install); otherwise it
 * prints why and returns false, for `describe.skipIf(!requireTools(...))`.
 */
export function requireTools(...names: string[]): boolean {
  const missing = missingTools(names);
  if (missing.length === 0) return true;
  const hint = installHint(missing);
  if (process.env.CI) throw new Error(`interop tests need real NBD clients; ${hint}`);
  console.warn(`skipping interop tests: ${hint}`);
  return false;
}

/** A `describe` that needs the given tools (see the file comment). */
export function describeWithTools(names: readonly string[], title: string, fn: () => void): void {
  const missing = missingTools(names);
  if (missing.length === 0) {
    describe(title, fn);
    return;
  }
  const hint = installHint(missing);
  if (process.env.CI) {
    describe(title, () => {
      it(`has the tools it needs (${names.join(', ')})`, () => {
        throw new Error(hint);
      });
    });
    return;
  }
  console.warn(`skipping "${title}": ${hint}`);
  describe.skip(title, fn);
}

/** The environment every tool runs with. */
export function toolEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  // LIBNBD_DEBUG would flood stderr; LANG=C keeps messages in English.
  const { LIBNBD_DEBUG: _, ...rest } = process.env;
  return { ...rest, PATH: systemPath(), LANG: 'C', LC_ALL: 'C', ...extra };
}

export interface RunResult {
  cmd: string;
  /** Exit code; 128 + signal number when killed by a signal (also on timeout). */
  code: number;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string | Buffer;
  env?: Record<string, string>;
  cwd?: string;
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 };

/** Runs a program to completion; never rejects on a non-zero exit (see `code`). */
export function run(
  cmd: string,
  args: readonly string[],
  opts: RunOptions = {},
): Promise<RunResult> {
  // A guard against a hang, not a judge of speed: on a machine loaded to 10 times its
  // cores a CLI run that needs half a second of CPU has taken over 45 s.
  const timeoutMs = opts.timeoutMs ?? 180_000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: toolEnv(opts.env),
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.stdin.on('error', () => {}); // a tool that exits without reading its input
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        cmd: [cmd, ...args].join(' '),
        code: code ?? 128 + (signal ? (SIGNALS[signal] ?? 64) : 64),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        timedOut,
      });
    });
    child.stdin.end(opts.input ?? '');
  });
}

/** Describes a result for an assertion message. */
export function describeRun(r: RunResult): string {
  const tail = (s: string) => (s.length > 4000 ? `...${s.slice(-4000)}` : s);
  return (
    `exit ${r.code}${r.timedOut ? ' (timed out)' : ''} from: ${r.cmd}\n` +
    `--- stderr\n${tail(r.stderr)}\n--- stdout\n${tail(r.stdout)}\n`
  );
}

/** Runs a program and throws (with its output) unless it exits 0. */
export async function runOk(
  cmd: string,
  args: readonly string[],
  opts: RunOptions = {},
): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`command failed\n${describeRun(r)}`);
  return r;
}
