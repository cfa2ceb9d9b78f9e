// STARTTLS judged by real clients: libnbd (nbdinfo, nbdcopy, nbdsh) with nbds:// URIs
// and QEMU (qemu-img, qemu-io) with tls-creds-x509 / tls-creds-psk. Bad input — plaintext
// to a TLS-only server, certificates from another CA, wrong keys, broken handshakes —
// is refused, and the server keeps serving everyone else.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CMD_READ,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_LIST,
  OPT_STRUCTURED_REPLY,
  RawClient,
  REP_ACK,
  REP_FLAG_ERROR,
  SIMPLE_REPLY_MAGIC,
} from '../helpers/nbd-raw.js';
import { nbdsh } from '../helpers/nbdsh.js';
import {
  BALLAST_BIN,
  logSettled,
  MiB,
  makeTempDir,
  type ServerHandle,
  startServer,
} from '../helpers/server.js';
import { makePki, type Pki, qemuPsk, qemuX509, x509Args } from '../helpers/tls.js';
import { describeRun, describeWithTools, run, runOk } from '../helpers/tools.js';

const OPT_STARTTLS = 5;
const OPT_SET_META_CONTEXT = 10;
const REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5;
const SIZE = 64 * MiB;

/** libnbd's URI for a client directory: TCP or the Unix socket. */
function nbds(server: ServerHandle, dir: string, unix = false): string {
  const q = `tls-certificates=${dir}`;
  if (unix) return `nbds+unix:///disk?socket=${server.socket}&${q}`;
  return `nbds://127.0.0.1:${server.port}/disk?${q}`;
}

function nbdsPsk(server: ServerHandle, user: string, file: string): string {
  return `nbds://${user}@127.0.0.1:${server.port}/disk?tls-psk-file=${file}`;
}

function qemuOpts(server: ServerHandle): string {
  return `driver=nbd,host=127.0.0.1,port=${server.port},export=disk,tls-creds=tls0`;
}

/** Greeting, client flags, and STARTTLS acknowledged. */
async function startTls(c: RawClient): Promise<void> {
  await c.greeting();
  await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
  await c.sendOption(OPT_STARTTLS);
  const r = await c.readOptionReply();
  expect(r.type).toBe(REP_ACK);
}

/** TLS on top of a raw client's socket, as `dir`'s client. */
function tlsOver(c: RawClient, dir: string): Promise<RawClient> {
  return new Promise((resolve, reject) => {
    c.sock.removeAllListeners('data');
    const s = tls.connect({
      socket: c.sock,
      ca: readFileSync(path.join(dir, 'ca-cert.pem')),
      cert: readFileSync(path.join(dir, 'client-cert.pem')),
      key: readFileSync(path.join(dir, 'client-key.pem')),
      servername: 'localhost',
    });
    s.once('secureConnect', () => resolve(RawClient.over(s)));
    s.once('error', reject);
  });
}

describeWithTools(
  ['openssl', 'nbdinfo', 'nbdcopy', 'nbdsh', 'qemu-img', 'qemu-io'],
  'TLS (STARTTLS)',
  () => {
    let pki: Pki;
    let alice: string;

    beforeAll(async () => {
      pki = await makePki(path.join(makeTempDir('ballast-pki-'), 'pki'), ['alice', 'bob']);
      alice = pki.clients.get('alice')!;
    });

    describe('X.509, TLS required', () => {
      let server: ServerHandle;

      beforeAll(async () => {
        server = await startServer({
          size: SIZE,
          name: 'disk',
          tcp: true,
          extraArgs: [...x509Args(pki, 'require'), '--verbose'],
        });
      });
      afterAll(async () => {
        if (server) expect(await server.stop()).toBe(0);
      });

      /** A real client with a good certificate still gets served. */
      const expectServing = async () => {
        const r = await run('nbdinfo', ['--size', nbds(server, alice)]);
        expect(r.code, describeRun(r)).toBe(0);
        expect(r.stdout.trim()).toBe(String(SIZE));
      };

      it('nbdinfo over TCP and the Unix socket: TLS negotiated, client named by its CN', async () => {
        for (const unix of [false, true]) {
          const r = await runOk('nbdinfo', ['--json', nbds(server, alice, unix)]);
          const j = JSON.parse(r.stdout) as { TLS: boolean; exports: { 'export-size': number }[] };
          expect(j.TLS).toBe(true);
          expect(j.exports[0]?.['export-size']).toBe(SIZE);
        }
        expect(await logSettled(() => server.stderr(), /TLSv1\.[23] as alice/)).toMatch(
          /TLSv1\.[23] as alice/,
        );
      });

      it('nbdcopy writes and reads back through TLS; the file holds the data', async () => {
        const dir = makeTempDir();
        const src = path.join(dir, 'src.bin');
        const back = path.join(dir, 'back.bin');
        const data = randomBytes(4 * MiB);
        writeFileSync(src, Buffer.concat([data, Buffer.alloc(SIZE - data.length)]));
        await runOk('nbdcopy', [src, nbds(server, pki.clients.get('bob')!)]);
        await runOk('nbdcopy', [nbds(server, alice, true), back]);
        expect(readFileSync(back).subarray(0, data.length).equals(data)).toBe(true);
        expect(readFileSync(server.file).subarray(0, data.length).equals(data)).toBe(true);
      });

      it('nbdsh: TLS negotiated, structured replies and base:allocation work', async () => {
        const r = await nbdsh(
          `
          h = nbd.NBD()
          h.set_uri_allow_local_file(True)
          h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
          h.connect_uri(URI)
          eq(h.get_tls_negotiated(), True, 'tls')
          eq(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), True, 'meta')
          h.pwrite(b'\\x5a' * 4096, 8 * MiB)
          eq(h.pread(4096, 8 * MiB), b'\\x5a' * 4096, 'read back')
          h.shutdown()
          `,
          { URI: nbds(server, alice) },
        );
        expect(r.code, describeRun(r)).toBe(0);
      });

      it('qemu-io and qemu-img with tls-creds-x509', async () => {
        const io = await runOk('qemu-io', [
          '--object',
          qemuX509(alice),
          '--image-opts',
          qemuOpts(server),
          '-c',
          'write -P 0x6b 1M 256k',
          '-c',
          'read -P 0x6b 1M 256k',
        ]);
        expect(io.stdout).not.toContain('Pattern verification failed');
        const info = await runOk('qemu-img', [
          'info',
          '--output=json',
          '--object',
          qemuX509(alice),
          '--image-opts',
          qemuOpts(server),
        ]);
        expect((JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size']).toBe(SIZE);
      });

      it('plaintext clients are refused: nbdinfo, qemu-img, and options before STARTTLS get ERR_TLS_REQD', async () => {
        const plain = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${server.port}/disk`]);
        expect(plain.code, describeRun(plain)).not.toBe(0);
        const q = await run('qemu-img', ['info', `nbd://127.0.0.1:${server.port}/disk`]);
        expect(q.code, describeRun(q)).not.toBe(0);

        const c = await RawClient.connect(server.socket);
        await c.greeting();
        await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        for (const opt of [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_GO, 99]) {
          const body = opt === OPT_GO ? Buffer.from([0, 0, 0, 0, 0, 0]) : Buffer.alloc(0);
          await c.sendOption(opt, body);
          const r = await c.readOptionReply();
          expect(r.option).toBe(opt);
          expect(r.type).toBe(REP_ERR_TLS_REQD);
        }
        // EXPORT_NAME cannot be refused with a reply: the connection closes.
        await c.sendOption(OPT_EXPORT_NAME, Buffer.from('disk'));
        expect(await c.waitClose(10_000)).toBe('closed');
        await expectServing();
      });

      it('a certificate from another CA (same CN) is refused: libnbd and QEMU', async () => {
        const r = await run('nbdinfo', ['--size', nbds(server, pki.foreign)]);
        expect(r.code, describeRun(r)).not.toBe(0);
        const q = await run('qemu-io', [
          '--object',
          qemuX509(pki.foreign),
          '--image-opts',
          qemuOpts(server),
          '-c',
          'write -P 0x66 0 4k',
        ]);
        expect(q.code, describeRun(q)).not.toBe(0);
        // GnuTLS does not even offer a certificate the server's CA list does not name;
        // Node's client does, and OpenSSL's verdict refuses it.
        const c = await RawClient.connect(server.socket);
        await startTls(c);
        const presented = await tlsOver(c, pki.foreign).then(
          async (t) => {
            await t.sendOption(OPT_LIST);
            return t.readOptionReply().then(
              () => 'served',
              () => 'refused',
            );
          },
          () => 'refused',
        );
        expect(presented).toBe('refused');
        expect(await logSettled(() => server.stderr(), 'client certificate refused')).toContain(
          'client certificate refused',
        );
        await expectServing();
      });

      it('a TLS client without a certificate is refused', async () => {
        const c = await RawClient.connect(server.socket);
        await startTls(c);
        c.sock.removeAllListeners('data');
        const failed = await new Promise<boolean>((resolve) => {
          const s = tls.connect({
            socket: c.sock,
            ca: readFileSync(pki.caCert),
            servername: 'localhost',
          });
          s.on('error', () => resolve(true));
          s.on('close', () => resolve(true));
          // TLS 1.3: the server decides after its Finished; reading shows the verdict.
          s.on('secureConnect', () => s.write(Buffer.alloc(4)));
          s.on('data', () => resolve(false));
        });
        expect(failed).toBe(true);
        await expectServing();
      });

      it('broken handshakes: garbage instead of a ClientHello, plaintext injected after STARTTLS', async () => {
        const garbage = await RawClient.connect(server.socket);
        await startTls(garbage);
        await garbage.write(Buffer.from('this is not a TLS ClientHello at all\r\n'.repeat(8)));
        expect(await garbage.waitClose(10_000)).toBe('closed');

        // STARTTLS and a plaintext option in one segment: the second must not survive.
        const inject = await RawClient.connect(server.socket);
        await inject.greeting();
        await inject.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        const opt = (n: number) => {
          const h = Buffer.alloc(16);
          h.write('IHAVEOPT', 0, 'latin1');
          h.writeUInt32BE(n, 8);
          return h;
        };
        await inject.write(Buffer.concat([opt(OPT_STARTTLS), opt(OPT_STRUCTURED_REPLY)]));
        expect(await inject.waitClose(10_000)).toBe('closed');
        expect(await logSettled(() => server.stderr(), 'data after STARTTLS')).toContain(
          'data after STARTTLS',
        );
        await expectServing();
      });

      it('STARTTLS twice is refused inside TLS', async () => {
        const c = await RawClient.connect(server.socket);
        await startTls(c);
        const t = await tlsOver(c, alice);
        await t.sendOption(OPT_STARTTLS);
        const r = await t.readOptionReply();
        expect(r.type).toBe(REP_FLAG_ERROR + 3); // ERR_INVALID
        t.destroy();
      });
    });

    describe('X.509, TLS allowed: nothing negotiated in plaintext survives STARTTLS', () => {
      let server: ServerHandle;

      beforeAll(async () => {
        server = await startServer({
          size: SIZE,
          name: 'disk',
          tcp: true,
          extraArgs: x509Args(pki, 'allow'),
        });
      });
      afterAll(async () => {
        if (server) expect(await server.stop()).toBe(0);
      });

      it('plaintext and TLS clients are both served', async () => {
        const plain = await runOk('nbdinfo', ['--json', `nbd://127.0.0.1:${server.port}/disk`]);
        expect((JSON.parse(plain.stdout) as { TLS: boolean }).TLS).toBe(false);
        const sec = await runOk('nbdinfo', ['--json', nbds(server, alice)]);
        expect((JSON.parse(sec.stdout) as { TLS: boolean }).TLS).toBe(true);
      });

      it('CVE-2021-3716: structured replies and meta contexts from before STARTTLS are forgotten', async () => {
        const c = await RawClient.connect(server.socket);
        await c.greeting();
        await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        await c.sendOption(OPT_STRUCTURED_REPLY);
        expect((await c.readOptionReply()).type).toBe(REP_ACK);
        const name = Buffer.from('disk');
        const q = Buffer.from('base:allocation');
        const meta = Buffer.alloc(4 + name.length + 4 + 4 + q.length);
        meta.writeUInt32BE(name.length, 0);
        name.copy(meta, 4);
        meta.writeUInt32BE(1, 4 + name.length);
        meta.writeUInt32BE(q.length, 8 + name.length);
        q.copy(meta, 12 + name.length);
        await c.sendOption(OPT_SET_META_CONTEXT, meta);
        let r = await c.readOptionReply();
        while (r.type !== REP_ACK) r = await c.readOptionReply();
        await c.sendOption(OPT_STARTTLS);
        expect((await c.readOptionReply()).type).toBe(REP_ACK);

        const t = await tlsOver(c, alice);
        const go = Buffer.alloc(4 + name.length + 2);
        go.writeUInt32BE(name.length, 0);
        name.copy(go, 4);
        await t.sendOption(OPT_GO, go);
        r = await t.readOptionReply();
        while (r.type !== REP_ACK) {
          expect(r.type & REP_FLAG_ERROR).toBe(0);
          r = await t.readOptionReply();
        }
        // Structured replies were negotiated in plaintext only: a READ gets a simple reply.
        await t.write(RawClient.request({ type: CMD_READ, handle: 7, offset: 0, length: 512 }));
        const head = await t.read(16);
        expect(head.readUInt32BE(0)).toBe(SIMPLE_REPLY_MAGIC);
        expect(head.readUInt32BE(4)).toBe(0);
        await t.read(512);
        // And BLOCK_STATUS has no meta context: EINVAL.
        await t.write(RawClient.request({ type: 7, handle: 8, offset: 0, length: 512 }));
        const bs = await t.readSimpleReply();
        expect(bs).toEqual({ error: 22, handle: 8n });
        t.destroy();
      });
    });

    describe('PSK, TLS required', () => {
      let server: ServerHandle;

      beforeAll(async () => {
        server = await startServer({
          size: SIZE,
          name: 'disk',
          tcp: true,
          extraArgs: ['--tls', 'require', '--tls-psk-file', pki.pskFile, '--verbose'],
        });
      });
      afterAll(async () => {
        if (server) expect(await server.stop()).toBe(0);
      });

      it('nbdinfo and nbdcopy with tls-psk-file; the username names the client', async () => {
        const bob = pki.psk.get('bob')!;
        const r = await runOk('nbdinfo', ['--json', nbdsPsk(server, 'bob', bob.file)]);
        expect((JSON.parse(r.stdout) as { TLS: boolean }).TLS).toBe(true);
        const dir = makeTempDir();
        const out = path.join(dir, 'out.bin');
        await runOk('nbdcopy', [nbdsPsk(server, 'bob', bob.file), out]);
        expect(readFileSync(out).length).toBe(SIZE);
        expect(await logSettled(() => server.stderr(), /TLSv1\.[23] as bob/)).toMatch(
          /TLSv1\.[23] as bob/,
        );
      });

      it('qemu-io and qemu-img with tls-creds-psk', async () => {
        const a = pki.psk.get('alice')!;
        await runOk('qemu-io', [
          '--object',
          qemuPsk(a.dir, 'alice'),
          '--image-opts',
          qemuOpts(server),
          '-c',
          'write -P 0x2e 2M 64k',
          '-c',
          'read -P 0x2e 2M 64k',
        ]);
        const info = await runOk('qemu-img', [
          'info',
          '--object',
          qemuPsk(a.dir, 'alice'),
          '--image-opts',
          qemuOpts(server),
        ]);
        expect(info.stdout).toContain('64 MiB');
      });

      it('a wrong key or an unknown user is refused; others go on', async () => {
        const w = pki.wrongPsk;
        const wrong = await run('nbdinfo', ['--size', nbdsPsk(server, w.user, w.file)]);
        expect(wrong.code, describeRun(wrong)).not.toBe(0);
        const q = await run('qemu-img', [
          'info',
          '--object',
          qemuPsk(w.dir, w.user),
          '--image-opts',
          qemuOpts(server),
        ]);
        expect(q.code, describeRun(q)).not.toBe(0);
        const mallory = path.join(makeTempDir(), 'mallory.psk');
        writeFileSync(mallory, `mallory:${randomBytes(32).toString('hex')}\n`);
        const unknown = await run('nbdinfo', ['--size', nbdsPsk(server, 'mallory', mallory)]);
        expect(unknown.code, describeRun(unknown)).not.toBe(0);
        const ok = await runOk('nbdinfo', [
          '--size',
          nbdsPsk(server, 'alice', pki.psk.get('alice')!.file),
        ]);
        expect(ok.stdout.trim()).toBe(String(SIZE));
      });
    });

    describe('bad TLS settings stop `ballast serve` with a stable code', () => {
      const K = randomBytes(32).toString('hex');
      const serve = (...args: string[]) => {
        const dir = makeTempDir();
        return run(process.execPath, [
          BALLAST_BIN,
          'serve',
          path.join(dir, 'd.img'),
          '--size',
          '1M',
          '--socket',
          path.join(dir, 's.sock'),
          ...args,
        ]);
      };
      const pskFile = (text: string) => {
        const f = path.join(makeTempDir(), 'keys.psk');
        writeFileSync(f, text);
        return f;
      };

      it.each([
        ['require without credentials', ['--tls', 'require'], 'BALLAST_TLS_CONFIG'],
        ['a certificate with --tls off', ['--tls-cert', '/nonexistent.pem'], 'BALLAST_TLS_CONFIG'],
        [
          'a certificate without its key',
          ['--tls', 'allow', '--tls-cert', '/etc/hostname'],
          'BALLAST_TLS_CONFIG',
        ],
        [
          'an unreadable certificate',
          ['--tls', 'allow', '--tls-cert', '/nonexistent.pem', '--tls-key', '/nonexistent.pem'],
          'BALLAST_TLS_CONFIG',
        ],
        [
          'a malformed PSK line',
          () => ['--tls', 'require', '--tls-psk-file', pskFile(`alice:${K}\nbob ${K}\n`)],
          'line 2',
        ],
        [
          'a short PSK key',
          () => ['--tls', 'require', '--tls-psk-file', pskFile('alice:0011\n')],
          'BALLAST_TLS_CONFIG',
        ],
        ['a bad --identity', ['--identity', 'uid:x=root'], 'BALLAST_BAD_IDENTITY'],
        ['an --identity without a name', ['--identity', '127.0.0.1='], 'BALLAST_BAD_IDENTITY'],
      ] as [string, string[] | (() => string[]), string][])('%s', async (_what, args, code) => {
        const r = await serve(...(typeof args === 'function' ? args() : args));
        expect(r.code, describeRun(r)).toBe(1);
        expect(r.stderr, describeRun(r)).toContain(code);
      });

      it('an unknown --tls mode is a usage error', async () => {
        const r = await serve('--tls', 'maybe');
        expect(r.code, describeRun(r)).toBe(2);
      });
    });
  },
);
