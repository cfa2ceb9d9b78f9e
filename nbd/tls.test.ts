import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { describe, expect, it } from 'vitest';
import { parsePskFile, TlsConfigError, TlsCredentials, tlsReadsInto } from './tls.js';

const K = '00112233445566778899aabbccddeeff';

describe('parsePskFile', () => {
  it('reads username:hexkey lines, skipping blanks and comments', () => {
    const keys = parsePskFile(`# keys\nalice:${K}\n\nbob:${K}${K}\r\n`);
    expect([...keys.keys()]).toEqual(['alice', 'bob']);
    expect(keys.get('alice')!.toString('hex')).toBe(K);
    expect(keys.get('bob')!.length).toBe(32);
  });

  it('a username may contain a colon: the key follows the last one', () => {
    expect(parsePskFile(`host:a:${K}`).has('host:a')).toBe(true);
  });

  it.each([
    ['no colon', `alice${K}`],
    ['no username', `:${K}`],
    ['odd hex', `alice:${K}0`],
    ['not hex', `alice:${K.replace('00', 'zz')}`],
    ['a short key', 'alice:00112233'],
    ['a duplicate user', `alice:${K}\nalice:${K}`],
    ['no keys at all', '# nothing\n'],
  ])('refuses %s', (_what, text) => {
    expect(() => parsePskFile(text)).toThrow(TlsConfigError);
  });

  it('names the line at fault', () => {
    expect(() => parsePskFile(`alice:${K}\nbob:xyz`, 'keys.psk')).toThrow(/keys\.psk line 2/);
  });
});

describe('TlsCredentials', () => {
  it('needs a certificate and key, or PSK keys', () => {
    expect(() => new TlsCredentials({})).toThrow(TlsConfigError);
    expect(() => new TlsCredentials({ cert: 'x' })).toThrow(/both/);
    expect(() => new TlsCredentials({ psk: new Map(), ca: 'x' })).toThrow(/server certificate/);
  });

  it('refuses unreadable PEM with a config error', () => {
    expect(() => new TlsCredentials({ cert: 'not pem', key: 'not pem' })).toThrow(TlsConfigError);
  });

  it('PSK alone is enough', () => {
    const c = new TlsCredentials({ psk: parsePskFile(`alice:${K}`) });
    expect(c.x509).toBe(false);
    expect(c.verifyClients).toBe(false);
  });
});

describe('tlsReadsInto', () => {
  it('decrypted bytes land in the buffers the reader chooses, in order, with no data events', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ballast-tlsreads-'));
    const sockPath = path.join(dir, 's');
    const creds = new TlsCredentials({ psk: parsePskFile(`alice:${K}`) });
    const sent = Buffer.alloc(300_000);
    for (let i = 0; i < sent.length; i++) sent[i] = (i * 7 + (i >> 11)) & 0xff;
    const got = Buffer.alloc(sent.length);
    let at = 0;
    let reads = 0;
    let dataEvents = 0;
    let owned = false;
    // Windows of odd sizes, so records split across them.
    const target = (): Buffer =>
      got.subarray(at, Math.min(sent.length, at + 5_000 + (reads % 7) * 3_001));
    const done = new Promise<void>((resolve, reject) => {
      const server = net.createServer((raw) => {
        const sock = creds.upgrade(raw, () => {}, reject);
        sock.on('data', () => dataEvents++);
        owned = tlsReadsInto(sock, target, (n, buf) => {
          expect(buf.buffer).toBe(got.buffer);
          expect(buf.byteOffset).toBe(at);
          at += n;
          reads++;
          if (at === sent.length) {
            sock.destroy();
            server.close();
            resolve();
          }
        });
      });
      server.listen(sockPath, () => {
        const client = tls.connect({
          path: sockPath,
          maxVersion: 'TLSv1.2',
          ciphers: 'PSK-AES128-GCM-SHA256',
          pskCallback: () => ({ identity: 'alice', psk: Buffer.from(K, 'hex') }),
          checkServerIdentity: () => undefined,
        });
        client.on('error', () => {});
        client.on('secureConnect', () => client.write(sent));
      });
    });
    await done;
    fs.rmSync(dir, { recursive: true, force: true });
    expect(owned).toBe(true);
    expect(dataEvents).toBe(0);
    expect(reads).toBeGreaterThan(20);
    expect(got.equals(sent)).toBe(true);
  });
});
