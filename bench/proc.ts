// Child processes and /proc: spawning with a bounded log, waiting, memory figures.

import { type ChildProcess, spawn } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { basename } from 'node:path';

const LOG_LIMIT = 16 * 1024;

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Every child still alive, so an interrupted run can take them down with it. */
const live = new Set<Child>();

export class Child {
  readonly proc: ChildProcess;
  readonly pid: number;
  readonly exited: Promise<ExitStatus>;
  exitStatus: ExitStatus | undefined;
  private log = '';

  /** Whether it leads a process group of its own (see killGroup). */
  readonly group: boolean;

  constructor(
    readonly command: string,
    readonly args: readonly string[],
    opts: { cwd?: string; group?: boolean } = {},
  ) {
    this.group = opts.group ?? false;
    this.proc = spawn(command, args, {
      cwd: opts.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: this.group,
    });
    const append = (chunk: Buffer): void => {
      this.log += chunk.toString('utf8');
      if (this.log.length > LOG_LIMIT) this.log = this.log.slice(-LOG_LIMIT);
    };
    this.proc.stdout?.on('data', append);
    this.proc.stderr?.on('data', append);
    this.exited = new Promise<ExitStatus>((resolve) => {
      this.proc.once('error', (err) => {
        append(Buffer.from(`spawn error: ${err.message}\n`));
        this.exitStatus ??= { code: null, signal: null };
        live.delete(this);
        resolve(this.exitStatus);
      });
      this.proc.once('close', (code, signal) => {
        this.exitStatus = { code, signal };
        live.delete(this);
        resolve(this.exitStatus);
      });
    });
    this.pid = this.proc.pid ?? -1;
    live.add(this);
  }

  get running(): boolean {
    return this.exitStatus === undefined;
  }

  /**
   * Signals the whole process group (a child spawned with `group`): fio's job
   * processes with it, which would otherwise outlive a SIGKILLed fio, hold its
   * output pipes open and keep `exited` from ever resolving.
   */
  killGroup(signal: NodeJS.Signals): void {
    try {
      if (this.group) process.kill(-this.pid, signal);
      else this.proc.kill(signal);
    } catch {
      // already gone
    }
  }

  /** The tail of what the process wrote to stdout and stderr. */
  output(): string {
    return this.log;
  }

  /** SIGTERM, wait up to `graceMs`, then SIGKILL. Resolves with the exit status. */
  async stop(graceMs = 10_000): Promise<ExitStatus & { killed: boolean }> {
    if (!this.running) return { ...this.exitStatus!, killed: false };
    this.proc.kill('SIGTERM');
    const timer = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), graceMs).unref());
    const first = await Promise.race([this.exited, timer]);
    if (first !== 'timeout') return { ...first, killed: false };
    this.proc.kill('SIGKILL');
    return { ...(await this.exited), killed: true };
  }
}

/** Kills every child still running (used on SIGINT and on fatal errors). */
export function killAll(): void {
  for (const c of live) c.killGroup('SIGKILL');
}

/** Runs a command to completion and returns its exit code and output. */
export async function run(
  command: string,
  args: readonly string[],
  timeoutMs = 60_000,
): Promise<{ code: number | null; output: string; timedOut: boolean }> {
  const c = new Child(command, args);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    c.proc.kill('SIGKILL');
  }, timeoutMs);
  const st = await c.exited;
  clearTimeout(timer);
  return { code: st.code, output: c.output(), timedOut };
}

/** Fields of /proc/PID/status in KiB (VmHWM, VmRSS), or undefined if unreadable. */
export function memoryKiB(pid: number): { vmHwm: number; vmRss: number } | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return undefined;
  }
  const field = (name: string): number | undefined => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text);
    return m?.[1] === undefined ? undefined : Number(m[1]);
  };
  const vmHwm = field('VmHWM');
  const vmRss = field('VmRSS');
  if (vmHwm === undefined || vmRss === undefined) return undefined;
  return { vmHwm, vmRss };
}

/** utime + stime of a process, in seconds (from /proc/PID/stat; 10 ms resolution). */
export function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return Number.NaN;
  }
}

function exeName(pid: number): string | undefined {
  try {
    return basename(readlinkSync(`/proc/${pid}/exe`));
  } catch {
    return undefined;
  }
}

function childrenOf(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const tid of tasks) {
    try {
      const text = readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim();
      if (text !== '') for (const c of text.split(/\s+/)) out.push(Number(c));
    } catch {
      // task gone
    }
  }
  return out;
}

/**
 * The process whose memory we mean when we say "the server": the spawned
 * process itself when its executable matches `exePattern` (a script run by
 * its shebang keeps the PID that was spawned), else the first descendant that
 * matches (a wrapper that forks rather than execs). Breadth-first.
 */
export function findProcess(
  rootPid: number,
  exePattern: RegExp,
): { pid: number; exe: string; note: string } | undefined {
  const queue = [rootPid];
  const seen = new Set<number>();
  while (queue.length > 0) {
    const pid = queue.shift()!;
    if (seen.has(pid)) continue;
    seen.add(pid);
    const exe = exeName(pid);
    if (exe !== undefined && exePattern.test(exe)) {
      const note = pid === rootPid ? 'spawned pid' : `descendant of spawned pid ${rootPid}`;
      return { pid, exe, note };
    }
    queue.push(...childrenOf(pid));
  }
  return undefined;
}
