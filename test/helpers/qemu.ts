// QEMU processes for tests: captive, with a QMP Unix socket in a private temp dir,
// killed after the test file. `-machine none` boots nothing and starts in a blink.

import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { afterAll } from 'vitest';
import { makeTempDir } from './server.js';
import { toolEnv } from './tools.js';

const live = new Set<ChildProcess>();

afterAll(async () => {
  await Promise.all([...live].map((c) => stopQemu(c)));
});

export interface QemuHandle {
  child: ChildProcess;
  qmp: string;
  dir: string;
  /** Everything the guest printed on the serial console (stdio). */
  console(): string;
  exited: Promise<number | null>;
}

/** Starts qemu-system-x86_64 with a QMP socket; resolves once the socket exists. */
export async function startQemu(args: string[], opts: { dir?: string; qmp?: string } = {}) {
  const dir = opts.dir ?? makeTempDir('ballast-qemu-');
  const qmp = opts.qmp ?? path.join(dir, 'qmp.sock');
  const child = spawn(
    'qemu-system-x86_64',
    ['-nodefaults', '-display', 'none', '-qmp', `unix:${qmp},server=on,wait=off`, ...args],
    { env: toolEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
  );
  live.add(child);
  let out = '';
  child.stdout?.on('data', (b: Buffer) => {
    out += b.toString('latin1');
  });
  child.stderr?.on('data', (b: Buffer) => {
    out += b.toString('latin1');
  });
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => {
      live.delete(child);
      resolve(code);
    }),
  );
  const deadline = Date.now() + 20_000;
  while (!existsSync(qmp)) {
    if (child.exitCode !== null) throw new Error(`qemu exited early:\n${out}`);
    if (Date.now() > deadline) throw new Error(`qemu did not create ${qmp}:\n${out}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const h: QemuHandle = { child, qmp, dir, console: () => out, exited };
  return h;
}

export async function stopQemu(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill('SIGKILL');
  await gone;
}
