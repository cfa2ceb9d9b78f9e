// No client can lock others out of the NBD server (the class of CVE-2024-7409):
// a thousand connections that connect and send nothing, or stop in the middle
// of an option, neither keep a new client out nor take an established one's
// place; they are closed at the handshake deadline, and the server's memory
// stays bounded. Connections in transmission are never timed out. The same
// holds for the agent with its default limits, on its TCP and Unix listeners.

import { chmodSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import {
  CMD_READ,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  IHAVEOPT,
  RawClient,
  REP_ACK,
} from '../helpers/nbd-raw.js';
import { dedent } from '../helpers/nbdsh.js';
import {
  MiB,
  makeTempDir,
  rssBytes,
  type ServerHandle,
  serverKind,
  startServer,
} from '../helpers/server.js';
import { makePki, x509Args } from '../helpers/tls.js';
import { describeRun, describeWithTools, run, SYSTEM_PYTHON } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

const IDLE = 1000;
const OPT_STARTTLS = 5;
const DEADLINE_S = 3;

/** Opens `n` sockets to the server, `n/2` silent and `n/2` stopped in the middle of an option. */
async function flood(target: { port: number } | { path: string }, n: number) {
  const socks: net.Socket[] = [];
  const closed: Promise<void>[] = [];
  const open = (i: number) =>
    new Promise<void>((resolve) => {
      const s = 'path' in target ? net.connect(target.path) : net.connect(target.port, '127.0.0.1');
      s.on('error', () => {});
      s.on('data', () => {}); // the greeting; keeps 'close' coming
      closed.push(new Promise((r) => s.once('close', () => r())));
      s.once('connect', () => {
        if (i % 2 === 1) {
          const flags = Buffer.alloc(4);
          flags.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
          // Client flags, then half an option header, then nothing.
          s.write(Buffer.concat([flags, IHAVEOPT, Buffer.from([0, 0, 0])]));
        }
        resolve();
      });
      s.once('close', () => resolve());
      socks.push(s);
    });
  // In batches, so the listen backlog never overflows into SYN retries.
  for (let i = 0; i < n; i += 50) {
    await Promise.all(Array.from({ length: Math.min(50, n - i) }, (_, k) => open(i + k)));
  }
  return { socks, closed };
}

/** Connect, handshake and read 4 KiB with libnbd; the time it took, measured in the client. */
async function timedRead(uri: string): Promise<number> {
  const code = dedent(`
    import nbd, time
    h = nbd.NBD()
    t = time.monotonic()
    h.connect_uri(${JSON.stringify(uri)})
    buf = h.pread(4096, 0)
    print(time.monotonic() - t)
    assert buf == b'\\x5a' * 4096
    h.shutdown()
  `);
  const r = await run(SYSTEM_PYTHON, ['-c', code], { timeoutMs: 30_000 });
  expect(r.code, describeRun(r)).toBe(0);
  return Number(r.stdout.trim());
}

const ballastOnly = serverKind() === 'ballast';

describeWithTools(['nbdsh'], 'a thousand idle connections lock no one out', () => {
  let server: ServerHandle;
  let steady: RawClient;

  beforeAll(async () => {
    if (!ballastOnly) return;
    server = await startServer({
      size: 16 * MiB,
      name: 'disk',
      tcp: true,
      extraArgs: ['--handshake-limit', String(DEADLINE_S)],
    });
    const w = await run(SYSTEM_PYTHON, [
      '-c',
      dedent(`
        import nbd
        h = nbd.NBD()
        h.connect_uri(${JSON.stringify(server.tcpUri())})
        h.pwrite(b'\\x5a' * 65536, 0)
        h.flush()
        h.shutdown()
      `),
    ]);
    expect(w.code, describeRun(w)).toBe(0);
    // An established client, idle through all of it: never timed out, never evicted.
    steady = await RawClient.connect(server.socket);
    await steady.handshake('disk');
  });

  afterAll(async () => {
    steady?.destroy();
    if (server) expect(await server.stop()).toBe(0);
  });

  const expectSteadyServed = async () => {
    await steady.write(RawClient.request({ type: CMD_READ, handle: 7n, offset: 0, length: 4096 }));
    expect(await steady.readSimpleReply()).toEqual({ error: 0, handle: 7n });
    expect((await steady.read(4096)).every((b) => b === 0x5a)).toBe(true);
  };

  for (const transport of ['tcp', 'unix'] as const) {
    it.runIf(ballastOnly)(
      `over ${transport}: a new libnbd client is served within 1 s; the idle ones close at the deadline`,
      async () => {
        const before = await rssBytes(server.pid);
        const slack = scaled(5_000);
        const target = transport === 'tcp' ? { port: server.port! } : { path: server.socket };
        const t0 = performance.now();
        const { socks, closed } = await flood(target, IDLE);
        expect(socks.length).toBe(IDLE);

        const uri = transport === 'tcp' ? server.tcpUri() : server.uri();
        // Served without waiting for the idle ones to be evicted at the deadline: within
        // 1 s on a quiet machine, stretched by the load, never as long as the deadline.
        const took = await timedRead(uri);
        expect(took).toBeLessThan(Math.min(scaled(1000), DEADLINE_S * 1000 - 500) / 1000);
        await expectSteadyServed();

        // Every idle connection is gone by the deadline (with slack for a busy machine).
        const all = Promise.all(closed).then(() => 'all closed');
        const late = new Promise((r) =>
          setTimeout(() => r('some still open'), DEADLINE_S * 1000 + slack),
        );
        expect(await Promise.race([all, late])).toBe('all closed');
        const elapsed = (performance.now() - t0) / 1000;
        expect(elapsed).toBeLessThan(DEADLINE_S + slack / 1000);

        const after = await rssBytes(server.pid);
        expect(after - before, `RSS ${before} → ${after}`).toBeLessThan(48 * MiB);
        await expectSteadyServed();
      },
      60_000,
    );
  }

  it.runIf(ballastOnly)(
    'an established client idle past the deadline is left alone',
    async () => {
      const c = await RawClient.connect(server.socket);
      await c.handshake('disk');
      expect(await c.waitClose((DEADLINE_S + 1) * 1000)).toBe('open');
      await c.write(RawClient.request({ type: CMD_READ, handle: 9n, offset: 0, length: 512 }));
      expect(await c.readSimpleReply()).toEqual({ error: 0, handle: 9n });
      c.destroy();
    },
    30_000,
  );
});

describeWithTools(['nbdsh'], 'the agent, with its default limits: no lockout either', () => {
  // The agent's own defaults (64 connections in handshake, 1024 in all), but a
  // short deadline to keep the test quick; the TCP client is named by its address.
  let agent: AgentHandle;
  const isRoot = process.getuid?.() === 0;

  beforeAll(async () => {
    if (!isRoot) return;
    agent = await startAgent({
      nbd: { handshakeLimit: DEADLINE_S, identities: ['127.0.0.1=host-a'] },
    });
    const c = await agent.cli('device', 'create', 'disk', '--size', '16M', '--role', 'paging');
    expect(c.code, describeRun(c)).toBe(0);
    const w = await run(SYSTEM_PYTHON, [
      '-c',
      dedent(`
        import nbd
        h = nbd.NBD()
        h.connect_uri(${JSON.stringify(agent.uri('disk'))})
        h.pwrite(b'\\x5a' * 65536, 0)
        h.flush()
        h.shutdown()
      `),
    ]);
    expect(w.code, describeRun(w)).toBe(0);
  }, 60_000);

  afterAll(async () => {
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it.runIf(isRoot)(
    'a thousand idle connections on each listener: a new libnbd client is served within 1 s',
    async () => {
      const before = await rssBytes(agent.child.pid!);
      for (const transport of ['tcp', 'unix'] as const) {
        const target = transport === 'tcp' ? { port: agent.nbdPort } : { path: agent.nbdSocket };
        const { socks, closed } = await flood(target, IDLE);
        expect(socks.length).toBe(IDLE);
        const uri =
          transport === 'tcp' ? `nbd://127.0.0.1:${agent.nbdPort}/disk` : agent.uri('disk');
        expect(await timedRead(uri), transport).toBeLessThan(1);
        const all = Promise.all(closed).then(() => 'all closed');
        const late = new Promise((r) =>
          setTimeout(() => r('some still open'), DEADLINE_S * 1000 + 5_000),
        );
        expect(await Promise.race([all, late]), transport).toBe('all closed');
      }
      const after = await rssBytes(agent.child.pid!);
      expect(after - before, `RSS ${before} → ${after}`).toBeLessThan(48 * MiB);
      // Its metrics say why it closed them: the oldest made room for newer ones
      // (past 64 in handshake), the last ones waited for the deadline. (A few
      // of a burst may be dropped by the kernel's backlog and never reach it.)
      const m = (await agent.api('GET', '/metrics')).text;
      const closed = (reason: string) =>
        Number(
          new RegExp(`ballast_nbd_closed_connections_total\\{reason="${reason}"\\} (\\d+)`).exec(
            m,
          )?.[1],
        );
      expect(closed('evicted'), m).toBeGreaterThan(IDLE);
      expect(closed('handshake_timeout'), m).toBeGreaterThan(0);
      expect(closed('handshake_timeout'), m).toBeLessThanOrEqual(2 * 64);
    },
    90_000,
  );
});

describeWithTools(['nbdsh'], 'per-source limits', () => {
  let server: ServerHandle;

  beforeAll(async () => {
    if (!ballastOnly) return;
    server = await startServer({
      size: 4 * MiB,
      name: 'disk',
      tcp: true,
      extraArgs: ['--max-per-source', '3'],
    });
  });

  afterAll(async () => {
    if (server) expect(await server.stop()).toBe(0);
  });

  it.runIf(ballastOnly)(
    'a source at its limit loses its own oldest handshake; with none, it is refused',
    async () => {
      const idle = await RawClient.connect({ port: server.port! });
      await idle.greeting();
      const a = await RawClient.connect({ port: server.port! });
      await a.handshake('disk');
      const b = await RawClient.connect({ port: server.port! });
      await b.handshake('disk');
      // The fourth from 127.0.0.1 takes the idle handshake's place.
      const c = await RawClient.connect({ port: server.port! });
      expect(await idle.waitClose(5_000)).toBe('closed');
      await c.handshake('disk');
      // Three established: the next one is refused.
      const d = await RawClient.connect({ port: server.port! });
      expect(await d.waitClose(5_000)).toBe('closed');
      // The other source (the Unix socket) is not affected.
      const u = await RawClient.connect(server.socket);
      await u.handshake('disk');
      for (const x of [a, b, c, u]) x.destroy();
      expect(server.stderr()).toContain('at its limit of 3');
    },
    30_000,
  );
});

describeWithTools(['nbdinfo', 'setpriv'], 'per-uid limits on the Unix socket', () => {
  // The agent's NBD socket opened to group nogroup (65534), so that uid 65534
  // may connect too: each uid is a source of its own.
  let agent: AgentHandle;
  const isRoot = process.getuid?.() === 0;

  beforeAll(async () => {
    if (!isRoot) return;
    agent = await startAgent({ nbd: { maxPerSource: 2, socketGroup: 'nogroup' } });
    chmodSync(agent.dir, 0o755);
    const c = await agent.cli('device', 'create', 'disk', '--size', '4M');
    expect(c.code, describeRun(c)).toBe(0);
  }, 60_000);

  afterAll(async () => {
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it.runIf(isRoot)(
    "a uid at its limit is refused; another uid's client is served",
    async () => {
      const a = await RawClient.connect(agent.nbdSocket);
      await a.handshake('disk');
      const b = await RawClient.connect(agent.nbdSocket);
      await b.handshake('disk');
      const c = await RawClient.connect(agent.nbdSocket);
      expect(await c.waitClose(5_000)).toBe('closed');
      const other = await run('setpriv', [
        '--reuid=65534',
        '--regid=65534',
        '--clear-groups',
        '--',
        'nbdinfo',
        '--size',
        agent.uri('disk'),
      ]);
      expect(other.code, describeRun(other)).toBe(0);
      expect(other.stdout.trim()).toBe(String(4 * MiB));
      expect(agent.stderr()).toContain('source uid:0 at its limit of 2');
      a.destroy();
      b.destroy();
    },
    30_000,
  );
});

describeWithTools(['openssl'], 'the handshake deadline covers TLS', () => {
  let server: ServerHandle;

  beforeAll(async () => {
    if (!ballastOnly) return;
    const pki = await makePki(makeTempDir('ballast-pki-'), ['host-a']);
    server = await startServer({
      size: 4 * MiB,
      name: 'disk',
      extraArgs: [...x509Args(pki, 'require'), '--handshake-limit', '2'],
    });
  }, 60_000);

  afterAll(async () => {
    if (server) expect(await server.stop()).toBe(0);
  });

  it.runIf(ballastOnly)(
    'a client that sends STARTTLS and then no TLS handshake is closed at the deadline',
    async () => {
      const c = await RawClient.connect(server.socket);
      await c.greeting();
      await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
      await c.sendOption(OPT_STARTTLS);
      const ack = await c.readOptionReply();
      expect(ack.type).toBe(REP_ACK);
      const t0 = performance.now();
      expect(await c.waitClose(10_000)).toBe('closed');
      expect((performance.now() - t0) / 1000).toBeGreaterThan(1);
    },
    30_000,
  );
});
