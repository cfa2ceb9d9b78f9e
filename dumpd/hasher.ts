// SHA-256 of a dump, computed on a worker thread so the dump path (pipe reads, NBD
// writes) does not wait for it. Pieces are copied to the worker in order; `backlog`
// counts the bytes it has not hashed yet, so the caller can stop feeding it (a dump
// may be far larger than memory).

import { Worker } from 'node:worker_threads';

const CODE = `
const { parentPort } = require('node:worker_threads');
const h = require('node:crypto').createHash('sha256');
parentPort.on('message', (m) => {
  if (m === 'digest') parentPort.postMessage({ digest: h.digest('hex') });
  else {
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

  constructor() {
    this.worker = new Worker(CODE, { eval: true });
    this.worker.unref();
    this.worker.on('message', (m: { hashed?: number; digest?: string }) => {
      if (m.hashed !== undefined) {
        this.backlog -= m.hashed;
        this.waiters = this.waiters.filter((w) => {
          if (this.backlog > w.limit) return true;
          w.resolve();
          return false;
        });
      } else if (m.digest !== undefined) this.digestWaiter?.(m.digest);
    });
    this.worker.on('error', (e) => {
      this.failure = e;
      for (const w of this.waiters.splice(0)) w.resolve();
    });
  }

  update(piece: Buffer): void {
    this.backlog += piece.length;
    this.worker.postMessage(piece);
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

  close(): void {
    void this.worker.terminate();
  }
}
