// The multi-threaded data path (nbd/WORKERS.md) judged by real clients: an
// agent with nbd.workers: 2, plain connections (named by the Unix peer's uid,
// so they move to the worker threads), libnbd (nbdsh), nbdcopy and qemu-io.
// Covered: several connections spread over both workers and served right;
// reservation changes reaching connections on every worker before the API
// call returns (PREEMPT: EPERM from the next write on; PREEMPT AND ABORT: every
// connection of the preempted identity closed); a resize seen by new
// connections on every worker; a device removed while connected on workers;
// SIGTERM draining connections on workers; kill -9 losing nothing acknowledged.
// `ballast serve --workers` against nbdcopy with many connections, and
// --workers 1 (one event loop) against the same, and with a thread buffer
// budget far below what the connections ask for.

import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { PRELUDE } from '../helpers/nbdsh.js';
import { logSettled, MiB, makeTempDir, startServer } from '../helpers/server.js';
import { makePki, type Pki, x509Args } from '../helpers/tls.js';
import { describeRun, describeWithTools, type RunResult, run, toolEnv } from '../helpers/tools.js';

const expectOk = (r: RunResult) => expect(r.code, describeRun(r)).toBe(0);

/**
 * N libnbd connections in one Python process, driven line by line:
 * `write OFFSET BYTE` / `read OFFSET` / `size` on every connection, answered
 * with one line of N space-separated results (ok, an errno name, or a size).
 */
class Conns {
  private buf = '';
  private readonly waiters: ((line: string) => void)[] = [];
  private readonly lines: string[] = [];
  private readonly child: ChildProcessWithoutNullStreams;
  readonly done: Promise<number>;
  err = '';

  constructor(uri: string, n: number) {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-py-'));
    const file = path.join(dir, 'conns.py');
    writeFileSync(
      file,
      `${PRELUDE}
hs = []
for i in range(${n}):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(URI)
    hs.append(h)
print('ready', flush=True)
def each(fn):
    out = []
    for h in hs:
        try:
            out.append(str(fn(h)))
        except nbd.Error as e:
            out.append(errno.errorcode.get(e.errnum, 'E?') if e.errnum else 'closed')
    print(' '.join(out), flush=True)
def rd(h, off):
    h.pread(4096, off)
    return 'ok'
def wr(h, off, b):
    h.pwrite(bytes([b]) * 4096, off)
    return 'ok'
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == 'write':
        each(lambda h: wr(h, int(cmd[1]), int(cmd[2])))
    elif cmd[0] == 'read':
        each(lambda h: rd(h, int(cmd[1])))
    elif cmd[0] == 'size':
        each(lambda h: h.get_size())
`,
    );
    this.child = spawn('nbdsh', ['-c', `exec(open(${JSON.stringify(file)}).read())`], {
      env: toolEnv({ URI: uri }),
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.child.stdout.on('data', (b: Buffer) => {
      this.buf += b.toString('utf8');
      for (let i = this.buf.indexOf('\n'); i >= 0; i = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const w = this.waiters.shift();
        if (w) w(line);
        else this.lines.push(line);
      }
    });
    this.child.stderr.on('data', (b: Buffer) => {
      this.err += b.toString('utf8');
    });
    this.done = new Promise((resolve) => this.child.once('exit', (c) => resolve(c ?? 128)));
  }

  next(): Promise<string> {
    const l = this.lines.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no answer from nbdsh\n${this.err}`)), 30_000);
      this.waiters.push((line) => {
        clearTimeout(t);
        resolve(line);
      });
    });
  }

  /** Sends a command; resolves with one result per connection. */
  async ask(cmd: string): Promise<string[]> {
    this.child.stdin.write(`${cmd}\n`);
    return (await this.next()).split(' ');
  }

  async end(): Promise<void> {
    this.child.stdin.end();
    await this.done;
  }
}

async function open(uri: string, n: number): Promise<Conns> {
  const c = new Conns(uri, n);
  expect(await c.next(), c.err).toBe('ready');
  return c;
}

describeWithTools(
  ['nbdsh', 'nbdcopy', 'qemu-io', 'nbdinfo'],
  'NBD worker threads (nbd.workers: 2)',
  () => {
    let agent: AgentHandle;
    const uid = process.getuid?.() ?? 0;
    const workers = async () =>
      ((await agent.api('GET', '/v1/status')).body as { nbdWorkers: number[] }).nbdWorkers;
    const pr = (device: string, ...args: string[]) => agent.cli('pr', device, ...args);
    const create = async (name: string, size: string) =>
      expectOk(await agent.cli('device', 'create', name, '--size', size));

    beforeAll(async () => {
      // Every local client of ours is host-a: a plain, named connection.
      agent = await startAgent({ nbd: { workers: 2, identities: [`uid:${uid}=host-a`] } });
    });
    afterAll(async () => {
      await agent?.stop();
    });

    it('spreads connections over both workers and serves them right', async () => {
      await create('wk0', '32M');
      expect(await workers()).toEqual([0, 0]);
      const c = await open(agent.uri('wk0'), 4);
      expect(await workers()).toEqual([2, 2]);
      expect(await c.ask('write 0 7')).toEqual(['ok', 'ok', 'ok', 'ok']);
      expect(await c.ask('read 0')).toEqual(['ok', 'ok', 'ok', 'ok']);
      const st = await agent.cli('status');
      expect(st.stdout).toContain('connections: 4 (NBD, on 2 worker threads: 2, 2)');
      await c.end();
      // nbdcopy with 4 connections each way, while qemu-io checks a pattern.
      const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-wk-'));
      const src = path.join(dir, 'src.img');
      const back = path.join(dir, 'back.img');
      writeFileSync(src, randomBytes(32 * MiB));
      expectOk(await run('nbdcopy', ['--connections=4', '--requests=16', src, agent.uri('wk0')]));
      expectOk(await run('nbdcopy', ['--connections=4', agent.uri('wk0'), back]));
      expect(readFileSync(back).equals(readFileSync(src))).toBe(true);
      const q = await run('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0x3c 1M 1M',
        '-c',
        'read -P 0x3c 1M 1M',
        agent.uri('wk0'),
      ]);
      expectOk(q);
      expect(q.stdout).not.toContain('Pattern verification failed');
      // Counters of requests served on workers reach the metrics.
      const m = await agent.api('GET', '/metrics');
      const written = m.text
        .split('\n')
        .find(
          (l) =>
            l.startsWith('ballast_nbd_bytes_total{') &&
            l.includes('"wk0"') &&
            l.includes('"write"'),
        );
      expect(written, m.text.slice(0, 3000)).toBeDefined();
      expect(Number(written!.split(' ').pop())).toBeGreaterThanOrEqual(32 * MiB);
    });

    it('PREEMPT refuses the preempted identity on every worker from its acknowledgement on', async () => {
      await create('wk1', '16M');
      expectOk(await pr('wk1', 'register', '--as', 'host-a', '--sa-key', '0xa'));
      expectOk(await pr('wk1', 'reserve', '--as', 'host-a', '--key', '0xa', '--type', 'WE'));
      const c = await open(agent.uri('wk1'), 4);
      expect(await workers()).toEqual([2, 2]);
      expect(await c.ask('write 0 1')).toEqual(['ok', 'ok', 'ok', 'ok']);
      expectOk(await pr('wk1', 'register', '--as', 'host-b', '--sa-key', '0xb'));
      expectOk(
        await pr(
          'wk1',
          'preempt',
          '--as',
          'host-b',
          '--key',
          '0xb',
          '--sa-key',
          '0xa',
          '--type',
          'WE',
        ),
      );
      // The very next write of each connection, on both workers, is refused.
      expect(await c.ask('write 4096 2')).toEqual(['EPERM', 'EPERM', 'EPERM', 'EPERM']);
      expect(await c.ask('read 0')).toEqual(['ok', 'ok', 'ok', 'ok']);
      await c.end();
    });

    it('PREEMPT AND ABORT closes the preempted identity’s connections on every worker', async () => {
      expectOk(await pr('wk1', 'register', '--as', 'host-a', '--sa-key', '0xa2'));
      const c = await open(agent.uri('wk1'), 4);
      expect(await workers()).toEqual([2, 2]);
      expect(await c.ask('read 0')).toEqual(['ok', 'ok', 'ok', 'ok']);
      const r = await pr(
        'wk1',
        'preempt-abort',
        '--as',
        'host-b',
        '--key',
        '0xb',
        '--sa-key',
        '0xa2',
        '--type',
        'WE',
        '--json',
      );
      expectOk(r);
      expect(JSON.parse(r.stdout)).toMatchObject({ preempted: ['host-a'], aborted: 4 });
      for (const res of await c.ask('read 0')) expect(res).not.toBe('ok');
      expect(await workers()).toEqual([0, 0]);
      await c.end();
      // A new connection of host-a reads, and its writes are refused.
      const again = await open(agent.uri('wk1'), 2);
      expect(await again.ask('write 0 3')).toEqual(['EPERM', 'EPERM']);
      await again.end();
      const file = (
        (await agent.api('GET', '/v1/devices/wk1')).body as { extents: { file: string }[] }
      ).extents[0]!.file;
      expect(
        readFileSync(file)
          .subarray(0, 4096)
          .every((b) => b === 1),
      ).toBe(true);
    });

    it('a resize is seen by new connections on every worker', async () => {
      await create('wk2', '16M');
      const old = await open(agent.uri('wk2'), 2);
      expect(await old.ask('size')).toEqual([String(16 * MiB), String(16 * MiB)]);
      expectOk(await agent.cli('device', 'resize', 'wk2', '--size', '24M'));
      const fresh = await open(agent.uri('wk2'), 4);
      expect(await workers()).toEqual([3, 3]);
      expect(await fresh.ask('size')).toEqual(Array(4).fill(String(24 * MiB)));
      // Past the old end, on every worker.
      expect(await fresh.ask(`write ${20 * MiB} 9`)).toEqual(['ok', 'ok', 'ok', 'ok']);
      // Connections already open keep the size they were given.
      expect(await old.ask('size')).toEqual([String(16 * MiB), String(16 * MiB)]);
      await old.end();
      await fresh.end();
      const info = await run('nbdinfo', ['--size', agent.uri('wk2')]);
      expect(info.stdout.trim()).toBe(String(24 * MiB));
    });

    it('a device is not removed under connections on workers, unless forced', async () => {
      await create('wk3', '8M');
      const c = await open(agent.uri('wk3'), 4);
      expect(await workers()).toEqual([2, 2]);
      const busy = await agent.cli('device', 'rm', 'wk3');
      expect(busy.code, describeRun(busy)).not.toBe(0);
      expect(busy.stderr).toContain('BALLAST_DEVICE_BUSY');
      expect(await c.ask('write 0 5')).toEqual(['ok', 'ok', 'ok', 'ok']);
      expectOk(await agent.cli('device', 'rm', 'wk3', '--force'));
      expect(await workers()).toEqual([0, 0]);
      for (const res of await c.ask('read 0')) expect(res).not.toBe('ok');
      await c.end();
      const gone = await run('nbdinfo', [agent.uri('wk3')]);
      expect(gone.code).not.toBe(0);
    });

    it('kill -9 loses nothing acknowledged; SIGTERM drains connections on workers and exits 0', async () => {
      await create('wk4', '8M');
      const c = await open(agent.uri('wk4'), 4);
      expect(await workers()).toEqual([2, 2]);
      expect(await c.ask('write 8192 6')).toEqual(['ok', 'ok', 'ok', 'ok']);
      await agent.kill9();
      await c.end();
      await agent.start();
      const q = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 6 8192 4096', agent.uri('wk4')]);
      expectOk(q);
      expect(q.stdout).not.toContain('Pattern verification failed');
      const d = await open(agent.uri('wk4'), 4);
      expect(await workers()).toEqual([2, 2]);
      const stopped = agent.stop();
      expect(await stopped).toBe(0);
      for (const res of await d.ask('read 0')) expect(res).not.toBe('ok');
      await d.end();
      await agent.start();
    });
  },
);

describeWithTools(['nbdcopy', 'nbdinfo'], 'ballast serve --workers', () => {
  const cases: [number, string[]][] = [
    [1, []],
    [3, []],
    // Far fewer buffers than 8 connections of nbdcopy keep in flight: they
    // take turns, none is starved, the data is right.
    [2, ['--thread-buffers', '768K']],
  ];
  for (const [n, extra] of cases) {
    it(`copies through 8 connections with --workers ${n} ${extra.join(' ')}`, async () => {
      const srv = await startServer({
        size: '24M',
        extraArgs: ['--workers', String(n), ...extra],
      });
      try {
        const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-wk-'));
        const src = path.join(dir, 'src.img');
        const back = path.join(dir, 'back.img');
        writeFileSync(src, randomBytes(24 * MiB));
        const uri = `nbd+unix:///?socket=${srv.socket}`;
        expectOk(await run('nbdcopy', ['--connections=8', src, uri]));
        expectOk(await run('nbdcopy', ['--connections=8', uri, back]));
        expect(readFileSync(back).equals(readFileSync(src))).toBe(true);
      } finally {
        expect(await srv.stop()).toBe(0);
      }
    });
  }
});

describeWithTools(['nbdsh', 'nbdcopy', 'openssl'], 'TLS on the worker threads', () => {
  let pki: Pki;
  let agent: AgentHandle;
  const uri = (who: string, device: string) =>
    `nbds+unix:///${device}?socket=${agent.nbdSocket}&tls-certificates=${pki.clients.get(who)}`;
  const workers = async () =>
    ((await agent.api('GET', '/v1/status')).body as { nbdWorkers: number[] }).nbdWorkers;
  const pr = (device: string, ...args: string[]) => agent.cli('pr', device, ...args);

  beforeAll(async () => {
    pki = await makePki(path.join(makeTempDir('ballast-pki-'), 'pki'), ['alice', 'bob']);
    agent = await startAgent({
      nbd: {
        workers: 2,
        tls: { mode: 'require', cert: pki.serverCert, key: pki.serverKey, ca: pki.caCert },
      },
    });
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it('TLS identities decide access on every worker; PREEMPT AND ABORT closes them all', async () => {
    // under require, the socket serves no anonymous client either, and the log says so
    expect(agent.stderr()).toContain(
      'anonymous clients: none (TLS is required on every connection',
    );
    expectOk(await agent.cli('device', 'create', 'wt0', '--size', '16M'));
    expectOk(await pr('wt0', 'register', '--as', 'alice', '--sa-key', '0xa'));
    expectOk(await pr('wt0', 'reserve', '--as', 'alice', '--key', '0xa', '--type', 'WE'));
    const a = await open(uri('alice', 'wt0'), 4);
    const b = await open(uri('bob', 'wt0'), 2);
    expect(await workers()).toEqual([3, 3]);
    expect(await a.ask('write 0 4')).toEqual(['ok', 'ok', 'ok', 'ok']);
    expect(await b.ask('write 0 5')).toEqual(['EPERM', 'EPERM']);
    expectOk(await pr('wt0', 'register', '--as', 'bob', '--sa-key', '0xb'));
    const r = await pr(
      'wt0',
      'preempt-abort',
      '--as',
      'bob',
      '--key',
      '0xb',
      '--sa-key',
      '0xa',
      '--type',
      'WE',
      '--json',
    );
    expectOk(r);
    expect(JSON.parse(r.stdout)).toMatchObject({ preempted: ['alice'], aborted: 4 });
    for (const res of await a.ask('read 0')) expect(res).not.toBe('ok');
    expect(await b.ask('write 4096 6')).toEqual(['ok', 'ok']);
    expect(await workers()).toEqual([1, 1]);
    await a.end();
    await b.end();
  });

  it('a client certificate of another CA is refused on the worker, and logged', async () => {
    const seen = agent.stderr().split('TLS handshake failed').length;
    const bad = await run('nbdinfo', [
      `nbds+unix:///wt0?socket=${agent.nbdSocket}&tls-certificates=${pki.foreign}`,
    ]);
    expect(bad.code).not.toBe(0);
    // The worker's log line reaches stderr through the main thread, a moment later.
    const failures = () => agent.stderr().split('TLS handshake failed').length;
    await logSettled(() => (failures() > seen ? 'logged' : ''), 'logged');
    expect(failures()).toBe(seen + 1);
    expect(await workers()).toEqual([0, 0]);
  });

  it('ballast serve --workers 2 --tls require: nbdcopy over 8 TLS connections', async () => {
    const srv = await startServer({
      size: '16M',
      name: 'disk',
      extraArgs: ['--workers', '2', ...x509Args(pki, 'require')],
    });
    try {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-wk-'));
      const src = path.join(dir, 'src.img');
      const back = path.join(dir, 'back.img');
      writeFileSync(src, randomBytes(16 * MiB));
      const u = `nbds+unix:///disk?socket=${srv.socket}&tls-certificates=${pki.clients.get('alice')}`;
      expectOk(await run('nbdcopy', ['--connections=8', src, u]));
      expectOk(await run('nbdcopy', ['--connections=8', u, back]));
      expect(readFileSync(back).equals(readFileSync(src))).toBe(true);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });
});
