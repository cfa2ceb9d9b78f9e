// SHA-256 of a dump, computed on a worker thread so the dump path (pipe reads, NBD
// writes) does not wait for it. Pieces are hashed in the order they are handed over;
// `backlog` counts the bytes not hashed yet, so the caller can stop feeding it (a dump
// may be far larger than memory).
//
// A piece in a SharedArrayBuffer is hashed where it lies: the worker gets the
// buffer once and then only (buffer, offset, length), so nothing is copied, and the
// caller must leave the bytes alone until update()'s promise resolves. Any other
// piece is copied to the worker when it is handed over.

import { Worker } from 'node:worker_threads';

const CODE = `
const { parentPort } = require('node:worker_threads');
const h = require('node:crypto').createHash('sha256');
const shared = new Map();
parentPort.on('message', (m) => {
  if (m === 'digest') parentPort.postMessage({ digest: h.digest('hex') });
  else if (m.share !== undefined) shared.set(m.share, Buffer.from(m.sab));
  else if (m.id !== undefined) {
    h.update(shared.get(m.id).subarray(m.offset, m.offset + m.length));
    parentPort.postMessage({ hashed: m.length });
  } else {
    h.update(m);
    parentPort.postMessage({ hashed: m.length });
  }
});
`;

export class Hasher {
  private readonly worker: Worker;
  private done: Promise<string> | null = null;
  private digestWaiter: ((hex: string) => void) | null = null;
  private failure: Error | null = null;
  /** Bytes handed over and not hashed yet. */
  backlog = 0;
  private waiters: { limit: number; resolve: () => void }[] = [];
  /** One per piece handed over, in order: called once the worker has hashed it. */
  private hashed: (() => void)[] = [];
  private hashedHead = 0;
  private readonly shared = new WeakMap<SharedArrayBuffer, number>();
  private nextShared = 0;

  constructor() {
    this.worker = new Worker(CODE, { eval: true });
    this.worker.unref();
    this.worker.on('message', (m: { hashed?: number; digest?: string }) => {
      if (m.hashed !== undefined) {
        if (this.failure) return;
        this.backlog -= m.hashed;
        const f = this.hashed[this.hashedHead++];
        if (this.hashedHead > 1024) {
          this.hashed = this.hashed.slice(this.hashedHead);
          this.hashedHead = 0;
        }
        f?.();
        this.waiters = this.waiters.filter((w) => {
          if (this.backlog > w.limit) return true;
          w.resolve();
          return false;
        });
      } else if (m.digest !== undefined) this.digestWaiter?.(m.digest);
    });
    this.worker.on('error', (e) => {
      this.failure = e;
      this.releaseAll();
    });
  }

  /**
   * Hands a piece over. The promise resolves once it is hashed (or the worker failed,
   * which digest() then reports); until then a shared piece must not change.
   */
  update(piece: Buffer): Promise<void> {
    this.backlog += piece.length;
    const p = new Promise<void>((resolve) => this.hashed.push(resolve));
    if (this.failure) {
      this.releaseAll();
      return p;
    }
    const sab = piece.buffer;
    if (sab instanceof SharedArrayBuffer) {
      let id = this.shared.get(sab);
      if (id === undefined) {
        id = this.nextShared++;
        this.shared.set(sab, id);
        this.worker.postMessage({ share: id, sab });
      }
      this.worker.postMessage({ id, offset: piece.byteOffset, length: piece.length });
    } else this.worker.postMessage(piece);
    return p;
  }

  /** Resolves once the backlog is at most `limit` bytes. */
  below(limit: number): Promise<void> {
    if (this.backlog <= limit || this.failure) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ limit, resolve }));
  }

  /** The hex digest of everything updated; the worker ends after it. */
  digest(): Promise<string> {
    this.done ??= new Promise<string>((resolve, reject) => {
      if (this.failure) {
        reject(this.failure);
        return;
      }
      this.digestWaiter = (hex) => {
        void this.worker.terminate();
        resolve(hex);
      };
      this.worker.once('error', reject);
      this.worker.postMessage('digest');
    });
    return this.done;
  }

  /** Stops hashing: pieces handed over count as done, and digest() rejects. */
  close(): void {
    this.failure ??= new Error('the hasher was closed');
    this.releaseAll();
    void this.worker.terminate();
  }

  /** After a failure: nobody waits for the worker any more. */
  private releaseAll(): void {
    for (const w of this.waiters.splice(0)) w.resolve();
    const left = this.hashed.slice(this.hashedHead);
    this.hashed = [];
    this.hashedHead = 0;
    for (const f of left) f();
  }
}
