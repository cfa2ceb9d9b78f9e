import { Metadata, status } from '@grpc/grpc-js';
import { describe, expect, it } from 'vitest';
import { StoreError } from '../agent/store/store.js';
import {
  CallDeadline,
  hexId,
  Keyspace,
  parseEndpoint,
  parseLeaseId,
  toStoreError,
  WatchCursor,
} from './etcd-wire.js';

/** A call failure as grpc-js reports it. */
function grpcError(code: number, details: string) {
  return Object.assign(new Error(`${code} ${details}`), {
    code,
    details,
    metadata: new Metadata(),
  });
}

describe('toStoreError', () => {
  it("drops grpc-js's empty resolution note and nested Error: prefix", () => {
    const e = toStoreError(
      grpcError(
        status.UNAVAILABLE,
        'No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:2399. Resolution note: ',
      ),
      'etcd range (http://127.0.0.1:2399)',
    );
    expect(e.message).toBe(
      'etcd range (http://127.0.0.1:2399): No connection established. Last error: connect ECONNREFUSED 127.0.0.1:2399',
    );
  });

  const cases: [string, unknown, string, boolean][] = [
    [
      'no leader',
      grpcError(status.UNAVAILABLE, 'etcdserver: no leader'),
      'STORE_UNAVAILABLE',
      true,
    ],
    [
      'connection refused',
      grpcError(status.UNAVAILABLE, 'No connection established. Last error: connect ECONNREFUSED'),
      'STORE_UNAVAILABLE',
      true,
    ],
    [
      "etcd's own request timeout",
      grpcError(status.UNAVAILABLE, 'etcdserver: request timed out'),
      'STORE_UNAVAILABLE',
      true,
    ],
    [
      'leader changed',
      grpcError(status.UNAVAILABLE, 'etcdserver: leader changed'),
      'STORE_UNAVAILABLE',
      true,
    ],
    [
      'gRPC deadline',
      grpcError(status.DEADLINE_EXCEEDED, 'Deadline exceeded'),
      'STORE_TIMEOUT',
      true,
    ],
    ['our deadline', new CallDeadline(2000), 'STORE_TIMEOUT', true],
    ['a cut stream', grpcError(status.CANCELLED, 'Cancelled on client'), 'STORE_UNAVAILABLE', true],
    [
      'compacted',
      grpcError(status.OUT_OF_RANGE, 'etcdserver: mvcc: required revision has been compacted'),
      'STORE_COMPACTED',
      false,
    ],
    [
      'future revision',
      grpcError(status.OUT_OF_RANGE, 'etcdserver: mvcc: required revision is a future revision'),
      'STORE_FUTURE_REVISION',
      false,
    ],
    [
      'lease not found',
      grpcError(status.NOT_FOUND, 'etcdserver: requested lease not found'),
      'STORE_LEASE_NOT_FOUND',
      false,
    ],
    [
      'duplicate key',
      grpcError(status.INVALID_ARGUMENT, 'etcdserver: duplicate key given in txn request'),
      'STORE_INVALID_ARGUMENT',
      false,
    ],
    [
      'too many ops',
      grpcError(status.INVALID_ARGUMENT, 'etcdserver: too many operations in txn request'),
      'STORE_INVALID_ARGUMENT',
      false,
    ],
    [
      'no space',
      grpcError(status.RESOURCE_EXHAUSTED, 'etcdserver: mvcc: database space exceeded'),
      'STORE_IO',
      false,
    ],
    [
      'a message over the limit',
      grpcError(
        status.RESOURCE_EXHAUSTED,
        'grpc: received message larger than max (3145753 vs. 2097152)',
      ),
      'STORE_INVALID_ARGUMENT',
      false,
    ],
    [
      'overload',
      grpcError(status.RESOURCE_EXHAUSTED, 'etcdserver: too many requests'),
      'STORE_UNAVAILABLE',
      true,
    ],
    [
      'permission denied',
      grpcError(status.PERMISSION_DENIED, 'etcdserver: permission denied'),
      'STORE_UNAVAILABLE',
      false,
    ],
    ['anything else', new Error('socket hang up'), 'STORE_UNAVAILABLE', true],
  ];
  it.each(cases)('%s', (_, err, code, retryable) => {
    const e = toStoreError(err, 'etcd range');
    expect(e.code).toBe(code);
    expect(e.retryable).toBe(retryable);
    expect(e.message).toMatch(/^etcd range: /);
    expect(e.cause).toBe(err);
  });

  it('says STORE_CLOSED for whatever a closed store saw, and passes StoreErrors through', () => {
    expect(toStoreError(grpcError(status.CANCELLED, 'Cancelled'), 'x', true).code).toBe(
      'STORE_CLOSED',
    );
    const own = new StoreError('STORE_LEASE_NOT_FOUND', 'gone');
    expect(toStoreError(own, 'x', true)).toBe(own);
  });
});

describe('Keyspace', () => {
  const ks = new Keyspace('/ballast/prod/');

  it('puts every key under the prefix and takes it off again', () => {
    expect(ks.key('devices/a').toString()).toBe('/ballast/prod/devices/a');
    expect(ks.strip(Buffer.from('/ballast/prod/devices/a'))).toBe('devices/a');
    expect(ks.strip(Buffer.from('/ballast/prod/é'))).toBe('é');
  });

  it('bounds every range by the prefix, including the empty one', () => {
    const all = ks.range('');
    expect(all.key.toString()).toBe('/ballast/prod/');
    expect(all.range_end).toEqual(
      Buffer.concat([Buffer.from('/ballast/prod/'), Buffer.from([0xff])]),
    );
    const some = ks.range('dev');
    expect(some.key.toString()).toBe('/ballast/prod/dev');
    // The neighbour prefix sorts after the end: a range never reaches it.
    const neighbour = Buffer.from('/ballast/prod0');
    expect(Buffer.compare(all.range_end, neighbour)).toBeLessThan(0);
    expect(Buffer.compare(Buffer.from('/ballast/prod/\u{10ffff}'), all.range_end)).toBeLessThan(0);
  });

  it('refuses an empty prefix and keys from outside it', () => {
    expect(() => new Keyspace('')).toThrow(
      expect.objectContaining({ code: 'STORE_INVALID_ARGUMENT' }),
    );
    expect(() => ks.strip(Buffer.from('/ballast/test/x'))).toThrow(
      expect.objectContaining({ code: 'STORE_CORRUPT' }),
    );
    expect(() => ks.strip(Buffer.from('/ball'))).toThrow(
      expect.objectContaining({ code: 'STORE_CORRUPT' }),
    );
  });

  it('has a probe key that no store key can be', () => {
    expect(ks.probeKey().toString()).toBe('/ballast/prod/');
  });
});

describe('WatchCursor', () => {
  it('drops what was delivered, resumes after the last delivered revision, never moves back', () => {
    const c = new WatchCursor(10);
    const ev = (revision: number) => ({ revision });
    expect(c.fresh([ev(9), ev(10), ev(10), ev(12)])).toEqual([ev(10), ev(10), ev(12)]);
    c.delivered(12);
    expect(c.next).toBe(13);
    // A re-created watch repeats revision 12: it is not delivered twice.
    expect(c.fresh([ev(12), ev(13)])).toEqual([ev(13)]);
    c.delivered(11);
    expect(c.next).toBe(13);
  });
});

describe('lease ids, member ids, endpoints', () => {
  it('accepts only what can be an etcd lease id', () => {
    expect(parseLeaseId('7587870361347376901')).toBe('7587870361347376901');
    expect(parseLeaseId('9223372036854775807')).toBe('9223372036854775807');
    expect(parseLeaseId('9223372036854775808')).toBeUndefined();
    for (const bad of ['', '0', '-1', '01', 'abc', '1e5', ' 1', 12]) {
      expect(parseLeaseId(bad)).toBeUndefined();
    }
  });

  it('prints member ids as 16 hex digits', () => {
    expect(hexId('10276657743932975437')).toBe('8e9e05c52164694d');
    expect(hexId('1')).toBe('0000000000000001');
    expect(hexId('0')).toBe('');
  });

  it('parses endpoints', () => {
    expect(parseEndpoint('http://127.0.0.1:2379')).toEqual({
      target: '127.0.0.1:2379',
      tls: false,
      url: 'http://127.0.0.1:2379',
    });
    expect(parseEndpoint('https://[::1]:2379')).toMatchObject({ target: '[::1]:2379', tls: true });
    expect(parseEndpoint('127.0.0.1:2379')).toMatchObject({ target: '127.0.0.1:2379', tls: false });
    for (const bad of ['', 'http://127.0.0.1', 'ftp://h:1', 'http://h:1/path', 'http://:x']) {
      expect(() => parseEndpoint(bad)).toThrow(
        expect.objectContaining({ code: 'STORE_INVALID_ARGUMENT' }),
      );
    }
  });
});
