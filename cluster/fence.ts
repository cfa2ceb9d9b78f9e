// Self-fencing: an agent that cannot prove its membership lease is still alive
// stops all I/O to shared devices before etcd can expire that lease and let
// another host take the device over.
//
// The deadline is the send time of the last keepalive etcd acknowledged, plus
// the TTL, minus a margin, on the monotonic clock: etcd restarted the lease's
// TTL no earlier than we sent that keepalive, so its expiry cannot come before
// our deadline + margin. (A leader change in etcd only extends TTLs.) The gate
// is asked on every request, from the clock, so an agent frozen by SIGSTOP and
// continued serves nothing before it has noticed: no timer has to run first.
//
// While fenced, requests are held (a bounded time, like multipath's
// no_path_retry) and then failed with EIO, never written. The fence opens again
// once a keepalive is acknowledged and, if the lease was lost meanwhile, the
// agent's cache has caught up with everything that happened while it was away
// (reservations changed by other hosts are applied before anyone is served).
//
// The gate decides when a request is admitted; a write may then wait in the
// backend's queue and libuv's thread pool. So the fence is also published to
// the native addon (a slot of its memory, which every thread sees): the
// deadline on CLOCK_MONOTONIC and an epoch that changes each time the fence
// closes. Each write carries the token (slot, epoch) of its admission, and the
// thread making its syscall checks it immediately before: past the deadline, or
// admitted before a fence that has opened again since, it is refused
// (native/ballast_native.c, "Fences").

import { closeSync, openSync, writeSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { BallastError } from '../agent/errors.js';
import { type BallastNative, loadNative } from '../agent/native.js';

export interface FenceSource {
  /** performance.now() before which etcd cannot have expired the lease. */
  leaseValidUntil(): number;
  /** Whether the agent may serve again after a fence (lease renewed, caught up). */
  canServe(): boolean;
}

export interface FenceOptions {
  /** Subtracted from the lease deadline: time for a checked write to reach the file. */
  marginMs: number;
  /** How long requests are held once fenced before they fail with EIO. */
  holdMs: number;
  log: (msg: string) => void;
  /** A Linux watchdog device petted only while the lease is valid (see docs). */
  watchdog?: string;
  /** Told when the agent fences itself, and when it serves again. */
  onChange?: (fenced: boolean, heldMs?: number) => void;
}

export class Fence {
  private fencedAt: number | null = null;
  /** Closed since the agent joined, not yet caught up (not a fence: not counted or told). */
  private starting = false;
  private readonly native: BallastNative;
  /** This fence's slot in the addon. */
  readonly slot: number;
  private epoch = 0;
  /**
   * What a write admitted now carries to its syscall (slot << 32 | epoch), read
   * by the backend when the request reaches it.
   */
  token: number;
  /** The deadline the addon holds (performance.now() time; -Infinity while fenced). */
  private publishedUntil = -Infinity;
  private readonly wakers = new Set<() => void>();
  private failTimer: NodeJS.Timeout | undefined;
  private petTimer: NodeJS.Timeout | undefined;
  private watchdogFd = -1;
  /** Times the agent fenced itself, requests held now (connections), for metrics. */
  fences = 0;
  closed = false;

  constructor(
    private readonly src: FenceSource,
    private readonly opts: FenceOptions,
  ) {
    this.native = loadNative();
    this.slot = this.native.fenceCreate();
    if (this.slot < 0) {
      throw new BallastError('BALLAST_NATIVE_MISSING', 'no fence slot left in the native addon');
    }
    this.token = this.slot * 2 ** 32;
    // An agent that has just joined serves shared devices only once its cache has
    // caught up to its registration: a change made between its first listing and
    // its registration did not wait for it, and must be in force here before it serves.
    if (!src.canServe()) {
      this.fencedAt = performance.now();
      this.starting = true;
      this.failTimer = setTimeout(() => this.wakeAll(), this.opts.holdMs + 1);
      this.failTimer.unref();
    }
    this.publish();
    if (opts.watchdog) {
      this.watchdogFd = openSync(opts.watchdog, 'w');
      this.petTimer = setInterval(() => this.pet(), 1000);
      this.petTimer.unref();
    }
  }

  /** The monotonic deadline after which this agent serves nothing shared. */
  deadline(): number {
    return this.src.leaseValidUntil() - this.opts.marginMs;
  }

  /** Whether I/O to shared devices is stopped now. */
  fenced(): boolean {
    this.gate();
    return this.fencedAt !== null;
  }

  /** Connections held now (waiting for the fence to open). */
  held(): number {
    return this.wakers.size;
  }

  /** The data path's question, per request. */
  gate(): 'open' | 'hold' | 'fail' {
    const now = performance.now();
    if (this.fencedAt === null) {
      if (now < this.deadline() && !this.closed) return 'open';
      this.enter(now);
    }
    return now - (this.fencedAt ?? now) >= this.opts.holdMs ? 'fail' : 'hold';
  }

  /** Fences: writes admitted until now are refused at their syscall from now on. */
  private enter(now: number): void {
    this.fencedAt = now;
    this.fences++;
    this.epoch = (this.epoch + 1) >>> 0;
    this.token = this.slot * 2 ** 32 + this.epoch;
    this.publish();
    this.opts.log(
      `cluster: fenced: the membership lease could not be renewed in time; I/O to shared devices is held for ${this.opts.holdMs} ms, then fails with EIO`,
    );
    this.opts.onChange?.(true);
    clearTimeout(this.failTimer);
    this.failTimer = setTimeout(() => this.wakeAll(), this.opts.holdMs + 1);
    this.failTimer.unref();
  }

  /**
   * Gives the addon the deadline (none while fenced or closed), converted to
   * CLOCK_MONOTONIC: the clock is read before performance.now(), so the deadline
   * given can only be earlier than the true one, by the time between the two.
   */
  private publish(): void {
    const open = this.fencedAt === null && !this.closed;
    const until = open ? this.deadline() : Number.NEGATIVE_INFINITY;
    this.publishedUntil = until;
    let ns = 0n;
    if (open) {
      const mono = this.native.monotonicNs();
      const left = until - performance.now();
      if (left > 0) ns = mono + BigInt(Math.floor(left * 1e6));
    }
    this.native.fenceSet(this.slot, this.epoch, ns);
  }

  onOpen(wake: () => void): void {
    this.wakers.add(wake);
  }

  /** Asked after each acknowledged keepalive and each applied batch of changes. */
  check(): void {
    if (this.closed) return;
    const now = performance.now();
    if (this.fencedAt === null) {
      // The deadline passed with no request asking (writes may still be queued):
      // fenced all the same, so nothing admitted before it goes out after the renewal.
      if (now >= this.publishedUntil) this.enter(now);
      else {
        this.publish(); // a renewal moves the deadline on
        return;
      }
    }
    if (now < this.deadline() && this.src.canServe()) {
      const ms = Math.round(now - (this.fencedAt ?? now));
      this.fencedAt = null;
      clearTimeout(this.failTimer);
      this.publish();
      if (this.starting) {
        this.starting = false;
        this.opts.log(`cluster: serving shared devices: state caught up ${ms} ms after joining`);
      } else {
        this.opts.log(`cluster: unfenced after ${ms} ms: lease renewed and state caught up`);
        this.opts.onChange?.(false, ms);
      }
      this.wakeAll();
    }
  }

  /** The addon's count of writes this fence refused at their syscall. */
  refused(): number {
    return this.native.fenceStats(this.slot).refused;
  }

  private wakeAll(): void {
    const w = [...this.wakers];
    this.wakers.clear();
    for (const f of w) f();
  }

  /** Pets the watchdog only while the lease is surely alive: a hung agent gets its host reset. */
  private pet(): void {
    if (this.watchdogFd < 0 || this.closed) return;
    if (performance.now() < this.deadline()) {
      try {
        writeSync(this.watchdogFd, '1');
      } catch (e) {
        this.opts.log(`cluster: watchdog: ${(e as Error).message}`);
      }
    }
  }

  /** Stops fencing decisions (agent shutdown); disarms the watchdog with its magic close. */
  close(): void {
    this.closed = true;
    this.epoch = (this.epoch + 1) >>> 0;
    this.token = this.slot * 2 ** 32 + this.epoch;
    this.publish();
    clearTimeout(this.failTimer);
    clearInterval(this.petTimer);
    if (this.watchdogFd >= 0) {
      try {
        writeSync(this.watchdogFd, 'V');
        closeSync(this.watchdogFd);
      } catch {}
      this.watchdogFd = -1;
    }
    this.wakeAll();
  }
}
