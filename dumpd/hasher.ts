// SHA-256 of a dump, computed on a worker thread so the dump path (pipe reads, NBD
// writes) does not wait for it. Pieces are copied to the worker in order.

import { Worker } from 'node:worker_threads';

const CODE = `
const { parentPort } = require('node:worker_threads');
const h = require('node:crypto').createHash('sha256');
parentPort.on('message', (m) => {
  if (m === 'digest') parentPort.postMessage(h.digest('hex'));
  else h.update(m);
});
`;

export class Hasher {
  private readonly worker: Worker;
  private done: Promise<string> | null = null;

  constructor() {
    this.worker = new Worker(CODE, { eval: true });
    this.worker.unref();
  }

  update(piece: Buffer): void {
    this.worker.postMessage(piece);
  }

  /** The hex digest of everything updated; the worker ends after it. */
  digest(): Promise<string> {
    this.done ??= new Promise<string>((resolve, reject) => {
      this.worker.once('message', (hex: string) => {
        void this.worker.terminate();
        resolve(hex);
      });
      this.worker.once('error', reject);
      this.worker.postMessage('digest');
    });
    return this.done;
  }

  close(): void {
    void this.worker.terminate();
  }
}
