import { availableParallelism } from 'node:os';
import { describe, expect, it } from 'vitest';
import { isLoopback, validateConfig } from './config.js';
import { BallastError } from './errors.js';

function problem(doc: unknown): string {
  try {
    validateConfig(doc, 'agent.yaml');
  } catch (e) {
    expect(e).toBeInstanceOf(BallastError);
    expect((e as BallastError).code).toBe('BALLAST_CONFIG_INVALID');
    return (e as Error).message;
  }
  throw new Error('the config was accepted');
}

describe('agent config', () => {
  it('runs on safe defaults: NBD on the socket only, the TCP API behind the token', () => {
    const c = validateConfig(undefined, '(defaults)', '/tmp/d');
    expect(c.dataDir).toBe('/tmp/d');
    expect(c.pools).toEqual([{ name: 'default', path: '/tmp/d/pools/default', overcommit: 1 }]);
    expect(c.nbd).toMatchObject({
      listen: [],
      socket: '/run/ballast/nbd.sock',
      handshakeTimeoutMs: 10_000,
      maxHandshakes: 64,
      maxPerSource: 0,
      anonymous: 'unix',
      socketGroup: 'kvm',
      socketGroupConfigured: false,
      socketMode: 0o660,
    });
    expect(c.socketDirMode).toBe(0o755);
    expect(c.api).toMatchObject({
      listen: ['127.0.0.1:10810'],
      socket: '/run/ballast/api.sock',
      tokenFile: '/tmp/d/api-token',
      socketGroup: null,
      socketMode: 0o600,
      requireToken: true,
      maxConnections: 128,
      headersTimeoutMs: 10_000,
      requestTimeoutMs: 30_000,
    });
  });

  it('reads the connection limits; 0 means no handshake deadline', () => {
    const c = validateConfig(
      {
        nbd: { handshakeLimit: 0, maxHandshakes: 8, maxPerSource: 4, anonymous: 'any' },
        api: { maxConnections: 16, headersTimeout: 2, requestTimeout: 5 },
      },
      'x',
    );
    expect(c.nbd).toMatchObject({
      handshakeTimeoutMs: 0,
      maxHandshakes: 8,
      maxPerSource: 4,
      anonymous: 'any',
    });
    expect(c.api).toMatchObject({
      maxConnections: 16,
      headersTimeoutMs: 2000,
      requestTimeoutMs: 5000,
    });
    // The former name still reads.
    expect(validateConfig({ nbd: { handshakeTimeout: 3 } }, 'x').nbd.handshakeTimeoutMs).toBe(3000);
    expect(problem({ nbd: { handshakeLimit: 1, handshakeTimeout: 1 } })).toMatch(/give only one/);
    expect(problem({ nbd: { anonymous: 'yes' } })).toMatch(/nbd\.anonymous: must be unix, any/);
    expect(problem({ nbd: { handshakeLimit: -1 } })).toMatch(/nbd\.handshakeLimit/);
    expect(validateConfig({ nbd: { socketGroup: null } }, 'x').nbd.socketGroup).toBeNull();
  });

  it('reads socket modes and groups as octal, whether YAML saw a string or a number', () => {
    const c = validateConfig(
      {
        nbd: { socketGroup: 'libvirt', socketMode: '0640' },
        api: { socketGroup: 'ballast' },
        socketDirMode: 750,
      },
      'x',
    );
    expect(c.nbd).toMatchObject({ socketGroup: 'libvirt', socketMode: 0o640 });
    expect(c.api).toMatchObject({ socketGroup: 'ballast', socketMode: 0o660 });
    expect(c.socketDirMode).toBe(0o750);
    expect(validateConfig({ nbd: { socketGroup: null } }, 'x').nbd.socketMode).toBe(0o600);
    expect(validateConfig({ api: { socketMode: '0o640' } }, 'x').api.socketMode).toBe(0o640);
    expect(problem({ nbd: { socketMode: '0666' } })).toMatch(
      /nbd\.socketMode: must not let every user write/,
    );
    expect(problem({ nbd: { socketMode: '0060' } })).toMatch(/owner \(root\) read and write/);
    expect(problem({ api: { socketMode: 'rw' } })).toMatch(
      /api\.socketMode: must be an octal mode/,
    );
    expect(problem({ socketDirMode: 999 })).toMatch(/socketDirMode: must be an octal mode/);
  });

  it('nbd.workers: the cores available by default (auto), 1 for one event loop, a whole number', () => {
    expect(validateConfig(undefined, 'x', '/tmp/d').nbd.workers).toBe(availableParallelism());
    expect(validateConfig({ nbd: { workers: 'auto' } }, 'x').nbd.workers).toBe(
      availableParallelism(),
    );
    expect(validateConfig({ nbd: { workers: 1 } }, 'x').nbd.workers).toBe(1);
    expect(validateConfig({ nbd: { workers: 8 } }, 'x').nbd.workers).toBe(8);
    expect(problem({ nbd: { workers: 0 } })).toMatch(/nbd\.workers/);
    expect(problem({ nbd: { workers: 'many' } })).toMatch(/nbd\.workers/);
  });

  it('reads the shape ops scripts rely on', () => {
    const c = validateConfig(
      {
        nbd: { listen: '127.0.0.1:10809', socket: '/run/ballast/nbd.sock' },
        api: { listen: '127.0.0.1:10810', socket: '/run/ballast/api.sock' },
        pools: [
          { name: 'fast', path: '/srv/ballast/fast' },
          { name: 'bulk', path: '/srv/ballast/bulk', media: 'hdd', quota: '2T', overcommit: 4.0 },
        ],
      },
      'agent.yaml',
    );
    expect(c.pools).toEqual([
      { name: 'fast', path: '/srv/ballast/fast', overcommit: 1 },
      {
        name: 'bulk',
        path: '/srv/ballast/bulk',
        media: 'hdd',
        quota: 2 * 1024 ** 4,
        overcommit: 4,
      },
    ]);
  });

  it('demands the token on every TCP listener unless told otherwise on loopback', () => {
    expect(validateConfig({ api: { requireToken: false } }, 'x').api.requireToken).toBe(false);
    expect(
      validateConfig({ api: { listen: '0.0.0.0:10810', requireToken: false } }, 'x').api
        .requireToken,
    ).toBe(true);
    expect(validateConfig({ api: { listen: '0.0.0.0:10810' } }, 'x').api.requireToken).toBe(true);
    expect(
      validateConfig({ api: { listen: '[::1]:10810', requireToken: false } }, 'x').api.requireToken,
    ).toBe(false);
    expect(validateConfig({ api: { requireToken: true } }, 'x').api.requireToken).toBe(true);
    expect(isLoopback('127.0.0.1:1')).toBe(true);
    expect(isLoopback('[::1]:1')).toBe(true);
    expect(isLoopback('10.0.0.1:1')).toBe(false);
    expect(isLoopback(':10810')).toBe(true);
    expect(isLoopback('0.0.0.0:10810')).toBe(false);
  });

  it('names the key and the problem', () => {
    expect(problem({ pools: [] })).toMatch(/agent\.yaml: pools: must be a non-empty list/);
    expect(problem({ pools: [{ name: 'a' }] })).toMatch(/pools\[0\]\.path: must be a non-empty/);
    expect(problem({ pools: [{ name: 'a', path: 'rel' }] })).toMatch(
      /pools\[0\]\.path: must be an absolute path/,
    );
    expect(
      problem({
        pools: [
          { name: 'a', path: '/a' },
          { name: 'a', path: '/b' },
        ],
      }),
    ).toMatch(/pools\[1\]\.name: pool "a" is defined twice/);
    expect(
      problem({
        pools: [
          { name: 'a', path: '/a' },
          { name: 'b', path: '/a/' },
        ],
      }),
    ).toMatch(/pools\[1\]\.path: \/a is used by another pool/);
    expect(problem({ pools: [{ name: 'a', path: '/a', media: 'tape' }] })).toMatch(
      /pools\[0\]\.media: must be one of ssd, hdd, nvme/,
    );
    expect(problem({ pools: [{ name: 'a', path: '/a', quota: '2X' }] })).toMatch(
      /pools\[0\]\.quota: bad size/,
    );
    expect(problem({ pools: [{ name: 'a', path: '/a', overcommit: 0 }] })).toMatch(
      /pools\[0\]\.overcommit: must be a number from 0.01 to 1000/,
    );
    expect(problem({ nbd: { listen: 'localhost' } })).toMatch(/nbd\.listen: must be HOST:PORT/);
    expect(problem({ nbd: { listen: ['127.0.0.1:1', '1.2.3.4:99999'] } })).toMatch(
      /nbd\.listen\[1\]: must be HOST:PORT/,
    );
    expect(problem({ api: { token: 'short' } })).toMatch(/api\.token: must be at least 16/);
    expect(problem({ api: { requireToken: 'yes' } })).toMatch(/api\.requireToken: must be true/);
    expect(problem({ pool: [] })).toMatch(/pool: unknown key/);
    expect(problem({ limits: { maxInFlight: 0 } })).toMatch(
      /limits\.maxInFlight: must be a number/,
    );
    expect(problem([1, 2])).toMatch(/\(top level\): must be a mapping/);
  });
});
