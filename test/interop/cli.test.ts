// `ballast` as a user runs it: help, the stable error codes, signals, file creation,
// the empty export name. Ballast's own CLI, so never run against the stand-in servers.

import { spawn } from 'node:child_process';
import { statSync, truncateSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD_WRITE, RawClient } from '../helpers/nbd-raw.js';
import {
  BALLAST_BIN,
  freePort,
  greets,
  MiB,
  makeTempDir,
  serverKind,
  startServer,
  waitForGreeting,
} from '../helpers/server.js';
import { describeRun, describeWithTools, type RunResult, run, runOk } from '../helpers/tools.js';

// "Fails fast" means it exits instead of hanging; how fast depends on the machine's load.
const ballast = (...args: string[]): Promise<RunResult> =>
  run(process.execPath, [BALLAST_BIN, ...args], { timeoutMs: 120_000 });

/** A command that must fail fast with a stable error code. */
const expectFailure = async (code: string, ...args: string[]) => {
  const r = await ballast(...args);
  expect(r.timedOut, `did not exit\n${describeRun(r)}`).toBe(false);
  expect(r.code, describeRun(r)).not.toBe(0);
  expect(r.stderr + r.stdout, describeRun(r)).toContain(code);
  return r;
};

/** The export size seen by a raw handshake on the socket. */
const sizeOver = async (socket: string, name: string): Promise<number> => {
  const c = await RawClient.connect(socket);
  try {
    return Number((await c.handshake(name)).size);
  } finally {
    c.destroy();
  }
};

const ALT = serverKind() !== 'ballast';
if (ALT) console.warn(`cli.test.ts: skipped with BALLAST_TEST_SERVER=${serverKind()}`);

describe.skipIf(ALT)('ballast command line', () => {
  it('--help and serve --help exit 0 and describe every option', async () => {
    const top = await ballast('--help');
    expect(top.code, describeRun(top)).toBe(0);
    expect(top.stdout).toContain('serve');

    const serve = await ballast('serve', '--help');
    expect(serve.code, describeRun(serve)).toBe(0);
    for (const opt of [
      '--size',
      '--name',
      '--read-only',
      '--listen',
      '--socket',
      '--description',
      '--export',
    ]) {
      expect(serve.stdout, `serve --help mentions ${opt}`).toContain(opt);
    }
  });

  it('a missing file without --size: BALLAST_FILE_NOT_FOUND', async () => {
    const dir = makeTempDir();
    const r = await expectFailure(
      'BALLAST_FILE_NOT_FOUND',
      'serve',
      path.join(dir, 'missing.img'),
      '--socket',
      path.join(dir, 's.sock'),
    );
    expect(r.stderr + r.stdout).toContain('missing.img');
  });

  it('a bad --size: BALLAST_BAD_SIZE', async () => {
    const dir = makeTempDir();
    const sock = path.join(dir, 's.sock');
    const file = path.join(dir, 'x.img');
    for (const bad of ['12Q', 'abc', '1.5.5G', '-5', '']) {
      await expectFailure('BALLAST_BAD_SIZE', 'serve', file, `--size=${bad}`, '--socket', sock);
    }
    await expectFailure(
      'BALLAST_BAD_SIZE',
      'serve',
      '--export',
      `name=a,file=${file},size=lots`,
      '--socket',
      sock,
    );
  });

  it('a port in use: BALLAST_ADDRESS_IN_USE', async () => {
    const port = await freePort();
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(port, '127.0.0.1', resolve));
    try {
      const file = path.join(makeTempDir(), 'p.img');
      const r = await expectFailure(
        'BALLAST_ADDRESS_IN_USE',
        'serve',
        file,
        '--size',
        '1M',
        '--listen',
        `127.0.0.1:${port}`,
      );
      // It names the holder and how to move this one: serve's options, not the agent's.
      expect(r.stderr).toContain(`127.0.0.1:${port} is already in use by pid ${process.pid} (`);
      expect(r.stderr).toContain('ballast serve --listen HOST:PORT');
      expect(r.stderr).not.toContain('--api-listen');
    } finally {
      await new Promise((resolve) => blocker.close(resolve));
    }
  });

  it('a file already served by another ballast: BALLAST_FILE_LOCKED', async () => {
    const first = await startServer({ size: '16M', name: 'disk' });
    await expectFailure(
      'BALLAST_FILE_LOCKED',
      'serve',
      first.file,
      '--socket',
      path.join(makeTempDir(), 'second.sock'),
    );
    // The first one is untouched.
    expect(await sizeOver(first.socket, 'disk')).toBe(16 * MiB);
    expect(await first.stop()).toBe(0);
  });

  it('a missing file with --size is created sparse; sizes like 1048576, 64M, 1G, 1GiB', async () => {
    const dir = makeTempDir();
    for (const [spec, bytes] of [
      ['1048576', MiB],
      ['64M', 64 * MiB],
      ['1G', 1024 * MiB],
      ['1GiB', 1024 * MiB],
    ] as const) {
      const file = path.join(dir, `created-${spec}.img`);
      const server = await startServer({ file, size: spec });
      const st = statSync(file);
      expect(st.size, spec).toBe(bytes);
      expect(st.blocks, `${spec}: allocated blocks`).toBe(0);
      expect(await server.stop()).toBe(0);
    }
  });

  it('an existing file is served at its own size when --size is not given', async () => {
    const file = path.join(makeTempDir(), 'existing.img');
    writeFileSync(file, 'hello');
    truncateSync(file, 3 * MiB);
    const server = await startServer({ file });
    expect(await sizeOver(server.socket, '')).toBe(3 * MiB);
    expect(await server.stop()).toBe(0);
  });

  it('logs a line to stderr once listening, and listens on --socket and --listen', async () => {
    const server = await startServer({ size: '4M', tcp: true });
    expect(server.stderr().trim().length).toBeGreaterThan(0);
    for (const target of [server.socket, { port: server.port!, host: '127.0.0.1' }]) {
      const c =
        typeof target === 'string'
          ? await RawClient.connect(target)
          : await RawClient.connect({ port: target.port, host: target.host });
      const { size } = await c.handshake('');
      expect(size).toBe(BigInt(4 * MiB));
      c.destroy();
    }
    expect(await server.stop()).toBe(0);
  });

  it('listens on 127.0.0.1:10809 by default, and only on the socket with --socket', async (ctx) => {
    const portFree = await new Promise<boolean>((resolve) => {
      const probe = net.createServer();
      probe.once('error', () => resolve(false));
      probe.listen(10809, '127.0.0.1', () => probe.close(() => resolve(true)));
    });
    if (!portFree) ctx.skip(); // someone else has the default port

    const dir = makeTempDir();
    const child = spawn(
      process.execPath,
      [BALLAST_BIN, 'serve', path.join(dir, 'd.img'), '--size', '1M'],
      {
        stdio: 'ignore',
      },
    );
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
    try {
      expect(await waitForGreeting(10809), 'greeting on 127.0.0.1:10809').toBe(true);
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toBe(0);

    const server = await startServer({ size: '1M' }); // --socket only
    expect(await greets(10809), 'nothing on 10809 with --socket only').toBe(false);
    expect(await server.stop()).toBe(0);
  });

  it('SIGINT stops it with exit 0', async () => {
    const server = await startServer({ size: '4M' });
    process.kill(server.pid, 'SIGINT');
    expect(await server.exited).toBe(0);
  });

  it('SIGTERM finishes the writes in flight, exits 0, and the data is in the file', async () => {
    const server = await startServer({ size: '64M', name: 'disk' });
    const c = await RawClient.connect(server.socket);
    await c.handshake('disk');
    const N = 16;
    const reqs: Buffer[] = [];
    for (let i = 0; i < N; i++) {
      reqs.push(
        RawClient.request({ type: CMD_WRITE, handle: i + 1, offset: i * MiB, length: MiB }),
        Buffer.alloc(MiB, i + 1),
      );
    }
    await c.write(Buffer.concat(reqs));
    const first = await c.readSimpleReply();
    process.kill(server.pid, 'SIGTERM');

    const replies = [first];
    while (replies.length < N) {
      try {
        replies.push(await c.readSimpleReply(20_000));
      } catch {
        break; // closed: the server stopped taking requests
      }
    }
    expect(await server.exited).toBe(0);
    c.destroy();

    expect(replies.filter((r) => r.error !== 0)).toEqual([]);
    const content = await readFile(server.file);
    for (const r of replies) {
      const i = Number(r.handle) - 1;
      const slice = content.subarray(i * MiB, (i + 1) * MiB);
      expect(
        slice.every((b) => b === i + 1),
        `write ${i} was acknowledged; its data is in the file`,
      ).toBe(true);
    }
    // Every acknowledged write is there; report how many made it in.
    expect(replies.length).toBeGreaterThanOrEqual(1);
  });
});

describeWithTools(['nbdinfo'], 'ballast export names', () => {
  it.skipIf(ALT)('with one export, both its name and the empty name reach it', async () => {
    const server = await startServer({ size: '8M', name: 'disk' });
    for (const uri of [
      server.uri('disk'),
      server.uri(''),
      `nbd+unix:///?socket=${server.socket}`,
    ]) {
      const r = await runOk('nbdinfo', ['--size', uri]);
      expect(r.stdout.trim()).toBe(String(8 * MiB));
    }
    const bad = await run('nbdinfo', ['--size', server.uri('other')]);
    expect(bad.code, describeRun(bad)).not.toBe(0);
    expect(await server.stop()).toBe(0);
  });

  it.skipIf(ALT)('without --name, the export is the empty name', async () => {
    const server = await startServer({ size: '8M' });
    const r = await runOk('nbdinfo', ['--json', `nbd+unix:///?socket=${server.socket}`]);
    const info = JSON.parse(r.stdout) as { exports: { 'export-name': string }[] };
    expect(info.exports[0]!['export-name']).toBe('');
    expect(await server.stop()).toBe(0);
  });
});
