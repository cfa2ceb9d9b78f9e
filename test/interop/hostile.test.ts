// Hostile and broken clients on raw sockets. The server must drop them without harm:
// well-behaved clients on other connections go on working, it does not crash, and its
// memory stays bounded however much a client declares or sends.

import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import {
  CMD_READ,
  CMD_WRITE,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  IHAVEOPT,
  OPT_EXPORT_NAME,
  OPT_GO,
  RawClient,
  REP_FLAG_ERROR,
} from '../helpers/nbd-raw.js';
import {
  ballastServeHas,
  MiB,
  rssBytes,
  type ServerHandle,
  startServer,
} from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';

const SIZE = 64 * MiB;
/** A short handshake timeout, when the server has the option. */
const HANDSHAKE_FLAG = ballastServeHas('--handshake-limit')
  ? '--handshake-limit'
  : '--handshake-timeout';
const HANDSHAKE_TIMEOUT = ballastServeHas(HANDSHAKE_FLAG) ? 3 : undefined;

describeWithTools(['nbdinfo', 'qemu-io'], 'hostile clients', () => {
  let server: ServerHandle;
  /** A well-behaved raw connection opened first and used after every test. */
  let steady: RawClient;
  let steadyHandle = 1n;
  let crashed: number | undefined;
  const opened: RawClient[] = [];

  const connect = async (srv: ServerHandle = server) => {
    const c = await RawClient.connect(srv.socket);
    opened.push(c);
    return c;
  };

  /** Real clients on new connections get served by `srv`. */
  const expectServes = async (srv: ServerHandle, size: number) => {
    const info = await run('nbdinfo', ['--size', srv.uri()]);
    expect(info.code, describeRun(info)).toBe(0);
    expect(info.stdout.trim()).toBe(String(size));
    const io = await run('qemu-io', [
      '-f',
      'raw',
      srv.uri(),
      '-c',
      'write -P 0x3c 0 64k',
      '-c',
      'read -P 0x3c 0 64k',
    ]);
    expect(io.code, describeRun(io)).toBe(0);
    expect(io.stdout).not.toContain('Pattern verification failed');
  };

  /** Real clients on new connections still work, and so does the steady one. */
  const expectHealthy = async () => {
    expect(crashed, `server exited with ${crashed}\n${server.stderr()}`).toBeUndefined();
    await expectServes(server, SIZE);

    const handle = steadyHandle++;
    await steady.write(RawClient.request({ type: CMD_READ, handle, offset: 0, length: 4096 }));
    const reply = await steady.readSimpleReply();
    expect(reply).toEqual({ error: 0, handle });
    const data = await steady.read(4096);
    expect(data.every((b) => b === 0x3c)).toBe(true);
  };

  beforeAll(async () => {
    server = await startServer({
      size: SIZE,
      name: 'disk',
      extraArgs: HANDSHAKE_TIMEOUT ? [HANDSHAKE_FLAG, String(HANDSHAKE_TIMEOUT)] : [],
    });
    void server.exited.then((code) => {
      crashed = code;
    });
    steady = await RawClient.connect(server.socket);
    await steady.handshake('disk');
    await expectHealthy();
  });

  afterEach(() => {
    for (const c of opened.splice(0)) c.destroy();
  });

  afterAll(async () => {
    steady?.destroy();
    if (server) expect(await server.stop()).toBe(0);
  });

  /** Greeting read, client flags sent: ready for options. */
  const negotiating = async () => {
    const c = await connect();
    const hs = await c.greeting();
    expect(hs & FLAG_FIXED_NEWSTYLE).toBe(FLAG_FIXED_NEWSTYLE);
    await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    return c;
  };

  it('garbage instead of client flags: connection closed', async () => {
    const c = await connect();
    await c.greeting();
    await c.write(Buffer.from('GET / HTTP/1.1\r\nHost: localhost\r\n\r\n'));
    expect(await c.waitClose()).toBe('closed');
    await expectHealthy();
  });

  it('unknown client flags: connection closed', async () => {
    const c = await connect();
    await c.greeting();
    await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES | (1 << 9));
    expect(await c.waitClose()).toBe('closed');
    await expectHealthy();
  });

  it('a truncated option header, then close', async () => {
    const c = await negotiating();
    await c.write(Buffer.concat([IHAVEOPT, Buffer.from([0, 0, 0])]));
    c.end();
    expect(await c.waitClose()).toBe('closed');
    await expectHealthy();
  });

  it('an option declaring a huge length is refused, not buffered', async () => {
    const before = await rssBytes(server.pid);
    const c = await negotiating();
    await c.sendOption(OPT_GO, Buffer.alloc(0), 0xfffffff0);
    for (let i = 0; i < 64 && !c.isClosed; i++) await c.write(Buffer.alloc(MiB, 0x61));
    // Either an error reply or a closed connection; not waiting for 4 GiB of name.
    const answer = await Promise.race([
      c.closed.then(() => 'closed'),
      c.readOptionReply().then(
        (r) => `reply ${r.type.toString(16)}`,
        () => 'closed',
      ),
      new Promise((resolve) => setTimeout(() => resolve('still waiting'), 15_000)),
    ]);
    if (typeof answer === 'string' && answer.startsWith('reply')) {
      expect(Number.parseInt(answer.slice(6), 16) & REP_FLAG_ERROR).toBe(REP_FLAG_ERROR);
    } else {
      expect(answer).toBe('closed');
    }
    expect((await rssBytes(server.pid)) - before).toBeLessThan(100 * MiB);
    await expectHealthy();
  });

  it('an unknown option with a huge length: memory stays bounded', async () => {
    const before = await rssBytes(server.pid);
    const c = await negotiating();
    await c.sendOption(0x7fff_0001, Buffer.alloc(0), 0xfffffff0);
    for (let i = 0; i < 128 && !c.isClosed; i++) await c.write(Buffer.alloc(MiB, 0x62));
    expect((await rssBytes(server.pid)) - before).toBeLessThan(100 * MiB);
    await expectHealthy();
    c.end();
    expect(await c.waitClose()).toBe('closed');
  });

  it('EXPORT_NAME for a missing export: connection closed without an answer', async () => {
    const c = await negotiating();
    await c.sendOption(OPT_EXPORT_NAME, Buffer.from('no-such-export'));
    expect(await c.waitClose()).toBe('closed');
    expect(c.received).toBe(18); // only the greeting
    await expectHealthy();
  });

  it('a truncated request header, then close', async () => {
    const c = await connect();
    await c.handshake('disk');
    const req = RawClient.request({ type: CMD_READ, handle: 7, offset: 0, length: 4096 });
    await c.write(req.subarray(0, 11));
    c.end();
    expect(await c.waitClose()).toBe('closed');
    await expectHealthy();
  });

  it('a request with a bad magic: connection dropped', async () => {
    const c = await connect();
    await c.handshake('disk');
    await c.write(
      RawClient.request({ type: CMD_READ, handle: 8, offset: 0, length: 4096, magic: 0xdeadbeef }),
    );
    expect(await c.waitClose()).toBe('closed');
    await expectHealthy();
  });

  // The tests below leave a connection in the middle of a WRITE payload, so each has a
  // server of its own: a connection stuck there must not spoil the others' verdicts.

  it('a WRITE declaring 4 GiB - 1 fed 200 MiB: memory bounded, others served', async () => {
    const own = await startServer({ size: SIZE, name: 'disk' });
    try {
      await expectServes(own, SIZE);
      const before = await rssBytes(own.pid);
      const c = await connect(own);
      await c.handshake('disk');
      await c.write(
        RawClient.request({ type: CMD_WRITE, handle: 9, offset: 0, length: 0xffffffff }),
      );
      const chunk = Buffer.alloc(MiB, 0xa5);
      let fed = 0;
      const deadline = Date.now() + 30_000;
      while (fed < 200 * MiB && !c.isClosed && Date.now() < deadline) {
        if (!(await c.write(chunk))) break;
        fed += chunk.length;
        if (fed === 100 * MiB) await expectServes(own, SIZE); // during the flood
      }
      const grown = (await rssBytes(own.pid)) - before;
      expect(grown, `RSS grew by ${grown} bytes after ${fed} bytes fed`).toBeLessThan(100 * MiB);
      c.destroy();
      await expectServes(own, SIZE);
    } finally {
      expect.soft(await own.stop(), 'exit code of SIGTERM after the flood').toBe(0);
    }
  });

  it('a client that half-closes in the middle of a WRITE payload is closed', async () => {
    const own = await startServer({ size: '8M', name: 'disk' });
    try {
      const c = await connect(own);
      await c.handshake('disk');
      await c.write(RawClient.request({ type: CMD_WRITE, handle: 1, offset: 0, length: 65536 }));
      await c.write(Buffer.alloc(1024, 0x11));
      c.end(); // EOF: the rest of the payload will never come
      expect(await c.waitClose(), 'server closes its side after EOF mid-payload').toBe('closed');
      await expectServes(own, 8 * MiB);
    } finally {
      expect.soft(await own.stop(), 'exit code of SIGTERM').toBe(0);
    }
  });

  it('clients that vanish in the middle of a WRITE payload are forgotten', async () => {
    // With a small connection limit (when the server has one): each vanished client
    // must give its slot back, or real clients get locked out.
    const limit = ballastServeHas('--max-connections') ? 4 : undefined;
    const own = await startServer({
      size: '8M',
      name: 'disk',
      extraArgs: limit ? ['--max-connections', String(limit)] : [],
    });
    try {
      for (let i = 0; i < 8; i++) {
        // A vanished client's slot comes back once the thread that served it has seen
        // it go (with worker threads, a message to the thread that accepts): a new
        // client may be refused for that moment, never for good. Two seconds of retries.
        let c = await connect(own);
        for (let tries = 1; ; tries++) {
          try {
            await c.handshake('disk');
            break;
          } catch (e) {
            c.destroy();
            if (tries === 40) {
              throw new Error(
                `after ${i} clients vanished mid-payload (connection limit ${limit ?? 'none'}), ` +
                  `a new client is not served for 2 s: ${(e as Error).message}`,
              );
            }
            await new Promise((r) => setTimeout(r, 50));
            c = await connect(own);
          }
        }
        await c.write(RawClient.request({ type: CMD_WRITE, handle: i, offset: 0, length: 65536 }));
        await c.write(Buffer.alloc(1024, 0x11));
        c.destroy();
        await c.closed;
      }
      await expectServes(own, 8 * MiB);
    } finally {
      expect.soft(await own.stop(), 'exit code of SIGTERM after clients vanished').toBe(0);
    }
  });

  it('50 connections that never speak do not lock out real clients', async () => {
    const idle = await Promise.all(Array.from({ length: 50 }, () => connect()));
    await expectHealthy();
    if (HANDSHAKE_TIMEOUT) {
      // The server drops them once the handshake timeout passes.
      const states = await Promise.all(
        idle.map((c) => c.waitClose(HANDSHAKE_TIMEOUT * 1000 + 15_000)),
      );
      expect(states.filter((s) => s === 'open')).toHaveLength(0);
    }
    for (const c of idle) c.destroy();
    await expectHealthy();
  });
});
