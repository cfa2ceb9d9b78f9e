import { describe, expect, it } from 'vitest';
import { FULL_CAPS } from '../test/helpers/caps.js';
import type { BackendCaps } from './backend.js';
import { transmissionFlags } from './negotiation.js';
import { BLOCK_SIZE_MAX, CMD, CMD_FLAG, NBD_ERR, REQUEST_MAGIC, TFLAG } from './protocol.js';
import { newRequestHeader, parseRequestHeader, type RequestHeader } from './reader.js';
import { type ValidationContext, validateRequest } from './validate.js';

const { EPERM, EINVAL, ENOSPC, EOVERFLOW } = NBD_ERR;
const MiB = 1024 * 1024;
const SIZE = 1024 * MiB;
const MAX = BLOCK_SIZE_MAX;

/** Writable, but advertising none of the optional commands or flags. */
const BARE: BackendCaps = {
  ...FULL_CAPS,
  flush: false,
  fua: false,
  trim: false,
  zero: false,
  fastZero: false,
  cache: false,
};

/** A header as the reader produces it, from the wire bytes (so 64-bit offsets go through the same path). */
function header(type: number, flags: number, offset: bigint, length: number): RequestHeader {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(0x01020304, 8);
  b.writeUInt32BE(0x05060708, 12);
  b.writeBigUInt64BE(offset, 16);
  b.writeUInt32BE(length, 24);
  const h = newRequestHeader();
  parseRequestHeader(b, 0, h);
  return h;
}

interface Ctx {
  readOnly?: boolean;
  structured?: boolean;
  allocation?: boolean;
  caps?: BackendCaps;
  size?: number;
}

function ctx(o: Ctx = {}): ValidationContext {
  const structured = o.structured ?? true;
  return {
    flags: transmissionFlags(o.caps ?? FULL_CAPS, o.readOnly ?? false, structured),
    size: o.size ?? SIZE,
    structured,
    allocationContext: o.allocation ?? structured,
  };
}

function v(
  type: number,
  flags: number,
  offset: number | bigint,
  length: number,
  c: Ctx = {},
): number {
  return validateRequest(header(type, flags, BigInt(offset), length), ctx(c));
}

// ---- an independent statement of the rules --------------------------------------

const KNOWN: number[] = [
  CMD.READ,
  CMD.WRITE,
  CMD.FLUSH,
  CMD.TRIM,
  CMD.CACHE,
  CMD.WRITE_ZEROES,
  CMD.BLOCK_STATUS,
];
const WRITE_SIDE: number[] = [CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES];

/**
 * What the reply must be, from the spec and Ballast's documented choices:
 * unknown command or flag → EINVAL (but write-side on read-only → EPERM);
 * write-side on read-only → EPERM; unadvertised command → EINVAL;
 * FLUSH must have offset = length = 0; BLOCK_STATUS needs base:allocation;
 * length 0 → EINVAL; READ/WRITE over 32 MiB → EINVAL (READ+DF → EOVERFLOW);
 * out of range → ENOSPC for writes, EINVAL otherwise.
 */
function oracle(
  type: number,
  flags: number,
  c: ValidationContext,
  offset: bigint,
  length: number,
): number {
  if (!KNOWN.includes(type)) return EINVAL;
  const f = c.flags;
  const ro = (f & TFLAG.READ_ONLY) !== 0;
  const writeSide = WRITE_SIDE.includes(type);
  const fua = f & TFLAG.SEND_FUA ? CMD_FLAG.FUA : 0;
  let allowed = 0;
  if (type === CMD.READ) allowed = f & TFLAG.SEND_DF ? CMD_FLAG.DF : 0;
  if (type === CMD.WRITE || type === CMD.TRIM) allowed = fua;
  if (type === CMD.WRITE_ZEROES) {
    allowed = fua | CMD_FLAG.NO_HOLE | (f & TFLAG.SEND_FAST_ZERO ? CMD_FLAG.FAST_ZERO : 0);
  }
  if (type === CMD.BLOCK_STATUS) allowed = CMD_FLAG.REQ_ONE;
  if (flags & ~allowed) return ro && writeSide ? EPERM : EINVAL;
  if (ro && writeSide) return EPERM;
  const needs: Record<number, number> = {
    [CMD.FLUSH]: TFLAG.SEND_FLUSH,
    [CMD.TRIM]: TFLAG.SEND_TRIM,
    [CMD.WRITE_ZEROES]: TFLAG.SEND_WRITE_ZEROES,
    [CMD.CACHE]: TFLAG.SEND_CACHE,
  };
  const need = needs[type];
  if (need !== undefined && !(f & need)) return EINVAL;
  if (type === CMD.FLUSH) return offset === 0n && length === 0 ? 0 : EINVAL;
  if (type === CMD.BLOCK_STATUS && !(c.structured && c.allocationContext)) return EINVAL;
  if (length === 0) return EINVAL;
  if ((type === CMD.READ || type === CMD.WRITE) && length > MAX) {
    return type === CMD.READ && flags & CMD_FLAG.DF ? EOVERFLOW : EINVAL;
  }
  if (offset + BigInt(length) > BigInt(c.size)) return writeSide ? ENOSPC : EINVAL;
  return 0;
}

const TWO_64 = 2n ** 64n;
const RANGES: [string, (size: number) => bigint, number][] = [
  ['in range', () => 4096n, 4096],
  ['one byte at 0', () => 0n, 1],
  ['touching the end', (s) => BigInt(s) - 512n, 512],
  ['the whole export', () => 0n, SIZE],
  ['one past the end', (s) => BigInt(s) - 512n, 513],
  ['starting at the end', (s) => BigInt(s), 1],
  ['offset past the end', (s) => BigInt(s) + 4096n, 4096],
  ['offset 2^63', () => 2n ** 63n, 4096],
  ['offset near 2^64', () => TWO_64 - 512n, 512],
  ['offset 2^64 - 1', () => TWO_64 - 1n, 1],
  ['offset 2^53 + 1', () => 2n ** 53n + 1n, 1],
  ['length 0 at 0', () => 0n, 0],
  ['length 0 at the end', (s) => BigInt(s), 0],
  ['length 0 past the end', (s) => BigInt(s) + 1n, 0],
  ['exactly 32 MiB', () => 0n, MAX],
  ['32 MiB + 1', () => 0n, MAX + 1],
  ['64 MiB', () => 4096n, 64 * MiB],
  ['32 MiB + 1, also out of range', (s) => BigInt(s) - 4096n, MAX + 1],
  ['2^32 - 1', () => 0n, 0xffffffff],
];

const FLAGS: [string, number][] = [
  ['none', 0],
  ['FUA', CMD_FLAG.FUA],
  ['NO_HOLE', CMD_FLAG.NO_HOLE],
  ['DF', CMD_FLAG.DF],
  ['REQ_ONE', CMD_FLAG.REQ_ONE],
  ['FAST_ZERO', CMD_FLAG.FAST_ZERO],
  ['PAYLOAD_LEN (not negotiable here)', CMD_FLAG.PAYLOAD_LEN],
  ['unknown bit 6', 1 << 6],
  ['unknown bit 15', 1 << 15],
  ['FUA|NO_HOLE|FAST_ZERO', CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO],
  ['NO_HOLE|FAST_ZERO', CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO],
  ['FUA|unknown', CMD_FLAG.FUA | (1 << 9)],
  ['DF|REQ_ONE', CMD_FLAG.DF | CMD_FLAG.REQ_ONE],
];

const CONTEXTS: [string, Ctx][] = [];
for (const caps of [
  ['full caps', FULL_CAPS],
  ['bare caps', BARE],
] as const) {
  for (const readOnly of [false, true]) {
    for (const [structured, allocation] of [
      [false, false],
      [true, false],
      [true, true],
    ]) {
      for (const size of [SIZE, 4096]) {
        CONTEXTS.push([
          `${caps[0]}, ${readOnly ? 'read-only' : 'writable'}, ${structured ? 'structured' : 'simple'}${allocation ? ' + base:allocation' : ''}, size ${size}`,
          { caps: caps[1], readOnly, structured, allocation, size },
        ]);
      }
    }
  }
}

const COMMANDS: [string, number][] = [
  ['READ', CMD.READ],
  ['WRITE', CMD.WRITE],
  ['FLUSH', CMD.FLUSH],
  ['TRIM', CMD.TRIM],
  ['CACHE', CMD.CACHE],
  ['WRITE_ZEROES', CMD.WRITE_ZEROES],
  ['BLOCK_STATUS', CMD.BLOCK_STATUS],
  ['DISC (handled before validation)', CMD.DISC],
  ['RESIZE (not supported)', CMD.RESIZE],
  ['9', 9],
  ['0x100', 0x100],
  ['0xffff', 0xffff],
];

describe('validateRequest: every command × flags × export × range', () => {
  it.each(COMMANDS)('%s', (_name, type) => {
    const mismatches: string[] = [];
    let checked = 0;
    for (const [cname, c] of CONTEXTS) {
      const vc = ctx(c);
      for (const [fname, flags] of FLAGS) {
        // FUA on commands that do not write is covered by its own test below:
        // the spec says the server MUST accept it once SEND_FUA is advertised.
        if (
          flags & CMD_FLAG.FUA &&
          vc.flags & TFLAG.SEND_FUA &&
          KNOWN.includes(type) &&
          !WRITE_SIDE.includes(type)
        ) {
          continue;
        }
        for (const [rname, off, length] of RANGES) {
          const offset = off(vc.size);
          const got = validateRequest(header(type, flags, offset, length), vc);
          const want = oracle(type, flags, vc, offset, length);
          checked++;
          if (got !== want)
            mismatches.push(`${cname} / ${fname} / ${rname}: got ${got}, want ${want}`);
        }
      }
    }
    expect(checked).toBeGreaterThan(1000);
    expect(mismatches).toEqual([]);
  });
});

// ---- the same rules, case by case -----------------------------------------------

describe('validateRequest: named cases', () => {
  it.each([
    ['READ in range', CMD.READ, 0, 0, 4096, 0],
    ['WRITE in range', CMD.WRITE, 0, 4096, 4096, 0],
    ['WRITE with FUA', CMD.WRITE, CMD_FLAG.FUA, 0, 512, 0],
    ['TRIM with FUA', CMD.TRIM, CMD_FLAG.FUA, 0, 512, 0],
    ['WRITE_ZEROES with every flag it may carry', CMD.WRITE_ZEROES, 0x13, 0, 512, 0],
    ['READ with DF (structured)', CMD.READ, CMD_FLAG.DF, 0, 512, 0],
    ['BLOCK_STATUS with REQ_ONE', CMD.BLOCK_STATUS, CMD_FLAG.REQ_ONE, 0, SIZE, 0],
    ['FLUSH', CMD.FLUSH, 0, 0, 0, 0],
    ['CACHE', CMD.CACHE, 0, 0, 4096, 0],
    ['READ touching the end', CMD.READ, 0, SIZE - 4096, 4096, 0],
    ['READ one past the end', CMD.READ, 0, SIZE - 4096, 4097, EINVAL],
    ['WRITE one past the end', CMD.WRITE, 0, SIZE - 4096, 4097, ENOSPC],
    ['TRIM one past the end', CMD.TRIM, 0, SIZE - 4096, 4097, ENOSPC],
    ['WRITE_ZEROES past the end', CMD.WRITE_ZEROES, 0, SIZE, 1, ENOSPC],
    ['CACHE past the end', CMD.CACHE, 0, SIZE, 1, EINVAL],
    ['BLOCK_STATUS past the end', CMD.BLOCK_STATUS, 0, SIZE + 1, 1, EINVAL],
    ['READ at 2^64 - 512', CMD.READ, 0, TWO_64 - 512n, 512, EINVAL],
    ['WRITE at 2^64 - 512', CMD.WRITE, 0, TWO_64 - 512n, 512, ENOSPC],
    ['READ length 0', CMD.READ, 0, 0, 0, EINVAL],
    ['WRITE length 0', CMD.WRITE, 0, 0, 0, EINVAL],
    ['TRIM length 0', CMD.TRIM, 0, 0, 0, EINVAL],
    ['READ of 32 MiB', CMD.READ, 0, 0, MAX, 0],
    ['READ over 32 MiB', CMD.READ, 0, 0, MAX + 1, EINVAL],
    ['READ over 32 MiB with DF', CMD.READ, CMD_FLAG.DF, 0, MAX + 1, EOVERFLOW],
    ['WRITE over 32 MiB', CMD.WRITE, 0, 0, MAX + 1, EINVAL],
    ['READ over 32 MiB and out of range: too big first', CMD.READ, 0, SIZE - 512, MAX + 1, EINVAL],
    ['WRITE over 32 MiB and out of range: too big first', CMD.WRITE, 0, SIZE, MAX + 1, EINVAL],
    ['TRIM over 32 MiB', CMD.TRIM, 0, 0, 64 * MiB, 0],
    ['WRITE_ZEROES over 32 MiB', CMD.WRITE_ZEROES, 0, 0, SIZE, 0],
    ['CACHE over 32 MiB', CMD.CACHE, 0, 0, 64 * MiB, 0],
    [
      'BLOCK_STATUS over 32 MiB and past the end',
      CMD.BLOCK_STATUS,
      0,
      0,
      0xffffffff - 0xffff,
      EINVAL,
    ],
    ['BLOCK_STATUS of the whole export', CMD.BLOCK_STATUS, 0, 0, SIZE, 0],
    ['FLUSH with an offset', CMD.FLUSH, 0, 4096, 0, EINVAL],
    ['FLUSH with a length', CMD.FLUSH, 0, 0, 1, EINVAL],
    ['DISC', CMD.DISC, 0, 0, 0, EINVAL],
    ['RESIZE', CMD.RESIZE, 0, 0, 0, EINVAL],
    ['type 0xffff', 0xffff, 0, 0, 4096, EINVAL],
    ['READ with NO_HOLE', CMD.READ, CMD_FLAG.NO_HOLE, 0, 512, EINVAL],
    ['READ with REQ_ONE', CMD.READ, CMD_FLAG.REQ_ONE, 0, 512, EINVAL],
    ['WRITE with DF', CMD.WRITE, CMD_FLAG.DF, 0, 512, EINVAL],
    ['WRITE with NO_HOLE', CMD.WRITE, CMD_FLAG.NO_HOLE, 0, 512, EINVAL],
    ['TRIM with FAST_ZERO', CMD.TRIM, CMD_FLAG.FAST_ZERO, 0, 512, EINVAL],
    ['BLOCK_STATUS with DF', CMD.BLOCK_STATUS, CMD_FLAG.DF, 0, 512, EINVAL],
    ['WRITE_ZEROES with REQ_ONE', CMD.WRITE_ZEROES, CMD_FLAG.REQ_ONE, 0, 512, EINVAL],
    ['FLUSH with an unknown flag', CMD.FLUSH, 1 << 7, 0, 0, EINVAL],
    ['WRITE with an unknown flag', CMD.WRITE, 1 << 7, 0, 512, EINVAL],
    [
      'WRITE with PAYLOAD_LEN (no extended headers)',
      CMD.WRITE,
      CMD_FLAG.PAYLOAD_LEN,
      0,
      512,
      EINVAL,
    ],
  ] as [string, number, number, number | bigint, number, number][])(
    '%s (full caps, structured, base:allocation)',
    (_name, type, flags, offset, length, want) => {
      expect(v(type, flags, offset, length)).toBe(want);
    },
  );

  it('READ with DF when structured replies were not negotiated: EINVAL', () => {
    expect(v(CMD.READ, CMD_FLAG.DF, 0, 512, { structured: false })).toBe(EINVAL);
    expect(v(CMD.READ, CMD_FLAG.DF, 0, MAX + 1, { structured: false })).toBe(EINVAL);
  });

  it('BLOCK_STATUS without the allocation context: EINVAL', () => {
    expect(v(CMD.BLOCK_STATUS, 0, 0, 4096, { structured: true, allocation: false })).toBe(EINVAL);
    expect(v(CMD.BLOCK_STATUS, 0, 0, 4096, { structured: false, allocation: false })).toBe(EINVAL);
    // allocationContext without structured replies cannot be answered either.
    expect(v(CMD.BLOCK_STATUS, 0, 0, 4096, { structured: false, allocation: true })).toBe(EINVAL);
    expect(v(CMD.BLOCK_STATUS, 0, 0, 4096, { structured: true, allocation: true })).toBe(0);
  });

  it.each([
    ['WRITE', CMD.WRITE, 0],
    ['WRITE with FUA', CMD.WRITE, CMD_FLAG.FUA],
    ['TRIM', CMD.TRIM, 0],
    ['WRITE_ZEROES', CMD.WRITE_ZEROES, 0],
    ['WRITE_ZEROES with NO_HOLE', CMD.WRITE_ZEROES, CMD_FLAG.NO_HOLE],
    ['WRITE_ZEROES with FAST_ZERO', CMD.WRITE_ZEROES, CMD_FLAG.FAST_ZERO],
    ['WRITE with an unknown flag', CMD.WRITE, 1 << 12],
  ])('%s on a read-only export: EPERM, even out of range or empty', (_name, type, flags) => {
    for (const ro of [{ readOnly: true }, { caps: { ...FULL_CAPS, write: false } }]) {
      expect(v(type, flags, 0, 4096, ro)).toBe(EPERM);
      expect(v(type, flags, SIZE, 4096, ro)).toBe(EPERM);
      expect(v(type, flags, 0, 0, ro)).toBe(EPERM);
    }
  });

  it('reads on a read-only export work', () => {
    expect(v(CMD.READ, 0, 0, 4096, { readOnly: true })).toBe(0);
    expect(v(CMD.CACHE, 0, 0, 4096, { readOnly: true })).toBe(0);
    expect(v(CMD.BLOCK_STATUS, 0, 0, 4096, { readOnly: true })).toBe(0);
    // FLUSH is not advertised on a read-only export.
    expect(v(CMD.FLUSH, 0, 0, 0, { readOnly: true })).toBe(EINVAL);
  });

  it.each([
    ['FLUSH', CMD.FLUSH, 0, 0, 0],
    ['TRIM', CMD.TRIM, 0, 0, 4096],
    ['WRITE_ZEROES', CMD.WRITE_ZEROES, 0, 0, 4096],
    ['CACHE', CMD.CACHE, 0, 0, 4096],
    ['WRITE with FUA', CMD.WRITE, CMD_FLAG.FUA, 0, 4096],
    ['TRIM with FUA', CMD.TRIM, CMD_FLAG.FUA, 0, 4096],
  ])('%s not advertised: EINVAL', (_name, type, flags, offset, length) => {
    expect(v(type, flags, offset, length, { caps: BARE })).toBe(EINVAL);
    expect(v(type, flags, offset, length)).toBe(0);
  });

  it('FAST_ZERO needs SEND_FAST_ZERO', () => {
    const noFast = { caps: { ...FULL_CAPS, fastZero: false } };
    expect(v(CMD.WRITE_ZEROES, CMD_FLAG.FAST_ZERO, 0, 4096, noFast)).toBe(EINVAL);
    expect(v(CMD.WRITE_ZEROES, CMD_FLAG.NO_HOLE, 0, 4096, noFast)).toBe(0);
    expect(v(CMD.WRITE_ZEROES, CMD_FLAG.FAST_ZERO, 0, 4096)).toBe(0);
  });

  it('FUA needs SEND_FUA', () => {
    const noFua = { caps: { ...FULL_CAPS, fua: false } };
    expect(v(CMD.WRITE, CMD_FLAG.FUA, 0, 4096, noFua)).toBe(EINVAL);
    expect(v(CMD.TRIM, CMD_FLAG.FUA, 0, 4096, noFua)).toBe(EINVAL);
    expect(v(CMD.WRITE_ZEROES, CMD_FLAG.FUA, 0, 4096, noFua)).toBe(EINVAL);
    expect(v(CMD.READ, CMD_FLAG.FUA, 0, 4096, noFua)).toBe(EINVAL);
    expect(v(CMD.WRITE, 0, 0, 4096, noFua)).toBe(0);
  });

  it('an empty export: nothing is in range', () => {
    expect(v(CMD.READ, 0, 0, 1, { size: 0 })).toBe(EINVAL);
    expect(v(CMD.WRITE, 0, 0, 1, { size: 0 })).toBe(ENOSPC);
    expect(v(CMD.FLUSH, 0, 0, 0, { size: 0 })).toBe(0);
  });

  it('an export of 2^53 - 1 bytes: the last byte is in range, the next is not', () => {
    const size = Number.MAX_SAFE_INTEGER;
    expect(v(CMD.READ, 0, BigInt(size) - 1n, 1, { size })).toBe(0);
    expect(v(CMD.READ, 0, BigInt(size), 1, { size })).toBe(EINVAL);
    expect(v(CMD.WRITE, 0, BigInt(size) - 4096n, 4097, { size })).toBe(ENOSPC);
  });

  // NBD spec, "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands,
  // provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server
  // MUST accept all commands with this bit set (even by ignoring the bit)".
  // Existing clients (older qemu) send FLUSH with FUA.
  it('FUA is accepted on every command when SEND_FUA was advertised', () => {
    const refused: string[] = [];
    for (const [name, type, length] of [
      ['READ', CMD.READ, 4096],
      ['FLUSH', CMD.FLUSH, 0],
      ['CACHE', CMD.CACHE, 4096],
      ['BLOCK_STATUS', CMD.BLOCK_STATUS, 4096],
    ] as const) {
      const err = v(type, CMD_FLAG.FUA, 0, length);
      if (err !== 0) refused.push(`${name}+FUA → ${err}`);
    }
    expect(refused).toEqual([]);
  });

  it('never mutates the header', () => {
    const h = header(CMD.WRITE, CMD_FLAG.FUA, 4096n, 512);
    const copy = { ...h };
    validateRequest(h, ctx());
    expect(h).toEqual(copy);
  });
});
