// The campaign's record: every operation with its call and return on one
// monotonic clock (performance.now(), ms), its outcome, and what the end of
// the run read back. Plain data: the checkers read it, a file keeps it.

import type { Outcome, Request } from './model.js';

/** ok: it happened as answered; failed: it did not happen; unknown: it may or may not have. */
export type Status = 'ok' | 'failed' | 'unknown';

interface Base {
  id: number;
  /** The client that made it. */
  process: string;
  call: number;
  /** null while in flight, and for an unknown outcome. */
  ret: number | null;
  status: Status;
  /** The agent it went through ('a', 'b', 'c'). */
  agent: string;
  /** What came back, for reports (an error code and message). */
  note?: string;
  /** For an unknown outcome: when the client stopped waiting (gave up or got an answer in doubt). */
  gaveUp?: number;
}

export interface PrOp extends Base {
  kind: 'pr';
  device: string;
  req: Request;
  /** The answer: a model outcome when known (ok, or a refusal the model decides). */
  out?: Outcome;
}

export interface IoOp extends Base {
  kind: 'io';
  device: string;
  identity: string;
  /** The NBD connection it went on (see History.conns). */
  conn: number;
  cmd: 'read' | 'write';
  block: number;
  /** A write's tag (what the block holds once it lands). */
  tag?: string;
  /** For a refused request: the NBD error name (EPERM...). */
  errno?: string;
  /** Sent right after a PR command returned, to see its grant in force on every agent. */
  probe?: number;
}

export interface DeviceOp extends Base {
  kind: 'device';
  action: 'create' | 'resize' | 'delete';
  name: string;
  /** Bytes (create, resize). */
  size?: number;
  /** The refusal's code when the outcome is a definite "no". */
  code?: string;
}

export interface AclOp extends Base {
  kind: 'acl';
  device: string;
  /** The entries set, canonical ("id:rw,id:ro", sorted), or null for open. */
  entries: string | null;
}

export type Op = PrOp | IoOp | DeviceOp | AclOp;

export interface Conn {
  id: number;
  device: string;
  identity: string;
  agent: string;
  /** When the handshake finished. */
  opened: number;
}

export interface Fault {
  kind: string;
  target: string;
  start: number;
  end?: number;
  detail?: string;
}

export interface Delivered {
  id: string;
  type: string;
  subject?: string;
  time?: string;
  data?: unknown;
}

/** What every agent reports once the faults stopped and the cluster settled. */
export interface AgentFinal {
  agent: string;
  devices: { name: string; size: number; state: string }[];
  pr: Record<string, { generation: number; regs: Record<string, string>; reservation: string }>;
  acl: Record<string, string | null>;
}

export interface Final {
  /** Per agent, the last state read (the one the convergence check compares). */
  agents: AgentFinal[];
  /** Whether the agents agreed before the deadline (and when). */
  converged: boolean;
  convergedAfterMs?: number;
  /** Every PR device's audit trail, read through one agent. */
  audit: Record<string, AuditRow[]>;
  /** Every PR device's blocks as the shared pool's file holds them: the tag, or '' for zeroes. */
  blocks: Record<string, string[]>;
  /** Per consumer (a webhook recipient or a follow stream), what it received in order. */
  consumers: Record<string, Delivered[]>;
  /** The event log as GET /v1/events read it at the end. */
  eventLog: Delivered[];
  /** Revisions the campaign compacted etcd at. */
  compactions: number[];
  /** The last event before the consumers subscribed: they are judged on the events after it. */
  baseline?: string;
}

export interface AuditRow {
  seq: number;
  initiator: string;
  action: string;
  key: string;
  saKey?: string;
  type?: number;
  target?: string;
  outcome: 'changed' | 'unchanged' | 'refused';
  code?: string;
  generation: number;
  preempted?: string[];
}

export interface History {
  seed: number;
  ops: Op[];
  conns: Conn[];
  faults: Fault[];
  final: Final;
  /** Devices under PR and I/O, and their block count. */
  prDevices: string[];
  blocks: number;
  /** How long after gaveUp an unknown PR command may still take effect (checkers.ts). */
  unknownBoundMs?: number;
}

/** Records operations as clients make them. */
export class Recorder {
  readonly ops: Op[] = [];
  readonly conns: Conn[] = [];
  readonly faults: Fault[] = [];
  private next = 0;

  /** Starts an operation now; `done` completes it. */
  begin<T extends Op>(op: Omit<T, 'id' | 'call' | 'ret' | 'status'>): T {
    const full = {
      ...op,
      id: this.next++,
      call: performance.now(),
      ret: null,
      status: 'unknown',
    } as unknown as T;
    this.ops.push(full);
    return full;
  }

  done(op: Op, status: Status, extra: Partial<Op> = {}): void {
    Object.assign(op, extra);
    op.status = status;
    const now = performance.now();
    op.ret = status === 'unknown' ? null : now;
    if (status === 'unknown') op.gaveUp = now;
  }

  conn(device: string, identity: string, agent: string): Conn {
    const c = { id: this.conns.length, device, identity, agent, opened: performance.now() };
    this.conns.push(c);
    return c;
  }

  fault(kind: string, target: string, detail?: string): Fault {
    const f: Fault = { kind, target, start: performance.now(), ...(detail ? { detail } : {}) };
    this.faults.push(f);
    return f;
  }
}
