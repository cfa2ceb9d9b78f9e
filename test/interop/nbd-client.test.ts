// Our NBD client against three servers: Ballast itself, nbdkit (memory plugin) and
// qemu-nbd. The same checks run on each: negotiation, read/write/FUA, flush, trim,
// write_zeroes, block status, many requests in flight, TCP and Unix URIs, errors.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient, NbdClientError } from '../../nbd/client.js';
import { STATE_HOLE, STATE_ZERO } from '../../nbd/protocol.js';
import {
  BALLAST_BIN,
  freePort,
  MiB,
  makeTempDir,
  type ServerHandle,
  startServer,
  waitForGreeting,
} from '../helpers/server.js';
import { makePki, x509Args } from '../helpers/tls.js';
import { describeWithTools, run, toolEnv } from '../helpers/tools.js';

interface Peer {
  uri: string;
  tcpUri?: string;
  stop(): Promise<void>;
}

const SIZE = 64 * MiB;

function spawnPeer(cmd: string, args: string[]): ChildProcess {
  return spawn(cmd, args, { env: toolEnv(), stdio: ['ignore', 'ignore', 'pipe'] });
}

async function killPeer(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill('SIGTERM');
  await gone;
}

async function startBallast(): Promise<Peer> {
  const s: ServerHandle = await startServer({ size: SIZE, name: 'disk', tcp: true });
  return {
    uri: s.uri(),
    tcpUri: s.tcpUri(),
    stop: async () => {
      await s.stop();
    },
  };
}

async function startNbdkit(): Promise<Peer> {
  const dir = makeTempDir();
  const sock = path.join(dir, 'nbdkit.sock');
  const c = spawnPeer('nbdkit', ['-f', '--exit-with-parent', '-U', sock, 'memory', String(SIZE)]);
  if (!(await waitForGreeting(sock))) throw new Error('nbdkit did not start');
  return { uri: `nbd+unix:///?socket=${sock}`, stop: () => killPeer(c) };
}

async function startQemuNbd(): Promise<Peer> {
  const dir = makeTempDir();
  const sock = path.join(dir, 'qemu-nbd.sock');
  const file = path.join(dir, 'disk.img');
  writeFileSync(file, '');
  truncateSync(file, SIZE);
  const port = await freePort();
  const c = spawnPeer('qemu-nbd', [
    '-k',
    sock,
    '-f',
    'raw',
    '-x',
    'disk',
    '-t',
    '--discard=unmap',
    file,
  ]);
  const t = spawnPeer('qemu-nbd', [
    '-b',
    '127.0.0.1',
    '-p',
    String(port),
    '-x',
    'disk',
    '-t',
    '-e',
    '0',
    '--image-opts',
    `driver=raw,file.driver=file,file.filename=${file},file.locking=off`,
  ]);
  if (!(await waitForGreeting(sock))) throw new Error('qemu-nbd did not start');
  if (!(await waitForGreeting(port))) throw new Error('qemu-nbd (tcp) did not start');
  return {
    uri: `nbd+unix:///disk?socket=${sock}`,
    tcpUri: `nbd://127.0.0.1:${port}/disk`,
    stop: async () => {
      await Promise.all([killPeer(c), killPeer(t)]);
    },
  };
}

function suite(name: string, start: () => Promise<Peer>) {
  describe(name, () => {
    let peer: Peer;
    let c: NbdClient;
    beforeAll(async () => {
      peer = await start();
      c = await NbdClient.connect(peer.uri);
    });
    afterAll(async () => {
      await c?.close();
      await peer?.stop();
    });

    it('negotiates GO, block sizes, structured replies and base:allocation', () => {
      expect(c.size).toBe(SIZE);
      expect(c.structured).toBe(true);
      expect(c.allocation).toBe(true);
      expect(c.readOnly).toBe(false);
      expect(c.canFlush).toBe(true);
      expect(c.maxBlock).toBeGreaterThanOrEqual(1024 * 1024);
    });

    it('writes (with and without FUA) and reads back, across maxBlock splits', async () => {
      const a = randomBytes(3 * MiB + 123);
      await c.write(4096, a);
      expect((await c.read(4096, a.length)).equals(a)).toBe(true);
      const b = randomBytes(65536);
      if (c.canFua) await c.write(10 * MiB, b, { fua: true });
      else await c.write(10 * MiB, b);
      await c.flush();
      expect((await c.read(10 * MiB, b.length)).equals(b)).toBe(true);
      const big = randomBytes(40 * MiB);
      await c.write(20 * MiB, big);
      expect((await c.read(20 * MiB, big.length)).equals(big)).toBe(true);
    });

    it('keeps many requests in flight and matches replies by cookie', async () => {
      const blocks = Array.from({ length: 200 }, (_, i) => Buffer.alloc(4096, i & 0xff));
      await Promise.all(blocks.map((b, i) => c.write(i * 4096, b)));
      const back = await Promise.all(blocks.map((_, i) => c.read(i * 4096, 4096)));
      back.forEach((b, i) => {
        expect(b.equals(blocks[i] as Buffer)).toBe(true);
      });
    });

    it('zeroes and trims; block status reports the zeroed range', async () => {
      await c.write(0, Buffer.alloc(1 * MiB, 0xaa));
      await c.writeZeroes(0, 1 * MiB);
      expect((await c.read(0, 1 * MiB)).equals(Buffer.alloc(1 * MiB))).toBe(true);
      const ext = await c.blockStatus(0, 1 * MiB);
      expect(ext.length).toBeGreaterThan(0);
      expect(ext[0]?.offset).toBe(0);
      expect((ext[0]?.flags ?? 0) & STATE_ZERO).toBe(STATE_ZERO);
      await c.write(2 * MiB, Buffer.alloc(MiB, 1));
      const data = await c.blockStatus(2 * MiB, MiB);
      expect((data[0]?.flags ?? 0) & STATE_HOLE).toBe(0);
      if (c.canTrim) await c.trim(2 * MiB, MiB);
    });

    it('refuses out-of-range requests locally with NBD_BAD_RANGE', async () => {
      await expect(c.read(SIZE - 10, 20)).rejects.toMatchObject({ code: 'NBD_BAD_RANGE' });
      await expect(c.write(SIZE, Buffer.alloc(1))).rejects.toMatchObject({
        code: 'NBD_BAD_RANGE',
      });
    });

    it('connects over TCP too', async () => {
      if (!peer.tcpUri) return;
      const t = await NbdClient.connect(peer.tcpUri);
      try {
        expect(t.size).toBe(SIZE);
        expect((await t.read(0, 16)).length).toBe(16);
      } finally {
        await t.close();
      }
    });
  });
}

describeWithTools(['nbdkit', 'qemu-nbd'], 'NBD client', () => {
  suite('against Ballast', startBallast);
  suite('against nbdkit memory', startNbdkit);
  suite('against qemu-nbd', startQemuNbd);

  describe('errors', () => {
    let s: ServerHandle;
    beforeAll(async () => {
      s = await startServer({ size: MiB, name: 'disk' });
    });
    afterAll(async () => {
      await s?.stop();
    });

    it('an unknown export is NBD_REP_ERR_UNKNOWN', async () => {
      const e = await NbdClient.connect(s.uri('nope')).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(NbdClientError);
      expect((e as NbdClientError).code).toBe('NBD_REP_ERR_UNKNOWN');
    });

    it('server errors keep their NBD error value as the code (nbdkit error filter)', async () => {
      const sock = path.join(makeTempDir(), 'err.sock');
      const c = spawnPeer('nbdkit', [
        '-f',
        '--exit-with-parent',
        '-U',
        sock,
        '--filter=error',
        'memory',
        '1M',
        'error-pread=ENOSPC',
        'error-pread-rate=100%',
        'error-pwrite=EIO',
        'error-pwrite-rate=100%',
      ]);
      try {
        expect(await waitForGreeting(sock)).toBe(true);
        const cl = await NbdClient.connect(`nbd+unix:///?socket=${sock}`);
        const r = await cl.read(0, 512).catch((x: unknown) => x);
        expect(r).toMatchObject({ code: 'NBD_ENOSPC', nbdErrno: 28 });
        const w = await cl.write(0, Buffer.alloc(512)).catch((x: unknown) => x);
        expect(w).toMatchObject({ code: 'NBD_EIO', nbdErrno: 5 });
        // The connection survives request errors.
        await cl.flush();
        await cl.close();
      } finally {
        await killPeer(c);
      }
    });

    it('nothing listening is NBD_CONNECT_FAILED', async () => {
      const e = await NbdClient.connect(
        `nbd+unix:///?socket=${path.join(makeTempDir(), 'none.sock')}`,
      ).catch((x: unknown) => x);
      expect((e as NbdClientError).code).toBe('NBD_CONNECT_FAILED');
    });

    it('a server going away fails requests in flight with NBD_DISCONNECTED', async () => {
      const s2 = await startServer({ size: MiB, name: 'disk' });
      const c = await NbdClient.connect(s2.uri());
      await c.read(0, 512);
      const stop = s2.stop();
      await stop;
      const e = await c.read(0, 512).catch((x: unknown) => x);
      expect((e as NbdClientError).code).toBe('NBD_DISCONNECTED');
      c.destroy();
    });
  });
});

describeWithTools(['openssl'], 'NBD client over STARTTLS', () => {
  let s: ServerHandle;
  let dir: string;
  let clientDir: string;
  beforeAll(async () => {
    dir = makeTempDir();
    const pki = await makePki(path.join(dir, 'pki'), ['dumpd']);
    clientDir = pki.clients.get('dumpd') ?? '';
    s = await startServer({ size: MiB, name: 'disk', extraArgs: x509Args(pki, 'require') });
  });
  afterAll(async () => {
    await s?.stop();
  });

  it('the startTls hook upgrades the connection; without it the server says TLS_REQD', async () => {
    const plain = await NbdClient.connect(s.uri()).catch((x: unknown) => x);
    expect((plain as NbdClientError).code).toBe('NBD_REP_ERR_TLS_REQD');
    const cdir = path.join(dir, 'pki');
    const client = await NbdClient.connect(s.uri(), {
      startTls: (socket) =>
        new Promise((resolve, reject) => {
          const t = tls.connect({
            socket,
            servername: 'localhost',
            ca: readFileSync(path.join(cdir, 'ca-cert.pem')),
            cert: readFileSync(path.join(cdir, 'dumpd-cert.pem')),
            key: readFileSync(path.join(cdir, 'dumpd-key.pem')),
          });
          t.once('secureConnect', () => resolve(t));
          t.once('error', reject);
        }),
    });
    try {
      await client.write(0, Buffer.from('over tls'));
      expect((await client.read(0, 8)).toString()).toBe('over tls');
    } finally {
      await client.close();
    }
  });

  it('nbds+unix:// URIs with a libnbd/QEMU-style credentials directory', async () => {
    const uri = s.uri().replace(/^nbd\+unix:/, 'nbds+unix:');
    const c = await NbdClient.connect(uri, { tls: { dir: clientDir } });
    try {
      expect((await c.read(0, 8)).toString()).toBe('over tls');
    } finally {
      await c.close();
    }
    const noCert = await NbdClient.connect(uri).catch((x: unknown) => x);
    expect((noCert as NbdClientError).code).toBe('NBD_TLS_FAILED');
    const ls = await run(process.execPath, [
      BALLAST_BIN,
      'dump',
      'ls',
      s.uri(),
      '--tls-certs',
      clientDir,
    ]);
    // The export holds 'over tls' at 0: data, but no catalog.
    expect(ls.stderr).toContain('ballast: error DUMP_NOT_A_DUMP_DEVICE');
  });
});
