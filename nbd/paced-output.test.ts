import type net from 'node:net';
import { describe, expect, it } from 'vitest';
import { PacedOutput, TLS_PIECE } from './server.js';

/** A socket that records writes and completes each one later, as a busy socket does. */
class FakeSocket {
  destroyed = false;
  writes: Buffer[] = [];
  private pending: ((err?: Error) => void)[] = [];
  write(b: Buffer, cb?: (err?: Error) => void): boolean {
    this.writes.push(Buffer.from(b));
    this.pending.push(cb ?? (() => {}));
    return true;
  }
  /** Completes every write made so far. */
  flush(): void {
    const p = this.pending;
    this.pending = [];
    for (const cb of p) cb(this.destroyed ? new Error('destroyed') : undefined);
  }
  get wire(): Buffer {
    return Buffer.concat(this.writes);
  }
}

function bytes(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed) & 0xff;
  return b;
}

function setup() {
  const sock = new FakeSocket();
  const out = new PacedOutput(sock as unknown as net.Socket);
  return { sock, out };
}

function drain(sock: FakeSocket): void {
  for (let i = 0; i < 1000; i++) sock.flush();
}

describe('PacedOutput', () => {
  it('passes small writes straight through', () => {
    const { sock, out } = setup();
    let done = 0;
    out.write(bytes(16, 1), () => done++);
    out.write(bytes(4096, 2), () => done++);
    expect(sock.writes.map((b) => b.length)).toEqual([16, 4096]);
    sock.flush();
    expect(done).toBe(2);
  });

  it('writes a large buffer a piece at a time, each after the last completed', () => {
    const { sock, out } = setup();
    const big = bytes(3 * TLS_PIECE + 100, 3);
    let done = 0;
    out.write(big, () => done++);
    expect(sock.writes.length).toBe(1);
    expect(sock.writes[0]!.length).toBe(TLS_PIECE);
    sock.flush();
    expect(sock.writes.length).toBe(2);
    sock.flush();
    sock.flush();
    expect(sock.writes.map((b) => b.length)).toEqual([TLS_PIECE, TLS_PIECE, TLS_PIECE, 100]);
    expect(done).toBe(0);
    sock.flush();
    expect(done).toBe(1);
    expect(sock.wire.equals(big)).toBe(true);
  });

  it('keeps the order of write() calls on the wire; callbacks run once each', () => {
    const { sock, out } = setup();
    const parts = [
      bytes(28, 1),
      bytes(TLS_PIECE * 2 + 5, 2),
      bytes(16, 3),
      bytes(TLS_PIECE + 1, 4),
      bytes(32, 5),
    ];
    const calls = parts.map(() => 0);
    parts.forEach((p, i) => {
      out.write(p, () => calls[i]!++);
    });
    drain(sock);
    expect(sock.wire.equals(Buffer.concat(parts))).toBe(true);
    expect(calls).toEqual([1, 1, 1, 1, 1]);
    for (const w of sock.writes) expect(w.length).toBeLessThanOrEqual(TLS_PIECE);
  });

  it('on a destroyed socket, what is queued still reaches write() (which fails it to the callback)', () => {
    const { sock, out } = setup();
    const calls = [0, 0];
    out.write(bytes(TLS_PIECE * 4, 1), () => calls[0]!++);
    out.write(bytes(16, 2), () => calls[1]!++);
    sock.destroyed = true;
    drain(sock);
    expect(calls).toEqual([1, 1]);
    expect(sock.writes.length).toBe(3);
  });
});
