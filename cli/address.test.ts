import { describe, expect, it } from 'vitest';
import type { BallastError } from '../agent/errors.js';
import { codeOf } from '../test/helpers/errors.js';
import { parseHostPort } from './address.js';

describe('parseHostPort', () => {
  it.each([
    ['127.0.0.1:10809', '127.0.0.1', 10809],
    ['0.0.0.0:1', '0.0.0.0', 1],
    ['localhost:65535', 'localhost', 65535],
    ['example.com:80', 'example.com', 80],
    ['[::1]:10809', '::1', 10809],
    ['[::]:2000', '::', 2000],
    ['[fe80::1%eth0]:10809', 'fe80::1%eth0', 10809],
    ['[2001:db8::1]', '2001:db8::1', 10809],
    ['10810', '127.0.0.1', 10810],
    [':10811', '127.0.0.1', 10811],
    ['localhost', 'localhost', 10809],
    ['localhost:', 'localhost', 10809],
    ['192.168.1.5', '192.168.1.5', 10809],
    ['0', '127.0.0.1', 0],
  ])('%j → %s port %i', (text, host, port) => {
    expect(parseHostPort(text)).toEqual({ host, port });
  });

  it('uses the given default port', () => {
    expect(parseHostPort('localhost', 1234)).toEqual({ host: 'localhost', port: 1234 });
    expect(parseHostPort('[::1]', 1234)).toEqual({ host: '::1', port: 1234 });
    expect(parseHostPort('localhost:5', 1234)).toEqual({ host: 'localhost', port: 5 });
  });

  it.each([
    ['a port over 65535', '127.0.0.1:65536'],
    ['a huge port', 'host:99999999999'],
    ['a bare port over 65535', '70000'],
    ['a negative port', 'host:-1'],
    ['a port that is not a number', 'host:http'],
    ['a fractional port', 'host:80.5'],
    ['an unbracketed IPv6 address', '::1'],
    ['an unbracketed IPv6 address with a port', '2001:db8::1:80'],
    ['IPv4 in brackets', '[127.0.0.1]:80'],
    ['a name in brackets', '[localhost]:80'],
    ['brackets with an empty port', '[::1]:'],
    ['brackets with junk after', '[::1]x'],
    ['two colons', 'host:80:90'],
  ])('%s (%j) → BALLAST_BAD_ADDRESS', (_what, text) => {
    expect(codeOf(() => parseHostPort(text))).toBe('BALLAST_BAD_ADDRESS');
  });

  it('the message quotes the input and shows the expected form', () => {
    try {
      parseHostPort('host:nope');
      expect.unreachable();
    } catch (e) {
      expect((e as Error).message).toContain('"host:nope"');
      expect((e as Error).message).toContain('HOST:PORT');
    }
  });

  // Ports are decimal digits; Number() also takes exponents, hex, signs and
  // blanks, so these would listen on 1000, 80, 80, 80 and 10.
  it('a port that is not plain decimal digits is refused', () => {
    const accepted: string[] = [];
    for (const text of ['host:1e3', 'host:0x50', 'host:+80', 'host: 80', 'host:0b1010']) {
      try {
        const r = parseHostPort(text);
        accepted.push(`${text} → ${r.host} port ${r.port}`);
      } catch (e) {
        expect((e as BallastError).code).toBe('BALLAST_BAD_ADDRESS');
      }
    }
    expect(accepted).toEqual([]);
  });
});
