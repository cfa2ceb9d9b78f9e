// makedumpfile's flattened format, which QEMU writes for kdump-* formats when the
// output cannot seek (a pipe): a 4096-byte header ("makedumpfile", type 1, version 1,
// big-endian 64-bit), then records of (offset i64 BE, size i64 BE, size bytes), ended
// by a record of (-1, -1). Reassembling means writing each record at its offset, which
// is what `makedumpfile -R` does. The parser is incremental and socket-free.

import { DumpError } from './catalog.js';

export const FLAT_HEADER_SIZE = 4096;
const SIGNATURE = Buffer.from('makedumpfile', 'latin1');
const RECORD_HEADER = 16;

/** Whether `head` (at least 16 bytes) starts a flattened dump. */
export function isFlattened(head: Buffer): boolean {
  return head.length >= SIGNATURE.length && head.subarray(0, SIGNATURE.length).equals(SIGNATURE);
}

export type FlatSink = (offset: number, data: Buffer) => Promise<void> | void;

export class FlattenedReader {
  private headerLeft = FLAT_HEADER_SIZE;
  private headerBuf = Buffer.alloc(FLAT_HEADER_SIZE);
  private rec = Buffer.alloc(RECORD_HEADER);
  private recHave = 0;
  private dataLeft = 0;
  private dataOffset = 0;
  private ended = false;
  /** End of the reassembled file (the highest offset + size seen). */
  size = 0;

  constructor(private readonly sink: FlatSink) {}

  get done(): boolean {
    return this.ended;
  }

  async push(chunk: Buffer): Promise<void> {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.ended) return; // anything after the end marker is padding
      if (this.headerLeft > 0) {
        const take = Math.min(this.headerLeft, chunk.length - pos);
        chunk.copy(this.headerBuf, FLAT_HEADER_SIZE - this.headerLeft, pos, pos + take);
        this.headerLeft -= take;
        pos += take;
        if (this.headerLeft === 0) this.checkHeader();
        continue;
      }
      if (this.dataLeft > 0) {
        const take = Math.min(this.dataLeft, chunk.length - pos);
        await this.sink(this.dataOffset, chunk.subarray(pos, pos + take));
        this.dataOffset += take;
        this.dataLeft -= take;
        pos += take;
        continue;
      }
      const take = Math.min(RECORD_HEADER - this.recHave, chunk.length - pos);
      chunk.copy(this.rec, this.recHave, pos, pos + take);
      this.recHave += take;
      pos += take;
      if (this.recHave < RECORD_HEADER) continue;
      this.recHave = 0;
      const offset = this.rec.readBigInt64BE(0);
      const size = this.rec.readBigInt64BE(8);
      if (offset === -1n && size === -1n) {
        this.ended = true;
        return;
      }
      if (offset < 0n || size < 0n || offset > 2n ** 53n || size > 2n ** 32n)
        throw new DumpError(
          'DUMP_BAD_FLATTENED',
          `bad flattened record (offset ${offset}, size ${size})`,
        );
      this.dataOffset = Number(offset);
      this.dataLeft = Number(size);
      this.size = Math.max(this.size, this.dataOffset + this.dataLeft);
    }
  }

  private checkHeader(): void {
    const h = this.headerBuf;
    if (!isFlattened(h) || h.readBigInt64BE(16) !== 1n)
      throw new DumpError('DUMP_BAD_FLATTENED', 'not a makedumpfile flattened dump');
  }

  /** Throws unless the end marker was seen (a truncated dump). */
  finish(): void {
    if (!this.ended)
      throw new DumpError('DUMP_BAD_FLATTENED', 'the flattened dump ends without its end marker');
  }
}

/** Builds a flattened stream (for tests and tools): header, records, end marker. */
export function flatten(records: { offset: number; data: Buffer }[]): Buffer {
  const head = Buffer.alloc(FLAT_HEADER_SIZE);
  SIGNATURE.copy(head, 0);
  head.writeBigInt64BE(1n, 16);
  head.writeBigInt64BE(1n, 24);
  const parts: Buffer[] = [head];
  for (const r of records) {
    const h = Buffer.alloc(RECORD_HEADER);
    h.writeBigInt64BE(BigInt(r.offset), 0);
    h.writeBigInt64BE(BigInt(r.data.length), 8);
    parts.push(h, r.data);
  }
  const end = Buffer.alloc(RECORD_HEADER);
  end.writeBigInt64BE(-1n, 0);
  end.writeBigInt64BE(-1n, 8);
  parts.push(end);
  return Buffer.concat(parts);
}
