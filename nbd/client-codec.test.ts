import { describe, expect, it } from 'vitest';
import { NbdClientError, parseNbdUri, ReplyReader, type ReplySink } from './client-codec.js';
import {
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

function simple(cookie: number, errno: number, data?: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(errno, 4);
  h.writeUInt32BE(cookie, 12);
  return data ? Buffer.concat([h, data]) : h;
}

function chunk(cookie: number, flags: number, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(cookie, 12);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

/** A sink for one read of 8 bytes at offset 100 (cookie 1) and one write (cookie 2). */
function recorder() {
  const buf = Buffer.alloc(8, 0xee);
  const log: string[] = [];
  const sink: ReplySink = {
    simpleReadLength: (c) => (c === 1 ? 8 : c === 2 ? 0 : c === 3 ? 0 : null),
    readTarget: (c, off) => (c === 1 ? { buf, pos: off < 0 ? 0 : off - 100 } : null),
    hole: (_c, off, len) => {
      buf.fill(0, off - 100, off - 100 + len);
      log.push(`hole ${off} ${len}`);
    },
    blockStatus: (c, ctx, ext) => log.push(`bs ${c} ${ctx} ${[...ext].join(',')}`),
    error: (c, e, m) => log.push(`err ${c} ${e} ${m}`),
    done: (c) => log.push(`done ${c}`),
  };
  return { buf, log, sink };
}

function feedSplit(stream: Buffer, at: number[]) {
  const r = recorder();
  const reader = new ReplyReader(r.sink);
  let prev = 0;
  for (const a of [...at, stream.length]) {
    reader.feed(stream.subarray(prev, a));
    prev = a;
  }
  return r;
}

describe('ReplyReader', () => {
  const off = (o: number, data: Buffer) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(o));
    return Buffer.concat([b, data]);
  };
  const hole = Buffer.alloc(12);
  hole.writeBigUInt64BE(104n);
  hole.writeUInt32BE(4, 8);
  const bs = Buffer.alloc(4 + 16);
  bs.writeUInt32BE(7, 0);
  bs.writeUInt32BE(4096, 4);
  bs.writeUInt32BE(3, 8);
  bs.writeUInt32BE(8192, 12);
  bs.writeUInt32BE(0, 16);
  const errPayload = Buffer.alloc(6 + 3);
  errPayload.writeUInt32BE(28, 0);
  errPayload.writeUInt16BE(3, 4);
  errPayload.write('full', 6);
  const stream = Buffer.concat([
    simple(2, 0),
    chunk(1, 0, REPLY_TYPE.OFFSET_DATA, off(100, Buffer.from('abcd'))),
    chunk(1, 0, REPLY_TYPE.OFFSET_HOLE, hole),
    chunk(3, 0, REPLY_TYPE.BLOCK_STATUS, bs),
    chunk(3, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, errPayload),
    chunk(1, REPLY_FLAG_DONE, REPLY_TYPE.NONE, Buffer.alloc(0)),
    simple(1, 0, Buffer.from('12345678')),
  ]);
  const expected = [
    'done 2',
    'hole 104 4',
    'bs 3 7 4096,3,8192,0',
    'err 3 28 ful',
    'done 3',
    'done 1',
    'done 1',
  ];

  it('parses simple replies and every structured chunk type in one stream', () => {
    const r = feedSplit(stream, []);
    expect(r.log).toEqual(expected);
    expect(r.buf.toString()).toBe('12345678');
  });

  it('gives the same result split at every byte', () => {
    for (let i = 1; i < stream.length; i++) {
      const r = feedSplit(stream, [i]);
      expect(r.log).toEqual(expected);
    }
    const r = feedSplit(
      stream,
      Array.from({ length: stream.length - 1 }, (_, i) => i + 1),
    );
    expect(r.log).toEqual(expected);
  });

  it('structured data and holes land at their offsets', () => {
    const r = feedSplit(
      Buffer.concat([
        chunk(1, 0, REPLY_TYPE.OFFSET_DATA, off(100, Buffer.from('abcd'))),
        chunk(1, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_HOLE, hole),
      ]),
      [],
    );
    expect(r.buf).toEqual(Buffer.from([0x61, 0x62, 0x63, 0x64, 0, 0, 0, 0]));
  });

  it('a bad magic or an unknown cookie is NBD_PROTOCOL', () => {
    const bad = Buffer.alloc(16, 0x55);
    expect(() => feedSplit(bad, [])).toThrow(NbdClientError);
    expect(() => feedSplit(simple(99, 0), [])).toThrow(/unknown cookie/);
  });
});

describe('parseNbdUri', () => {
  it('reads TCP and Unix forms', () => {
    expect(parseNbdUri('nbd://127.0.0.1:10810/dump%20a')).toEqual({
      kind: 'tcp',
      host: '127.0.0.1',
      port: 10810,
      exportName: 'dump a',
    });
    expect(parseNbdUri('nbd://[::1]/')).toEqual({
      kind: 'tcp',
      host: '::1',
      port: 10809,
      exportName: '',
    });
    expect(parseNbdUri('nbd+unix:///dump?socket=/run/b.sock')).toEqual({
      kind: 'unix',
      path: '/run/b.sock',
      exportName: 'dump',
    });
  });
  it('refuses what it cannot use with NBD_BAD_URI', () => {
    expect(parseNbdUri('nbds://localhost/d')).toEqual({
      kind: 'tcp',
      host: 'localhost',
      port: 10809,
      exportName: 'd',
      tls: true,
    });
    expect(parseNbdUri('nbds+unix:///d?socket=/s')).toMatchObject({ kind: 'unix', tls: true });
    for (const u of ['nbd+unix:///x', 'nbds+unix:///x', 'http://x/', 'garbage'])
      expect(() => parseNbdUri(u)).toThrow(expect.objectContaining({ code: 'NBD_BAD_URI' }));
  });
});
