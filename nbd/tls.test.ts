import { describe, expect, it } from 'vitest';
import { parsePskFile, TlsConfigError, TlsCredentials } from './tls.js';

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
