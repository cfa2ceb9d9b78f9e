// Turning an early-reboot dump (migration.ts) into the files crash tools read:
//
//   ELF core  like QEMU's `dump-guest-memory` with paging off: an ELF64 ET_CORE for
//             x86-64, one PT_NOTE with an NT_PRSTATUS ("CORE") and a QEMUCPUState
//             ("QEMU") note per CPU, then one PT_LOAD per RAM range of the flat view
//             (p_paddr = guest-physical address, p_vaddr 0), in address order.
//   kdump     makedumpfile's compressed format as QEMU writes it for kdump-zlib
//             (header version 6, block = page, two equal bitmaps, one descriptor per
//             page, zero pages sharing one, other pages zlib-compressed when that is
//             smaller), made from the ELF core.
//
// Pages arrive in the stream's order (the background snapshot sends the pages the
// rebooted guest is about to write first), so the ELF is written with positional
// writes into a file sized first; zero pages stay holes.

import { ftruncateSync, readSync, writeSync } from 'node:fs';
import { deflateSync } from 'node:zlib';
import { DumpError } from './catalog.js';
import {
  type CpuRegs,
  mapBlocks,
  type Pull,
  type RamBlock,
  readMigrationStream,
  type SnapshotMeta,
} from './migration.js';

const EHDR = 64;
const PHDR = 56;
const PT_LOAD = 1;
const PT_NOTE = 4;
const EM_X86_64 = 62;
const ET_CORE = 4;
const NT_PRSTATUS = 1;
const PRSTATUS_SIZE = 336;
const QEMU_CPUSTATE_SIZE = 440;

const hex = (s: string | undefined) => BigInt(`0x${s ?? '0'}`);

function note(name: string, type: number, desc: Buffer): Buffer {
  const nameBytes = Buffer.from(`${name}\0`, 'latin1');
  const pad4 = (n: number) => Math.ceil(n / 4) * 4;
  const b = Buffer.alloc(12 + pad4(nameBytes.length) + pad4(desc.length));
  b.writeUInt32LE(nameBytes.length, 0);
  b.writeUInt32LE(desc.length, 4);
  b.writeUInt32LE(type, 8);
  nameBytes.copy(b, 12);
  desc.copy(b, 12 + pad4(nameBytes.length));
  return b;
}

/** The NT_PRSTATUS of one CPU (x86-64 elf_prstatus: pid at 32, user_regs_struct at 112). */
function prstatus(c: CpuRegs, index: number): Buffer {
  const b = Buffer.alloc(PRSTATUS_SIZE);
  b.writeUInt32LE(index + 1, 32);
  const r = c.regs;
  const sel = (s: string) => BigInt(c.segs[s]?.selector ?? 0);
  const base = (s: string) => hex(c.segs[s]?.base);
  const regs: bigint[] = [
    hex(r.r15),
    hex(r.r14),
    hex(r.r13),
    hex(r.r12),
    hex(r.rbp),
    hex(r.rbx),
    hex(r.r11),
    hex(r.r10),
    hex(r.r9),
    hex(r.r8),
    hex(r.rax),
    hex(r.rcx),
    hex(r.rdx),
    hex(r.rsi),
    hex(r.rdi),
    0n, // orig_rax: not known for a panic
    hex(r.rip),
    sel('cs'),
    hex(r.rflags),
    hex(r.rsp),
    sel('ss'),
    base('fs'),
    base('gs'),
    sel('ds'),
    sel('es'),
    sel('fs'),
    sel('gs'),
  ];
  regs.forEach((v, i) => {
    b.writeBigUInt64LE(BigInt.asUintN(64, v), 112 + i * 8);
  });
  return b;
}

/** QEMU's own per-CPU note (QEMUCPUState, version 1), which crash's QEMU support reads. */
function qemuCpuState(c: CpuRegs): Buffer {
  const b = Buffer.alloc(QEMU_CPUSTATE_SIZE);
  b.writeUInt32LE(1, 0);
  b.writeUInt32LE(QEMU_CPUSTATE_SIZE, 4);
  let p = 8;
  const r = c.regs;
  for (const n of [
    'rax',
    'rbx',
    'rcx',
    'rdx',
    'rsi',
    'rdi',
    'rsp',
    'rbp',
    'r8',
    'r9',
    'r10',
    'r11',
    'r12',
    'r13',
    'r14',
    'r15',
    'rip',
    'rflags',
  ]) {
    b.writeBigUInt64LE(BigInt.asUintN(64, hex(r[n])), p);
    p += 8;
  }
  for (const s of ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'ldt', 'tr', 'gdt', 'idt']) {
    const g = c.segs[s];
    b.writeUInt32LE(g?.selector ?? 0, p);
    b.writeUInt32LE(g?.limit ?? 0, p + 4);
    b.writeUInt32LE(g?.flags ?? 0, p + 8);
    b.writeBigUInt64LE(BigInt.asUintN(64, hex(g?.base)), p + 16);
    p += 24;
  }
  for (const n of ['cr0', 'cr1', 'cr2', 'cr3', 'cr4']) {
    b.writeBigUInt64LE(BigInt.asUintN(64, hex(r[n])), p);
    p += 8;
  }
  return b;
}

export function elfNotes(cpus: readonly CpuRegs[]): Buffer {
  const parts: Buffer[] = [];
  cpus.forEach((c, i) => {
    parts.push(note('CORE', NT_PRSTATUS, prstatus(c, i)));
  });
  for (const c of cpus) parts.push(note('QEMU', 0, qemuCpuState(c)));
  return Buffer.concat(parts);
}

export interface Load {
  gpa: number;
  size: number;
  fileOffset: number;
}

/** ELF header, program headers and notes for `loads` (sorted, non-overlapping). */
export function elfLayout(
  ranges: readonly { gpa: number; size: number }[],
  cpus: readonly CpuRegs[],
): { head: Buffer; loads: Load[]; fileSize: number } {
  const notes = elfNotes(cpus);
  const sorted = [...ranges].sort((a, b) => a.gpa - b.gpa);
  const phnum = 1 + sorted.length;
  const notesAt = EHDR + phnum * PHDR;
  let pos = Math.ceil((notesAt + notes.length) / 4096) * 4096;
  const loads: Load[] = sorted.map((r) => {
    const l = { gpa: r.gpa, size: r.size, fileOffset: pos };
    pos += r.size;
    return l;
  });
  const head = Buffer.alloc(notesAt + notes.length);
  head.write('\x7fELF', 0, 'latin1');
  head[4] = 2; // ELFCLASS64
  head[5] = 1; // little-endian
  head[6] = 1; // EV_CURRENT
  head.writeUInt16LE(ET_CORE, 16);
  head.writeUInt16LE(EM_X86_64, 18);
  head.writeUInt32LE(1, 20);
  head.writeBigUInt64LE(BigInt(EHDR), 32); // e_phoff
  head.writeUInt16LE(EHDR, 52);
  head.writeUInt16LE(PHDR, 54);
  head.writeUInt16LE(phnum, 56);
  const ph = (i: number, type: number, off: number, paddr: number, size: number) => {
    const p = EHDR + i * PHDR;
    head.writeUInt32LE(type, p);
    head.writeBigUInt64LE(BigInt(off), p + 8);
    head.writeBigUInt64LE(BigInt(paddr), p + 24);
    head.writeBigUInt64LE(BigInt(size), p + 32);
    head.writeBigUInt64LE(BigInt(size), p + 40);
  };
  ph(0, PT_NOTE, notesAt, 0, notes.length);
  loads.forEach((l, i) => {
    ph(i + 1, PT_LOAD, l.fileOffset, l.gpa, l.size);
  });
  notes.copy(head, notesAt);
  return { head, loads, fileSize: pos };
}

/**
 * Writes the ELF core of an early-reboot dump into `fd` from its stream (the Pull left
 * after the header). Returns what the stream held.
 */
export async function writeElfFromStream(
  p: Pull,
  meta: SnapshotMeta,
  fd: number,
): Promise<{ pages: number; zeroPages: number; bytes: number }> {
  const pageSize = meta.pageSize;
  let loads: Load[] = [];
  let byBlock = new Map<string, { offset: number; size: number; fileOffset: number }[]>();
  let written = new Uint8Array(0);
  const zero = Buffer.alloc(pageSize);
  // Consecutive pages are gathered into one write.
  let runAt = -1;
  let runLen = 0;
  const run = Buffer.allocUnsafe(1024 * 1024);
  const flush = () => {
    if (runLen) writeSync(fd, run, 0, runLen, runAt);
    runLen = 0;
    runAt = -1;
  };
  const put = (at: number, data: Buffer) => {
    if (runAt >= 0 && at === runAt + runLen && runLen + data.length <= run.length) {
      data.copy(run, runLen);
      runLen += data.length;
      return;
    }
    flush();
    runAt = at;
    data.copy(run, 0);
    runLen = data.length;
  };
  let fileSize = 0;
  const summary = await readMigrationStream(
    p,
    {
      blocks(list: RamBlock[]) {
        const map = mapBlocks(meta.memory, list);
        const ranges = [...map.values()].flat();
        if (!ranges.length)
          throw new DumpError(
            'DUMP_BAD_STREAM',
            `no RAM block of the stream (${list.map((b) => b.name).join(', ')}) is in the guest's memory map`,
          );
        const lay = elfLayout(ranges, meta.cpus);
        loads = lay.loads;
        fileSize = lay.fileSize;
        byBlock = new Map();
        for (const [name, rs] of map)
          byBlock.set(
            name,
            rs.map((r) => ({
              offset: r.offset,
              size: r.size,
              fileOffset: (loads.find((l) => l.gpa === r.gpa) as Load).fileOffset,
            })),
          );
        written = new Uint8Array(Math.ceil(fileSize / pageSize));
        ftruncateSync(fd, 0);
        writeSync(fd, lay.head, 0, lay.head.length, 0);
        ftruncateSync(fd, fileSize);
      },
      page(block, offset, data, fill) {
        const rs = byBlock.get(block);
        if (!rs) return;
        for (const r of rs) {
          if (offset < r.offset || offset >= r.offset + r.size) continue;
          const at = r.fileOffset + (offset - r.offset);
          const n = Math.min(pageSize, r.offset + r.size - offset);
          const idx = Math.floor(at / pageSize);
          if (data) {
            put(at, n === data.length ? data : data.subarray(0, n));
            written[idx] = 1;
          } else if (fill !== 0 || written[idx]) {
            // A hole reads as zeroes; write only a page that held data, or a fill.
            put(at, fill ? Buffer.alloc(n, fill) : zero.subarray(0, n));
            written[idx] = fill ? 1 : 0;
          }
        }
      },
    },
    pageSize,
  );
  flush();
  return { pages: summary.pages, zeroPages: summary.zeroPages, bytes: fileSize };
}

/** The ELF's notes and PT_LOADs, read back (for kdump). */
function readElf(fd: number): { notes: Buffer; loads: Load[] } {
  const h = Buffer.alloc(EHDR);
  readSync(fd, h, 0, EHDR, 0);
  if (h.toString('latin1', 0, 4) !== '\x7fELF' || h[4] !== 2)
    throw new DumpError('DUMP_BAD_STREAM', 'not an ELF64 core');
  const phoff = Number(h.readBigUInt64LE(32));
  const phnum = h.readUInt16LE(56);
  const ph = Buffer.alloc(phnum * PHDR);
  readSync(fd, ph, 0, ph.length, phoff);
  let notes = Buffer.alloc(0);
  const loads: Load[] = [];
  for (let i = 0; i < phnum; i++) {
    const p = i * PHDR;
    const type = ph.readUInt32LE(p);
    const off = Number(ph.readBigUInt64LE(p + 8));
    const size = Number(ph.readBigUInt64LE(p + 32));
    if (type === PT_NOTE) {
      notes = Buffer.alloc(size);
      readSync(fd, notes, 0, size, off);
    } else if (type === PT_LOAD)
      loads.push({ gpa: Number(ph.readBigUInt64LE(p + 24)), size, fileOffset: off });
  }
  return { notes, loads: loads.sort((a, b) => a.gpa - b.gpa) };
}

// makedumpfile's diskdump layout (QEMU's include/sysemu/dump.h).
const KDUMP_SIGNATURE = 'KDUMP   ';
const KDUMP_HEADER_VERSION = 6;
const SUB_HEADER_SIZE = 104;
const PAGE_DESC_SIZE = 24;
const DUMP_DH_COMPRESSED_ZLIB = 0x1;

/**
 * Writes a kdump-compressed file (zlib) into `outFd` from the ELF core in `elfFd`.
 * Returns the number of pages in it.
 */
export function kdumpFromElf(elfFd: number, outFd: number, nrCpus: number): number {
  const { notes, loads } = readElf(elfFd);
  const bs = 4096;
  const maxMapnr = loads.reduce((m, l) => Math.max(m, Math.ceil((l.gpa + l.size) / bs)), 0);
  const inDump = (pfn: number) => loads.find((l) => pfn * bs >= l.gpa && pfn * bs < l.gpa + l.size);
  const oneBitmap = Math.ceil(Math.ceil(maxMapnr / 8) / bs) * bs;
  const bitmap = Buffer.alloc(oneBitmap);
  let count = 0;
  for (const l of loads)
    for (let a = l.gpa; a < l.gpa + l.size; a += bs) {
      const pfn = Math.floor(a / bs);
      bitmap[pfn >> 3] = (bitmap[pfn >> 3] as number) | (1 << (pfn & 7));
    }
  for (let i = 0; i < maxMapnr; i++) if ((bitmap[i >> 3] as number) & (1 << (i & 7))) count++;
  const subHdrBlocks = Math.ceil((SUB_HEADER_SIZE + notes.length) / bs);
  const bitmapBlocks = (2 * oneBitmap) / bs;

  const dh = Buffer.alloc(bs);
  dh.write(KDUMP_SIGNATURE, 0, 'latin1');
  dh.writeUInt32LE(KDUMP_HEADER_VERSION, 8);
  dh.write('x86_64', 12 + 4 * 65, 'latin1'); // utsname.machine
  dh.writeUInt32LE(DUMP_DH_COMPRESSED_ZLIB, 424);
  dh.writeUInt32LE(bs, 428);
  dh.writeUInt32LE(subHdrBlocks, 432);
  dh.writeUInt32LE(bitmapBlocks, 436);
  dh.writeUInt32LE(Math.min(maxMapnr, 0xffffffff), 440);
  dh.writeUInt32LE(nrCpus, 460);

  const sub = Buffer.alloc(subHdrBlocks * bs);
  sub.writeUInt32LE(1, 8); // dump_level
  sub.writeBigUInt64LE(BigInt(bs + SUB_HEADER_SIZE), 48); // offset_note
  sub.writeBigUInt64LE(BigInt(notes.length), 56); // size_note
  sub.writeBigUInt64LE(BigInt(maxMapnr), 96); // max_mapnr_64
  notes.copy(sub, SUB_HEADER_SIZE);

  let pos = 0;
  const out = (b: Buffer, at: number) => writeSync(outFd, b, 0, b.length, at);
  out(dh, pos);
  pos += bs;
  out(sub, pos);
  pos += sub.length;
  out(bitmap, pos);
  out(bitmap, pos + oneBitmap);
  pos += 2 * oneBitmap;
  const descAt = pos;
  let dataAt = descAt + count * PAGE_DESC_SIZE;
  // One zero page that every zero page's descriptor points at.
  const zeroAt = dataAt;
  out(Buffer.alloc(bs), zeroAt);
  dataAt += bs;
  const descs = Buffer.alloc(Math.min(count, 4096) * PAGE_DESC_SIZE);
  let nDesc = 0;
  let descPos = descAt;
  const page = Buffer.alloc(bs);
  for (let pfn = 0; pfn < maxMapnr; pfn++) {
    if (!((bitmap[pfn >> 3] as number) & (1 << (pfn & 7)))) continue;
    const l = inDump(pfn) as Load;
    page.fill(0);
    const off = l.fileOffset + (pfn * bs - l.gpa);
    readSync(elfFd, page, 0, Math.min(bs, l.gpa + l.size - pfn * bs), off);
    const d = nDesc * PAGE_DESC_SIZE;
    if (page.every((x) => x === 0)) {
      descs.writeBigUInt64LE(BigInt(zeroAt), d);
      descs.writeUInt32LE(bs, d + 8);
      descs.writeUInt32LE(0, d + 12);
    } else {
      const z = deflateSync(page, { level: 1 });
      const compressed = z.length < bs;
      const data = compressed ? z : page;
      out(data, dataAt);
      descs.writeBigUInt64LE(BigInt(dataAt), d);
      descs.writeUInt32LE(data.length, d + 8);
      descs.writeUInt32LE(compressed ? DUMP_DH_COMPRESSED_ZLIB : 0, d + 12);
      dataAt += data.length;
    }
    descs.writeBigUInt64LE(0n, d + 16);
    nDesc++;
    if (nDesc * PAGE_DESC_SIZE === descs.length) {
      out(descs, descPos);
      descPos += descs.length;
      nDesc = 0;
    }
  }
  if (nDesc) out(descs.subarray(0, nDesc * PAGE_DESC_SIZE), descPos);
  return count;
}
