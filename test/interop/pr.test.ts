// Persistent reservations enforced on real NBD connections. The agent serves
// TLS only; hosts A, B and C are TLS identities (certificate CNs). libnbd
// (nbdsh, nbdinfo) and QEMU (qemu-io) are the clients. Covered: the access
// matrix for every type and role, the migration hand-off (A holds Write
// Exclusive, B registers and preempts, A's writes fail with EPERM and nothing
// A sent after the preempt is in the file), PREEMPT AND ABORT closing A's
// connection, access lists that hide devices from identities not on them,
// durability across kill -9, the audit trail, and bad input.

import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { PRELUDE } from '../helpers/nbdsh.js';
import { MiB, makeTempDir } from '../helpers/server.js';
import { makePki, type Pki, qemuX509 } from '../helpers/tls.js';
import {
  describeRun,
  describeWithTools,
  type RunResult,
  run,
  runOk,
  toolEnv,
} from '../helpers/tools.js';

const HOSTS = ['host-a', 'host-b', 'host-c'] as const;
type Host = (typeof HOSTS)[number];

const expectOk = (r: RunResult) => expect(r.code, describeRun(r)).toBe(0);
const expectFail = (r: RunResult, exit: number, code: string) => {
  expect(r.code, describeRun(r)).toBe(exit);
  expect(r.stderr, describeRun(r)).toContain(code);
};

/** A Python script in nbdsh, fed lines on stdin, answering lines on stdout. */
class Script {
  private buf = '';
  private readonly waiters: ((line: string) => void)[] = [];
  private readonly lines: string[] = [];
  readonly done: Promise<number>;
  err = '';

  constructor(private readonly child: ChildProcessWithoutNullStreams) {
    child.stdout.on('data', (b: Buffer) => {
      this.buf += b.toString('utf8');
      for (let i = this.buf.indexOf('\n'); i >= 0; i = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 1);
        const w = this.waiters.shift();
        if (w) w(line);
        else this.lines.push(line);
      }
    });
    child.stderr.on('data', (b: Buffer) => {
      this.err += b.toString('utf8');
    });
    this.done = new Promise((resolve) => child.once('exit', (c) => resolve(c ?? 128)));
  }

  /** The next line the script prints (its answer to the last command). */
  next(): Promise<string> {
    const l = this.lines.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error(`no answer from the script\n${this.err}`)),
        30_000,
      );
      this.waiters.push((line) => {
        clearTimeout(t);
        resolve(line);
      });
    });
  }

  async ask(cmd: string): Promise<string> {
    this.child.stdin.write(`${cmd}\n`);
    return this.next();
  }

  end(): void {
    this.child.stdin.end();
  }
}

/**
 * A long-lived libnbd client: `write OFFSET BYTE` / `read OFFSET` / `flush`,
 * each answered with `ok` or the errno name of the failure.
 */
function client(uri: string): Script {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-py-'));
  const file = path.join(dir, 'client.py');
  writeFileSync(
    file,
    `${PRELUDE}
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(URI)
print('ready', flush=True)
import json, threading, time
results = []
stop = False
def writer():
    # Paced, so that the device (64 MiB: 16384 blocks) outlasts a slow preempt.
    k = 0
    while not stop and k < 16384:
        try:
            h.pwrite(bytes([k % 250 + 1]) * 4096, k * 4096)
            results.append('ok')
        except nbd.Error as e:
            results.append(errno.errorcode.get(e.errnum, 'E?') if e.errnum else 'closed')
        k += 1
        time.sleep(0.002)
t = threading.Thread(target=writer)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == 'start':
        t.start()
        print('started', flush=True)
        continue
    if cmd[0] == 'mark':
        print(len(results), flush=True)
        continue
    if cmd[0] == 'stop':
        stop = True
        t.join()
        print(json.dumps(results), flush=True)
        continue
    try:
        if cmd[0] == 'write':
            h.pwrite(bytes([int(cmd[2], 16)]) * 65536, int(cmd[1]))
        elif cmd[0] == 'read':
            h.pread(65536, int(cmd[1]))
        elif cmd[0] == 'flush':
            h.flush()
        print('ok', flush=True)
    except nbd.Error as e:
        print(errno.errorcode.get(e.errnum, 'E?') if e.errnum else 'closed', flush=True)
`,
  );
  const child = spawn('nbdsh', ['-n', '-c', `exec(open(${JSON.stringify(file)}).read())`], {
    env: toolEnv({ URI: uri }),
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const s = new Script(child);
  void s.done.then(() => rmSync(dir, { recursive: true, force: true }));
  return s;
}

describeWithTools(
  ['openssl', 'nbdsh', 'nbdinfo', 'qemu-io'],
  'persistent reservations over TLS identities',
  () => {
    let pki: Pki;
    let agent: AgentHandle;
    const dir = (h: Host) => pki.clients.get(h)!;
    const uri = (h: Host, device: string) =>
      `nbds+unix:///${device}?socket=${agent.nbdSocket}&tls-certificates=${dir(h)}`;
    const tcpOpts = (device: string) =>
      `driver=nbd,host=127.0.0.1,port=${agent.nbdPort},export=${device},tls-creds=tls0`;
    /** qemu-io as host `h`; resolves with its result. */
    const qemuIo = (h: Host, device: string, ...cmds: string[]) =>
      run('qemu-io', [
        '--object',
        qemuX509(dir(h)),
        '--image-opts',
        tcpOpts(device),
        ...cmds.flatMap((c) => ['-c', c]),
      ]);
    const pr = (device: string, ...args: string[]) => agent.cli('pr', device, ...args);
    const fileOf = async (device: string) => {
      const v = (await agent.api('GET', `/v1/devices/${device}`)).body as {
        extents: { file: string }[];
      };
      return v.extents[0]!.file;
    };
    const bytesAt = (file: string, off: number, len = 65536) =>
      readFileSync(file).subarray(off, off + len);

    beforeAll(async () => {
      pki = await makePki(path.join(makeTempDir('ballast-pki-'), 'pki'), [...HOSTS]);
      agent = await startAgent({
        nbd: {
          tls: { mode: 'require', cert: pki.serverCert, key: pki.serverKey, ca: pki.caCert },
        },
      });
      for (const d of ['swap0', 'matrix', 'hidden', 'stream']) {
        const r = await agent.api('POST', '/v1/devices', {
          name: d,
          size: d === 'stream' ? '64M' : '16M',
          role: 'paging',
        });
        expect(r.status, r.text).toBe(201);
      }
    });
    afterAll(async () => {
      if (agent) expect(await agent.stop()).toBe(0);
    });

    it('the access matrix: every type × holder, registrant, other over real connections', async () => {
      // host-a holds, host-b is registered, host-c is neither.
      const table: Record<string, [string, string, string]> = {
        WE: ['ok ok', 'ok EPERM', 'ok EPERM'],
        EA: ['ok ok', 'EPERM EPERM', 'EPERM EPERM'],
        WERO: ['ok ok', 'ok ok', 'ok EPERM'],
        EARO: ['ok ok', 'ok ok', 'EPERM EPERM'],
        WEAR: ['ok ok', 'ok ok', 'ok EPERM'],
        EAAR: ['ok ok', 'ok ok', 'EPERM EPERM'],
      };
      expectOk(await pr('matrix', 'register', '--as', 'host-a', '--sa-key', '0xa'));
      expectOk(await pr('matrix', 'register', '--as', 'host-b', '--sa-key', '0xb'));
      const clients = HOSTS.map((h) => client(uri(h, 'matrix')));
      for (const c of clients) expect(await c.next()).toBe('ready');
      for (const [type, want] of Object.entries(table)) {
        expectOk(await pr('matrix', 'reserve', '--as', 'host-a', '--key', '0xa', '--type', type));
        const got: string[] = [];
        for (const c of clients) got.push(`${await c.ask('read 0')} ${await c.ask('write 0 5a')}`);
        expect({ type, got }).toEqual({ type, got: want });
        expectOk(await pr('matrix', 'release', '--as', 'host-a', '--key', '0xa', '--type', type));
      }
      // Without a reservation everyone reads and writes again.
      for (const c of clients) expect(await c.ask('write 0 5a')).toBe('ok');
      for (const c of clients) c.end();
      for (const c of clients) expect(await c.done).toBe(0);
      const m = (await agent.api('GET', '/metrics')).text;
      expect(m).toMatch(/ballast_nbd_denied_total\{device="matrix",op="write"\} [1-9]/);
    });

    it('migration hand-off: A holds WE, B registers and preempts; A gets EPERM and nothing A sent after is in the file', async () => {
      const file = await fileOf('swap0');
      expectOk(await pr('swap0', 'register', '--as', 'host-a', '--sa-key', '0xa'));
      expectOk(await pr('swap0', 'reserve', '--as', 'host-a', '--key', '0xa', '--type', 'WE'));
      // A (libnbd) writes while it holds the reservation.
      const a = client(uri('host-a', 'swap0'));
      expect(await a.next()).toBe('ready');
      expect(await a.ask('write 0 aa')).toBe('ok');
      expect(await a.ask('flush')).toBe('ok');
      // B (QEMU) registers: it may read, not write.
      expectOk(await pr('swap0', 'register', '--as', 'host-b', '--sa-key', '0xb'));
      const bRead = await qemuIo('host-b', 'swap0', 'read -P 0xaa 0 64k');
      expectOk(bRead);
      expect(bRead.stdout).not.toContain('Pattern verification failed');
      const bEarly = await qemuIo('host-b', 'swap0', 'write -P 0xbb 65536 64k');
      expect(bEarly.stdout + bEarly.stderr).toMatch(/Operation not permitted/);

      const pre = await pr(
        'swap0',
        'preempt',
        '--as',
        'host-b',
        '--key',
        '0xb',
        '--sa-key',
        '0xa',
        '--type',
        'WE',
        '--json',
      );
      expectOk(pre);
      expect(JSON.parse(pre.stdout)).toMatchObject({ changed: true, preempted: ['host-a'] });

      // A's open connection: every write-side request now fails, reads still work (WE).
      expect(await a.ask('write 1048576 cc')).toBe('EPERM');
      expect(await a.ask('write 0 cc')).toBe('EPERM');
      expect(await a.ask('read 0')).toBe('ok');
      // B, the new holder, writes.
      const bw = await qemuIo('host-b', 'swap0', 'write -P 0xbb 2M 64k', 'read -P 0xbb 2M 64k');
      expectOk(bw);
      expect(bw.stdout).not.toContain('Pattern verification failed');
      // The file, read directly: A's data from before, B's, and nothing of A's after.
      expect(bytesAt(file, 0).every((b) => b === 0xaa)).toBe(true);
      expect(bytesAt(file, MiB).every((b) => b === 0)).toBe(true);
      expect(bytesAt(file, 2 * MiB).every((b) => b === 0xbb)).toBe(true);
      // A reconnecting (QEMU this time) is refused too.
      const again = await qemuIo('host-a', 'swap0', 'write -P 0xcc 3M 64k');
      expect(again.stdout + again.stderr).toMatch(/Operation not permitted/);
      expect(bytesAt(file, 3 * MiB).every((b) => b === 0)).toBe(true);
      a.end();
      expect(await a.done).toBe(0);

      const show = JSON.parse((await pr('swap0', 'show', '--json')).stdout);
      expect(show).toMatchObject({
        reservation: { type: 1, key: '0xb', holder: 'host-b' },
        registrations: [{ identity: 'host-b', key: '0xb', holder: true }],
      });
    });

    it('no window: a writer streaming through the preempt is refused from the acknowledgement on', async () => {
      const file = await fileOf('stream');
      expectOk(await pr('stream', 'register', '--as', 'host-a', '--sa-key', '0xa'));
      expectOk(await pr('stream', 'reserve', '--as', 'host-a', '--key', '0xa', '--type', 'WE'));
      expectOk(await pr('stream', 'register', '--as', 'host-b', '--sa-key', '0xb'));
      const a = client(uri('host-a', 'stream'));
      expect(await a.next()).toBe('ready');
      expect(await a.ask('start')).toBe('started');
      const count = async () => Number(await a.ask('mark'));
      const sleep = () => new Promise((r) => setTimeout(r, 20));
      // Let some writes land, then preempt while the writer is going.
      while ((await count()) < 50) await sleep();
      expectOk(
        await pr(
          'stream',
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
      const mark = await count();
      while ((await count()) < mark + 3) await sleep();
      const results = JSON.parse(await a.ask('stop')) as string[];
      a.end();
      await a.done;
      // Writes completed before the acknowledgement succeeded; at most the one in flight
      // at that moment may still have; every write started after it failed with EPERM.
      const firstRefused = results.indexOf('EPERM');
      expect(firstRefused).toBeGreaterThanOrEqual(50);
      expect(firstRefused).toBeLessThanOrEqual(mark + 1);
      expect(results.slice(firstRefused).every((r) => r === 'EPERM')).toBe(true);
      // The file holds exactly the writes that were answered ok, and nothing after them.
      const data = readFileSync(file);
      for (let k = 0; k < results.length; k++) {
        const block = data.subarray(k * 4096, (k + 1) * 4096);
        const want = results[k] === 'ok' ? (k % 250) + 1 : 0;
        if (!block.every((b) => b === want)) {
          throw new Error(`block ${k} (${results[k]}) does not hold ${want}`);
        }
      }
    });

    it('PREEMPT AND ABORT closes the preempted identity’s connections', async () => {
      // host-a registers again and connects; host-b (the holder) preempts and aborts it.
      expectOk(await pr('swap0', 'register', '--as', 'host-a', '--sa-key', '0xa2'));
      const a = client(uri('host-a', 'swap0'));
      expect(await a.next()).toBe('ready');
      expect(await a.ask('read 0')).toBe('ok');
      const r = await pr(
        'swap0',
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
      expect(JSON.parse(r.stdout)).toMatchObject({ preempted: ['host-a'], aborted: 1 });
      expect(await a.ask('read 0')).not.toBe('ok');
      a.end();
      await a.done;
    });

    it('the state survives kill -9; the audit trail says who did what when', async () => {
      const before = JSON.parse((await pr('swap0', 'show', '--json')).stdout);
      await agent.kill9();
      await agent.start();
      const after = JSON.parse((await pr('swap0', 'show', '--json')).stdout);
      expect(after).toEqual(before);
      const w = await qemuIo('host-a', 'swap0', 'write -P 0xdd 4M 64k');
      expect(w.stdout + w.stderr).toMatch(/Operation not permitted/);
      const audit = JSON.parse((await pr('swap0', 'audit', '--json')).stdout) as {
        entries: {
          action: string;
          initiator: string;
          actor: string;
          time: string;
          outcome: string;
        }[];
      };
      expect(audit.entries.map((e) => `${e.initiator} ${e.action} ${e.outcome}`)).toEqual([
        'host-a register changed',
        'host-a reserve changed',
        'host-b register changed',
        'host-b preempt changed',
        'host-a register changed',
        'host-b preempt-abort changed',
      ]);
      for (const e of audit.entries) {
        expect(e.actor).toBe(`uid:${process.getuid?.() ?? 0}`);
        expect(Number.isNaN(Date.parse(e.time))).toBe(false);
      }
    });

    it('REGISTER AND MOVE hands the reservation to another identity', async () => {
      const r = await pr(
        'swap0',
        'register-move',
        '--as',
        'host-b',
        '--key',
        '0xb',
        '--sa-key',
        '0xc',
        '--target',
        'host-c',
        '--unregister',
        '--json',
      );
      expectOk(r);
      const show = JSON.parse((await pr('swap0', 'show', '--json')).stdout);
      expect(show.reservation).toMatchObject({ type: 1, key: '0xc', holder: 'host-c' });
      expect(show.registrations).toEqual([{ identity: 'host-c', key: '0xc', holder: true }]);
      const c = await qemuIo('host-c', 'swap0', 'write -P 0xcc 5M 64k');
      expectOk(c);
      const b = await qemuIo('host-b', 'swap0', 'write -P 0xbb 6M 64k');
      expect(b.stdout + b.stderr).toMatch(/Operation not permitted/);
      // And back, so the tests after this one find host-b holding it.
      expectOk(
        await pr(
          'swap0',
          'register-move',
          '--as',
          'host-c',
          '--key',
          '0xc',
          '--sa-key',
          '0xb',
          '--target',
          'host-b',
          '--unregister',
        ),
      );
    });

    it('conflicts and bad input: stable codes and exit codes, state unchanged', async () => {
      const gen = JSON.parse((await pr('swap0', 'show', '--json')).stdout).generation;
      expectFail(
        await pr('swap0', 'reserve', '--as', 'host-c', '--key', '0x1', '--type', 'WE'),
        5,
        'PR_CONFLICT',
      );
      const wrong = await pr('swap0', 'release', '--as', 'host-b', '--key', '0x99', '--type', 'WE');
      expectFail(wrong, 5, 'PR_CONFLICT');
      expect(wrong.stderr).toContain('key-mismatch');
      expectFail(
        await pr('swap0', 'register', '--as', 'host-a', '--sa-key', 'zz'),
        8,
        'PR_BAD_KEY',
      );
      expectFail(
        await pr('swap0', 'register', '--as', 'host-a', '--sa-key', '0x1ffffffffffffffff'),
        8,
        'PR_BAD_KEY',
      );
      expectFail(
        await pr('swap0', 'reserve', '--as', 'host-b', '--key', '0xb', '--type', '2'),
        8,
        'PR_BAD_TYPE',
      );
      expectFail(
        await pr('swap0', 'reserve', '--as', 'host-b', '--key', '0xb', '--type', 'XX'),
        8,
        'PR_BAD_TYPE',
      );
      expectFail(
        await pr('swap0', 'release', '--as', 'host-b', '--key', '0xb', '--type', 'EA'),
        8,
        'PR_INVALID_RELEASE',
      );
      expectFail(await pr('nosuch', 'show'), 4, 'BALLAST_DEVICE_NOT_FOUND');
      expect((await pr('swap0', 'steal', '--as', 'x')).code).toBe(2);
      const j = await pr(
        'swap0',
        'reserve',
        '--as',
        'host-c',
        '--key',
        '0x1',
        '--type',
        'WE',
        '--json',
      );
      expect(JSON.parse(j.stdout).error.code).toBe('PR_CONFLICT');
      expect(JSON.parse((await pr('swap0', 'show', '--json')).stdout).generation).toBe(gen);
    });

    it('without TLS, identities come from the source address and the Unix peer uid', async () => {
      const plain = await startAgent({
        nbd: { identities: ['127.0.0.1=host-tcp', `uid:${process.getuid?.() ?? 0}=host-unix`] },
      });
      try {
        const r = await plain.api('POST', '/v1/devices', { name: 'mapped', size: '16M' });
        expect(r.status, r.text).toBe(201);
        expectOk(await plain.cli('acl', 'mapped', 'host-tcp:rw', 'host-unix:ro'));
        // Over the Unix socket the peer uid maps to host-unix: read-only.
        const unix = await runOk('nbdinfo', ['--json', plain.uri('mapped')]);
        expect(JSON.parse(unix.stdout).exports[0].is_read_only).toBe(true);
        // Over TCP from 127.0.0.1: host-tcp, read-write.
        const tcp = await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${plain.nbdPort}/mapped`]);
        expect(JSON.parse(tcp.stdout).exports[0].is_read_only).toBe(false);
        // A reservation by host-tcp leaves host-unix (not registered) reading only.
        expectOk(await plain.cli('pr', 'mapped', 'register', '--as', 'host-tcp', '--sa-key', '1'));
        expectOk(await plain.cli('acl', 'mapped', 'host-tcp:rw', 'host-unix:rw'));
        expectOk(
          await plain.cli(
            'pr',
            'mapped',
            'reserve',
            '--as',
            'host-tcp',
            '--key',
            '1',
            '--type',
            'WE',
          ),
        );
        const w = await run('qemu-io', ['-f', 'raw', plain.uri('mapped'), '-c', 'write 0 4k']);
        expect(w.stdout + w.stderr).toMatch(/Operation not permitted/);
        const ok = await run('qemu-io', [
          '-f',
          'raw',
          `nbd://127.0.0.1:${plain.nbdPort}/mapped`,
          '-c',
          'write -P 0x42 0 4k',
        ]);
        expectOk(ok);
      } finally {
        expect(await plain.stop()).toBe(0);
      }
    });

    describe('access lists', () => {
      it('identities not on the list cannot open the device or find it by guessing names', async () => {
        expectOk(await agent.cli('acl', 'hidden', 'host-a:rw', 'host-b:ro'));
        // host-c: the device is not listed, and opening it by name is refused.
        const list = await runOk('nbdinfo', ['--list', '--json', uri('host-c', '')]);
        const names = (
          JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }
        ).exports.map((e) => e['export-name']);
        expect(names).toContain('swap0');
        expect(names).not.toContain('hidden');
        const r = await run('nbdinfo', ['--size', uri('host-c', 'hidden')]);
        expect(r.code, describeRun(r)).not.toBe(0);
        expect(r.stderr).toMatch(/may not open|policy|not permitted/i);
        // Guessing: nothing but refusals, whatever the name.
        const guess = await run('nbdsh', [
          '-n',
          '-c',
          `
import nbd
ok = []
for name in ['hidden', 'Hidden', 'hidden ', 'hidden/', '', 'swap1', 'hidde', 'HIDDEN']:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.set_opt_mode(True)
    h.connect_uri(${JSON.stringify(uri('host-c', ''))})
    try:
        h.set_export_name(name)
        h.opt_go()
        ok.append(name)
    except nbd.Error:
        pass
print(repr(ok))
`,
        ]);
        expect(guess.code, describeRun(guess)).toBe(0);
        expect(guess.stdout.trim()).toBe('[]');
        // host-b is read-only; host-a reads and writes.
        const ro = await runOk('nbdinfo', ['--json', uri('host-b', 'hidden')]);
        expect(JSON.parse(ro.stdout).exports[0].is_read_only).toBe(true);
        const rw = await qemuIo('host-a', 'hidden', 'write -P 0x11 0 64k', 'read -P 0x11 0 64k');
        expectOk(rw);
        expect(agent.stderr()).not.toContain('internal error');
      });

      it('removing the list opens the device again; a bad entry is refused', async () => {
        expectFail(await agent.cli('acl', 'hidden', 'host-a:rwx'), 8, 'BALLAST_BAD_ACL');
        expectOk(await agent.cli('acl', 'hidden', 'none'));
        const r = await runOk('nbdinfo', ['--size', uri('host-c', 'hidden')]);
        expect(r.stdout.trim()).toBe(String(16 * MiB));
      });
    });
  },
);
