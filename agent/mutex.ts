/**
 * Runs async functions one at a time, in call order; a failure does not stop
 * the ones queued after it. Readers that must not wait simply do not use it.
 */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.tail.then(fn, fn);
    this.tail = next.catch(() => {});
    return next;
  }
}
