// An early-reboot dump as stored on the dump device, and how it is read back. Pure
// code (no sockets, no QMP).
//
//   header   "BALSNAP1" | u32 version (1) | u32 JSON length | JSON (SnapshotMeta) |
//            zero padding to a multiple of 4096
//   stream   QEMU's migration stream of a background snapshot, as QEMU wrote it
//
// The header holds what the stream does not say, read over QMP while the guest was
// stopped at the panic: where each RAM block sits in guest-physical memory (the flat
// view of `info mtree -f`) and every CPU's registers (`info registers -a`), which
// become the ELF notes of the core.
//
// The stream (QEMU 7.2, migration/savevm.c and migration/ram.c) is read only as far
// as RAM goes: "QEVM", version 3, the configuration section, then the `ram`
// section's START/PART/END records, each a list of pages: a be64 of page address and
// flags, the block's name unless CONTINUE, then 4096 bytes (PAGE) or one fill byte
// (ZERO), until EOS. A background snapshot writes the device state last, after the
// RAM is complete, as FULL sections: reading stops at the first one. Anything else
// (compressed or XBZRLE pages, other iterable sections) is DUMP_BAD_STREAM: dumpd
// never turns those capabilities on.

import { DumpError } from './catalog.js';

export const SNAP_MAGIC = Buffer.from('BALSNAP1', 'latin1');
export const SNAP_HEADER_VERSION = 1;
const HEADER_ALIGN = 4096;

/** A guest-physical range backed by a RAM block (from the flat view). */
export interface MemRange {
  gpa: number;
  size: number;
  /** The memory region's name, as `info mtree` prints it (pc.ram, pc.bios, ...). */
  region: string;
  /** Offset of `gpa` within the region. */
  offset: number;
}

export interface SegmentRegs {
  selector: number;
  base: string;
  limit: number;
  flags: number;
}

/** One CPU's registers as hex strings (64-bit values do not fit a JSON number). */
export interface CpuRegs {
  regs: Record<string, string>;
  segs: Record<string, SegmentRegs>;
}

export interface SnapshotMeta {
  guest: string;
  qemu: string;
  /** When the guest panicked (or the dump was asked for), ms since the epoch. */
  panicAt: number;
  pageSize: number;
  memory: MemRange[];
  cpus: CpuRegs[];
}

export function encodeSnapshotHeader(meta: SnapshotMeta): Buffer {
  const json = Buffer.from(JSON.stringify(meta), 'utf8');
  const len = Math.ceil((16 + json.length) / HEADER_ALIGN) * HEADER_ALIGN;
  const b = Buffer.alloc(len);
  SNAP_MAGIC.copy(b, 0);
  b.writeUInt32LE(SNAP_HEADER_VERSION, 8);
  b.writeUInt32LE(json.length, 12);
  json.copy(b, 16);
  return b;
}

const badStream = (m: string) => new DumpError('DUMP_BAD_STREAM', m);

/** Pulls bytes from an async sequence of chunks; whole values only, never split. */
export class Pull {
  private buf: Buffer = Buffer.alloc(0);
  private pos = 0;
  /** Bytes consumed so far. */
  consumed = 0;
  constructor(private readonly it: AsyncIterator<Buffer>) {}

  /** Makes `n` bytes available, or throws DUMP_BAD_STREAM at the end of the input. */
  async need(n: number): Promise<void> {
    while (this.buf.length - this.pos < n) {
      const r = await this.it.next();
      if (r.done) throw badStream('the stream ends early (truncated)');
      const rest = this.buf.subarray(this.pos);
      this.buf = rest.length ? Buffer.concat([rest, r.value]) : r.value;
      this.pos = 0;
    }
  }

  /** Takes `n` available bytes (a view, valid until the next need()). */
  take(n: number): Buffer {
    const b = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    this.consumed += n;
    return b;
  }

  async bytes(n: number): Promise<Buffer> {
    await this.need(n);
    return this.take(n);
  }
  async u8(): Promise<number> {
    await this.need(1);
    return this.take(1).readUInt8(0);
  }
  async u16(): Promise<number> {
    await this.need(2);
    return this.take(2).readUInt16BE(0);
  }
  async u32(): Promise<number> {
    await this.need(4);
    return this.take(4).readUInt32BE(0);
  }
  async u64(): Promise<bigint> {
    await this.need(8);
    return this.take(8).readBigUInt64BE(0);
  }
  async peek(): Promise<number> {
    await this.need(1);
    return this.buf.readUInt8(this.pos);
  }
  /** A string of u8 length. */
  async str(): Promise<string> {
    const n = await this.u8();
    return (await this.bytes(n)).toString('latin1');
  }
}

/** Reads the header; the Pull is left at the first byte of the migration stream. */
export async function readSnapshotHeader(p: Pull): Promise<SnapshotMeta> {
  const head = await p.bytes(16);
  if (!head.subarray(0, 8).equals(SNAP_MAGIC)) throw badStream('not an early-reboot dump');
  const v = head.readUInt32LE(8);
  if (v !== SNAP_HEADER_VERSION) throw badStream(`snapshot header version ${v}`);
  const n = head.readUInt32LE(12);
  if (n > 64 * 1024 * 1024) throw badStream('snapshot header too large');
  let meta: SnapshotMeta;
  try {
    meta = JSON.parse((await p.bytes(n)).toString('utf8')) as SnapshotMeta;
  } catch (e) {
    if (e instanceof DumpError) throw e;
    throw badStream('the snapshot header is not JSON');
  }
  const pad = Math.ceil((16 + n) / HEADER_ALIGN) * HEADER_ALIGN - 16 - n;
  if (pad) await p.bytes(pad);
  return meta;
}

// savevm.c section types and ram.c page flags (QEMU 7.2).
const VM_EOF = 0x00;
const SECTION_START = 0x01;
const SECTION_PART = 0x02;
const SECTION_END = 0x03;
const SECTION_FULL = 0x04;
const SUBSECTION = 0x05;
const VM_CONFIGURATION = 0x07;
const VM_COMMAND = 0x08;
const SECTION_FOOTER = 0x7e;
const STREAM_MAGIC = 0x5145564d; // "QEVM"
const STREAM_VERSION = 3;

const F_ZERO = 0x02;
const F_MEM_SIZE = 0x04;
const F_PAGE = 0x08;
const F_EOS = 0x10;
const F_CONTINUE = 0x20;
const F_XBZRLE = 0x40;
const F_HOOK = 0x80;
const F_COMPRESS = 0x100;

export interface RamBlock {
  name: string;
  length: number;
}

export interface StreamSink {
  /** The RAM blocks, once, before any page. */
  blocks(list: RamBlock[]): void;
  /** A page of `block` at `offset`: its bytes (a view: copy to keep), or null for a page of `fill` bytes. */
  page(block: string, offset: number, data: Buffer | null, fill: number): void | Promise<void>;
}

export interface StreamSummary {
  machine: string;
  pages: number;
  zeroPages: number;
}

/** Reads the RAM of a migration stream into `sink`; stops at the device state. */
export async function readMigrationStream(
  p: Pull,
  sink: StreamSink,
  pageSize = 4096,
): Promise<StreamSummary> {
  if ((await p.u32()) !== STREAM_MAGIC) throw badStream('no QEVM magic: not a migration stream');
  const v = await p.u32();
  if (v !== STREAM_VERSION) throw badStream(`migration stream version ${v}, not 3`);
  const out: StreamSummary = { machine: '', pages: 0, zeroPages: 0 };
  let ramSection = -1;
  let last = '';
  let blocksSeen = false;
  const pageMask = BigInt(pageSize - 1);

  const ram = async () => {
    for (;;) {
      const word = await p.u64();
      const flags = Number(word & pageMask);
      const addr = Number(word & ~pageMask);
      if (flags & (F_XBZRLE | F_COMPRESS | F_HOOK))
        throw badStream(`unsupported RAM record (flags 0x${flags.toString(16)})`);
      if (flags & F_MEM_SIZE) {
        // `addr` is the total size of the blocks listed next.
        const total = Number(word & ~BigInt(F_MEM_SIZE));
        const list: RamBlock[] = [];
        let sum = 0;
        while (sum < total) {
          const name = await p.str();
          const length = Number(await p.u64());
          list.push({ name, length });
          sum += length;
        }
        if (sum !== total) throw badStream('RAM block sizes do not add up');
        blocksSeen = true;
        sink.blocks(list);
      }
      if (flags & (F_ZERO | F_PAGE)) {
        if (!blocksSeen) throw badStream('a page before the RAM block list');
        if (!(flags & F_CONTINUE)) last = await p.str();
        if (flags & F_ZERO) {
          const fill = await p.u8();
          out.zeroPages++;
          await sink.page(last, addr, null, fill);
        } else {
          await p.need(pageSize);
          out.pages++;
          await sink.page(last, addr, p.take(pageSize), 0);
        }
      }
      if (flags & F_EOS) return;
    }
  };

  const footer = async (id: number) => {
    if ((await p.peek()) !== SECTION_FOOTER) return;
    await p.u8();
    const f = await p.u32();
    if (f !== id) throw badStream(`section footer ${f} does not match section ${id}`);
  };

  for (;;) {
    const type = await p.u8();
    switch (type) {
      case VM_CONFIGURATION: {
        const n = await p.u32();
        out.machine = (await p.bytes(n)).toString('latin1');
        // Subsections of the configuration (savevm.c): capabilities, page bits, UUID.
        while ((await p.peek()) === SUBSECTION) {
          await p.u8();
          const name = await p.str();
          await p.u32(); // version
          if (name === 'configuration/target-page-bits') await p.u32();
          else if (name === 'configuration/capabilities') {
            const count = await p.u32();
            for (let i = 0; i < count; i++) await p.str();
          } else if (name === 'configuration/uuid') await p.bytes(16);
          else throw badStream(`unknown configuration subsection ${name}`);
        }
        break;
      }
      case SECTION_START:
      case SECTION_FULL: {
        const id = await p.u32();
        const name = await p.str();
        await p.u32(); // instance
        await p.u32(); // version
        if (type === SECTION_FULL) {
          if (!blocksSeen) throw badStream('device state before any RAM');
          return out; // the device state: all RAM has been seen
        }
        if (name !== 'ram') throw badStream(`unsupported iterable section "${name}"`);
        ramSection = id;
        await ram();
        await footer(id);
        break;
      }
      case SECTION_PART:
      case SECTION_END: {
        const id = await p.u32();
        if (id !== ramSection) throw badStream(`data of an unknown section ${id}`);
        await ram();
        await footer(id);
        break;
      }
      case VM_COMMAND: {
        await p.u16();
        await p.bytes(await p.u16());
        break;
      }
      case VM_EOF:
        if (!blocksSeen) throw badStream('the stream ends before any RAM');
        return out;
      default:
        throw badStream(`unknown section type 0x${type.toString(16)} at byte ${p.consumed - 1}`);
    }
  }
}

/**
 * The RAM ranges of the system address space from `info mtree -f`: lines such as
 * `  0000000000000000-000000000009ffff (prio 0, ram): pc.ram` or
 * `  00000000000c0000-00000000000dffff (prio 1, rom): pc.ram @00000000000c0000`
 * in the flat view that AS "memory" uses.
 */
export function parseFlatView(text: string): MemRange[] {
  const out: MemRange[] = [];
  let ases: string[] = [];
  let inView = false;
  for (const line of text.split('\n')) {
    if (/^FlatView #/.test(line)) {
      ases = [];
      inView = false;
      continue;
    }
    const as = /^\s*AS "([^"]+)"/.exec(line);
    if (as) {
      ases.push(as[1] as string);
      inView = ases.includes('memory');
      continue;
    }
    if (!inView) continue;
    const m =
      /^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (ram|rom|romd|ramd)\): (\S+)(?: @([0-9a-f]+))?/.exec(
        line,
      );
    if (!m) continue;
    const start = Number.parseInt(m[1] as string, 16);
    const end = Number.parseInt(m[2] as string, 16);
    out.push({
      gpa: start,
      size: end - start + 1,
      region: m[4] as string,
      offset: m[5] ? Number.parseInt(m[5], 16) : 0,
    });
  }
  return out;
}

/** Every CPU's registers from `info registers -a` (x86: 64-bit and 32-bit forms). */
export function parseRegisters(text: string): CpuRegs[] {
  const cpus: CpuRegs[] = [];
  let cur: CpuRegs | null = null;
  for (const line of text.split('\n')) {
    if (/^CPU#\d+/.test(line)) {
      cur = { regs: {}, segs: {} };
      cpus.push(cur);
      continue;
    }
    if (!cur) {
      // A single CPU prints no CPU# line in some versions.
      if (!/^[RE]AX=/.test(line)) continue;
      cur = { regs: {}, segs: {} };
      cpus.push(cur);
    }
    const seg =
      /^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=([0-9a-f]{4}) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)/.exec(line);
    if (seg) {
      cur.segs[(seg[1] as string).toLowerCase()] = {
        selector: Number.parseInt(seg[2] as string, 16),
        base: (seg[3] as string).padStart(16, '0'),
        limit: Number.parseInt(seg[4] as string, 16),
        flags: Number.parseInt(seg[5] as string, 16),
      };
      continue;
    }
    const table = /^(GDT|IDT)=\s+([0-9a-f]+) ([0-9a-f]+)/.exec(line);
    if (table) {
      cur.segs[(table[1] as string).toLowerCase()] = {
        selector: 0,
        base: (table[2] as string).padStart(16, '0'),
        limit: Number.parseInt(table[3] as string, 16),
        flags: 0,
      };
      continue;
    }
    for (const r of line.matchAll(/\b([A-Z][A-Z0-9]*)\s*=([0-9a-f]+)\b/g)) {
      const name = (r[1] as string).toLowerCase().replace(/^e(ax|bx|cx|dx|si|di|sp|bp|ip)$/, 'r$1');
      if (name === 'fpr0' || name.startsWith('xmm') || name.startsWith('ymm')) continue;
      cur.regs[name === 'rfl' || name === 'efl' ? 'rflags' : name] = (r[2] as string).padStart(
        16,
        '0',
      );
    }
  }
  return cpus.filter((c) => c.regs.rip !== undefined);
}

/**
 * Where each RAM block's bytes go in guest-physical memory: the flat view's regions
 * matched to the stream's blocks by name (a device's block is "PATH/name").
 */
export function mapBlocks(
  memory: readonly MemRange[],
  blocks: readonly RamBlock[],
): Map<string, { offset: number; size: number; gpa: number }[]> {
  const out = new Map<string, { offset: number; size: number; gpa: number }[]>();
  for (const r of memory) {
    const b =
      blocks.find((x) => x.name === r.region) ??
      blocks.find((x) => x.name.endsWith(`/${r.region}`));
    if (!b) continue;
    const size = Math.min(r.size, Math.max(0, b.length - r.offset));
    if (size <= 0) continue;
    const list = out.get(b.name) ?? [];
    list.push({ offset: r.offset, size, gpa: r.gpa });
    out.set(b.name, list);
  }
  return out;
}
