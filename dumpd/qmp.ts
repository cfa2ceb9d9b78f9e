// A small QMP client: one connection to a QEMU monitor socket (Unix, or TCP on a
// loopback address), the greeting, qmp_capabilities, commands matched to responses by
// id, asynchronous events, and errors with stable QMP_* codes. `QmpMonitor` keeps a
// client connected across QEMU restarts.
//
// Events: 'event' (QmpEvent) for every event, and the event name (e.g. 'GUEST_PANICKED')
// with the same object. A QmpClient emits 'close' (with the error, if any) once, after
// which it is unusable.

import { EventEmitter } from 'node:events';
import net from 'node:net';

export class QmpError extends Error {
  readonly code: string;
  /** For QMP_* codes from QEMU's error replies: the error class QEMU sent. */
  readonly errorClass?: string;
  constructor(code: string, message: string, options?: { cause?: unknown; errorClass?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'QmpError';
    this.code = code;
    if (options?.errorClass) this.errorClass = options.errorClass;
  }
}

/** QEMU's error class (CamelCase) as a stable code: GenericError → QMP_GENERIC_ERROR. */
export function qmpErrorCode(errorClass: string): string {
  const snake = errorClass.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase();
  return `QMP_${snake.replace(/[^A-Z0-9_]/g, '_')}`;
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export type QmpAddress = { path: string } | { host: string; port: number };

/** `unix:/path`, `/path`, or `tcp:HOST:PORT`. */
export function parseQmpAddress(s: string): QmpAddress {
  if (s.startsWith('tcp:')) {
    const m = /^tcp:(\[[^\]]+\]|[^:]+):(\d+)$/.exec(s);
    if (!m) throw new QmpError('QMP_BAD_ADDRESS', `bad QMP address ${s}`);
    return { host: (m[1] as string).replace(/^\[|\]$/g, ''), port: Number(m[2]) };
  }
  const p = s.startsWith('unix:') ? s.slice(5) : s;
  if (!p) throw new QmpError('QMP_BAD_ADDRESS', `bad QMP address ${s}`);
  return { path: p };
}

function describeAddress(a: QmpAddress): string {
  return 'path' in a ? a.path : `${a.host}:${a.port}`;
}

interface Waiting {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** Newline-delimited JSON framing, independent of the socket. */
export class QmpLineDecoder {
  private partial = '';
  push(chunk: string): unknown[] {
    this.partial += chunk;
    const out: unknown[] = [];
    let nl = this.partial.indexOf('\n');
    while (nl >= 0) {
      const line = this.partial.slice(0, nl).trim();
      this.partial = this.partial.slice(nl + 1);
      if (line) {
        try {
          out.push(JSON.parse(line));
        } catch (e) {
          throw new QmpError('QMP_PROTOCOL', `not JSON from QEMU: ${line.slice(0, 200)}`, {
            cause: e,
          });
        }
      }
      nl = this.partial.indexOf('\n');
    }
    if (this.partial.length > 16 * 1024 * 1024)
      throw new QmpError('QMP_PROTOCOL', 'QMP message over 16 MiB');
    return out;
  }
}

export interface QmpConnectOptions {
  /** Give up connecting and negotiating after this long (default 10 s). */
  timeoutMs?: number;
}

export class QmpClient extends EventEmitter {
  private readonly waiting = new Map<string, Waiting>();
  private nextId = 1;
  private closed: Error | null = null;
  private readonly decoder = new QmpLineDecoder();
  greeting: QmpGreeting | null = null;
  private greetingWaiter: ((g: QmpGreeting) => void) | null = null;

  private constructor(private readonly sock: net.Socket) {
    super();
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => {
      let msgs: unknown[];
      try {
        msgs = this.decoder.push(s);
      } catch (e) {
        this.shutdown(e as Error);
        return;
      }
      for (const m of msgs) this.onMessage(m as Record<string, unknown>);
    });
    sock.on('error', (e) =>
      this.shutdown(new QmpError('QMP_DISCONNECTED', `QMP connection failed: ${e.message}`)),
    );
    sock.on('close', () =>
      this.shutdown(new QmpError('QMP_DISCONNECTED', 'QEMU closed the QMP connection')),
    );
  }

  /** Connects, reads the greeting and enters command mode. */
  static async connect(
    addr: QmpAddress | string,
    opts: QmpConnectOptions = {},
  ): Promise<QmpClient> {
    const a = typeof addr === 'string' ? parseQmpAddress(addr) : addr;
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const sock = 'path' in a ? net.connect(a.path) : net.connect(a.port, a.host);
    await new Promise<void>((resolve, reject) => {
      const onErr = (e: NodeJS.ErrnoException) =>
        reject(
          new QmpError(
            'QMP_CONNECT_FAILED',
            `cannot connect to QMP at ${describeAddress(a)}: ${e.code ?? e.message}`,
            { cause: e },
          ),
        );
      sock.once('error', onErr);
      sock.once('connect', () => {
        sock.off('error', onErr);
        resolve();
      });
    });
    const c = new QmpClient(sock);
    const timer = setTimeout(
      () => c.shutdown(new QmpError('QMP_TIMEOUT', `no QMP greeting within ${timeoutMs} ms`)),
      timeoutMs,
    );
    try {
      await new Promise<QmpGreeting>((resolve, reject) => {
        if (c.greeting) resolve(c.greeting);
        c.greetingWaiter = resolve;
        c.once('close', (e: Error | undefined) =>
          reject(e ?? new QmpError('QMP_DISCONNECTED', 'closed')),
        );
      });
      await c.execute('qmp_capabilities');
    } catch (e) {
      c.close();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    return c;
  }

  get isClosed(): boolean {
    return this.closed !== null;
  }

  private onMessage(m: Record<string, unknown>): void {
    if ('QMP' in m) {
      this.greeting = m.QMP as QmpGreeting;
      const w = this.greetingWaiter;
      this.greetingWaiter = null;
      w?.(this.greeting);
      return;
    }
    if (typeof m.event === 'string') {
      const ev: QmpEvent = {
        event: m.event,
        data: (m.data as Record<string, unknown> | undefined) ?? {},
        timestamp: m.timestamp as QmpEvent['timestamp'],
      };
      this.emit('event', ev);
      this.emit(ev.event, ev);
      return;
    }
    const id = m.id === undefined ? undefined : String(m.id);
    const w = id === undefined ? undefined : this.waiting.get(id);
    if (!w || id === undefined) return; // a reply to nobody (e.g. a timed-out command)
    this.waiting.delete(id);
    if ('error' in m) {
      const err = (m.error ?? {}) as { class?: string; desc?: string };
      const cls = err.class ?? 'GenericError';
      w.reject(
        new QmpError(qmpErrorCode(cls), `${w.command}: ${err.desc ?? cls}`, { errorClass: cls }),
      );
    } else w.resolve(m.return);
  }

  /**
   * Runs a command; resolves with its `return` value, rejects with a QmpError. With
   * `timeoutMs`, a command QEMU does not answer in time fails with QMP_TIMEOUT (a late
   * answer is dropped).
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    opts: { timeoutMs?: number } = {},
  ): Promise<T> {
    if (this.closed) return Promise.reject(this.closed);
    const id = `b${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done =
        <V>(f: (v: V) => void) =>
        (v: V) => {
          clearTimeout(timer);
          f(v);
        };
      this.waiting.set(id, {
        command,
        resolve: done(resolve as (v: unknown) => void),
        reject: done(reject),
      });
      if (opts.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiting.delete(id);
          reject(new QmpError('QMP_TIMEOUT', `${command}: no answer within ${opts.timeoutMs} ms`));
        }, opts.timeoutMs);
      }
      const msg: Record<string, unknown> = { execute: command, id };
      if (args && Object.keys(args).length) msg.arguments = args;
      this.sock.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Resolves with the next event of that name (optionally matching `pred`). */
  waitEvent(
    name: string,
    timeoutMs: number,
    pred: (e: QmpEvent) => boolean = () => true,
  ): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (!pred(e)) return;
        cleanup();
        resolve(e);
      };
      const onClose = (e: Error | undefined) => {
        cleanup();
        reject(e ?? new QmpError('QMP_DISCONNECTED', 'QMP connection closed'));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpError('QMP_TIMEOUT', `no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off(name, onEvent);
        this.off('close', onClose);
      };
      this.on(name, onEvent);
      this.once('close', onClose);
    });
  }

  private shutdown(e: Error): void {
    if (this.closed) return;
    this.closed = e;
    for (const w of this.waiting.values()) w.reject(e);
    this.waiting.clear();
    this.sock.destroy();
    this.emit('close', e);
  }

  close(): void {
    this.shutdown(new QmpError('QMP_CLOSED', 'the QMP client was closed'));
  }
}

export interface QmpMonitorOptions {
  /** First retry delay; doubles up to maxRetryMs (defaults 200 ms and 5 s). */
  retryMs?: number;
  maxRetryMs?: number;
}

/**
 * Keeps a QmpClient connected to one address: connects, and after the connection is
 * lost (QEMU restarted, socket not there yet) tries again with backoff. Emits
 * 'connected' (QmpClient), 'disconnected' (Error), and every event as 'event'.
 */
export class QmpMonitor extends EventEmitter {
  client: QmpClient | null = null;
  private stopped = false;
  private timer: NodeJS.Timeout | null = null;
  private delay: number;
  private readonly addr: QmpAddress;

  constructor(
    addr: QmpAddress | string,
    private readonly opts: QmpMonitorOptions = {},
  ) {
    super();
    this.addr = typeof addr === 'string' ? parseQmpAddress(addr) : addr;
    this.delay = opts.retryMs ?? 200;
  }

  start(): void {
    this.stopped = false;
    void this.attempt();
  }

  private async attempt(): Promise<void> {
    this.timer = null;
    if (this.stopped) return;
    let c: QmpClient;
    try {
      c = await QmpClient.connect(this.addr);
    } catch (e) {
      this.emit('retry', e);
      this.schedule();
      return;
    }
    if (this.stopped) {
      c.close();
      return;
    }
    this.delay = this.opts.retryMs ?? 200;
    this.client = c;
    c.on('event', (ev: QmpEvent) => this.emit('event', ev));
    c.once('close', (e: Error) => {
      if (this.client === c) this.client = null;
      this.emit('disconnected', e);
      this.schedule();
    });
    this.emit('connected', c);
  }

  private schedule(): void {
    if (this.stopped || this.timer) return;
    this.timer = setTimeout(() => void this.attempt(), this.delay);
    this.delay = Math.min(this.delay * 2, this.opts.maxRetryMs ?? 5000);
  }

  /**
   * Connects now rather than at the next retry (a QEMU just started); resolves with
   * whether the monitor is connected within `timeoutMs`.
   */
  async connectNow(timeoutMs: number): Promise<boolean> {
    if (this.client) return true;
    if (this.stopped) return false;
    const connected = new Promise<boolean>((resolve) => {
      const t = setTimeout(() => {
        this.off('connected', on);
        resolve(false);
      }, timeoutMs);
      const on = () => {
        clearTimeout(t);
        resolve(true);
      };
      this.once('connected', on);
    });
    // A retry that waits is made now; one under way is waited for.
    if (this.timer) {
      clearTimeout(this.timer);
      this.delay = this.opts.retryMs ?? 200;
      void this.attempt();
    }
    return connected;
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.client?.close();
    this.client = null;
  }
}
