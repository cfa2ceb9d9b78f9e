// The rotating working set of issue 25, on real guests: an agent serving one paging
// device per guest, N TCG guests (bench/memory-guest.ts) each running memwork over its
// working set with swap on its paging device, and one of three ways to share memory:
//   controller  `ballast dumpd` with a memory: section sets the balloons
//   static      every balloon set once to pool / N
//   none        no balloon target: each guest at its RAM size, the pool exceeded
// The memory-sharing test (test/interop/memory-guests.test.ts) and `npm run
// bench:memory` both drive it. Everything it starts is killed by close().

import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { QmpClient } from '../dumpd/qmp.js';
import type { MemoryStatus } from '../guestd/memory/controller.js';
import { deviceBytes, guestRamResident } from '../guestd/memory/sources.js';
import { apiRequest, httpRequest } from './api.js';
import {
  buildMemGuest,
  MemGuestConsole,
  memGuestArgs,
  repoRoot,
  type WorkStat,
} from './memory-guest.js';

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export type Way = 'controller' | 'static' | 'none';

export interface RigOptions {
  /** A private directory: sockets, config, pools. */
  dir: string;
  way: Way;
  guests?: number;
  memMiB?: number;
  poolMiB?: number;
  entitlementMiB?: number;
  workMiB?: number;
  swapMiB?: number;
  /** The controller's interval, seconds. */
  interval?: number;
  freePageReporting?: boolean;
  /** More keys of the memory: section (tuning). */
  tuning?: Record<string, unknown>;
  log?: (line: string) => void;
}

export interface RigGuest {
  name: string;
  device: string;
  qmp: string;
  qemu: ChildProcess;
  console: MemGuestConsole;
}

/** One guest's state at one moment. */
export interface GuestSnapshot {
  name: string;
  resident: number | null;
  stat: WorkStat | null;
  pagingRead: number;
  pagingWritten: number;
}

export class MemoryRig {
  readonly guests: RigGuest[] = [];
  readonly memMiB: number;
  readonly poolMiB: number;
  readonly entitlementMiB: number;
  readonly workMiB: number;
  private readonly children: ChildProcess[] = [];
  private agent: ChildProcess | null = null;
  private daemon: ChildProcess | null = null;
  daemonStderr = '';
  agentStderr = '';
  readonly agentApi: string;
  readonly nbdSocket: string;
  readonly dumpdSocket: string;

  constructor(readonly o: RigOptions) {
    this.memMiB = o.memMiB ?? 256;
    this.poolMiB = o.poolMiB ?? 448;
    this.entitlementMiB = o.entitlementMiB ?? 96;
    this.workMiB = o.workMiB ?? 112;
    this.agentApi = path.join(o.dir, 'api.sock');
    this.nbdSocket = path.join(o.dir, 'nbd.sock');
    this.dumpdSocket = path.join(o.dir, 'dumpd.sock');
  }

  private log(s: string): void {
    this.o.log?.(s);
  }

  private spawn(cmd: string, args: string[], onErr?: (s: string) => void): ChildProcess {
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    c.stderr?.on('data', (b: Buffer) => onErr?.(b.toString()));
    this.children.push(c);
    return c;
  }

  /** Agent, paging devices, guests booted with swap on and memwork's pages written. */
  async start(): Promise<void> {
    const n = this.o.guests ?? 3;
    mkdirSync(path.join(this.o.dir, 'pools', 'default'), { recursive: true });
    const agentCfg = path.join(this.o.dir, 'agent.yaml');
    writeFileSync(
      agentCfg,
      [
        `dataDir: ${path.join(this.o.dir, 'data')}`,
        `nbd: ${JSON.stringify({ listen: null, socket: this.nbdSocket })}`,
        `api: ${JSON.stringify({ listen: null, socket: this.agentApi })}`,
        'pools:',
        `  - ${JSON.stringify({ name: 'default', path: path.join(this.o.dir, 'pools', 'default') })}`,
        '',
      ].join('\n'),
    );
    const bin = path.join(repoRoot(), 'bin', 'ballast');
    this.agent = this.spawn(process.execPath, [bin, 'agent', '--config', agentCfg], (s) => {
      this.agentStderr += s;
    });
    await this.until(async () => {
      try {
        return (await apiRequest(this.agentApi, 'GET', '/healthz', undefined, 5000)).status === 200;
      } catch {
        return false;
      }
    }, 'the agent answering');
    const g = await buildMemGuest(this.o.dir);
    for (let i = 0; i < n; i++) {
      const name = `vm${i + 1}`;
      const device = `${name}-swap`;
      const r = await apiRequest(this.agentApi, 'POST', '/v1/devices', {
        name: device,
        size: `${this.o.swapMiB ?? 512}M`,
        role: 'paging',
        guest: name,
      });
      if (r.status !== 201) throw new Error(`create ${device}: ${r.status} ${r.text}`);
      const con = path.join(this.o.dir, `${name}.con`);
      const qmp = path.join(this.o.dir, `${name}.qmp`);
      const qemu = this.spawn(
        'qemu-system-x86_64',
        memGuestArgs({
          ...g,
          console: con,
          qmp,
          nbdSocket: this.nbdSocket,
          paging: device,
          memMiB: this.memMiB,
          freePageReporting: this.o.freePageReporting ?? false,
        }),
        (s) => this.log(`${name} qemu: ${s.trim()}`),
      );
      this.guests.push({ name, device, qmp, qemu, console: await MemGuestConsole.connect(con) });
    }
    await Promise.all(
      this.guests.map(async (x) => {
        await x.console.waitLine('BALLAST-BOOT');
        await x.console.waitLine('BALLAST-READY');
        x.console.send('swapon');
        await x.console.waitLine('BALLAST-SWAPON');
        x.console.send(`start ${this.workMiB}`);
        await x.console.waitLine('MEMWORK-FILLED');
      }),
    );
    this.log(`guests up: ${this.guests.map((x) => x.name).join(', ')}`);
    if (this.o.way === 'controller') await this.startDaemon();
    if (this.o.way === 'static') {
      const each = Math.floor(this.poolMiB / n) * MiB;
      for (const x of this.guests) {
        const c = await QmpClient.connect(x.qmp);
        try {
          await c.execute('balloon', { value: each });
        } finally {
          c.close();
        }
      }
    }
  }

  /** The controller: `ballast dumpd` with a memory: section for the guests. */
  async startDaemon(): Promise<void> {
    const cfg = path.join(this.o.dir, 'guestd.yaml');
    const t = { hostMinAvailable: 0, ...(this.o.tuning ?? {}) };
    writeFileSync(
      cfg,
      [
        `listen: ${this.dumpdSocket}`,
        `runDir: ${path.join(this.o.dir, 'run')}`,
        'memory:',
        `  pool: ${this.poolMiB}M`,
        `  interval: ${this.o.interval ?? 1}`,
        ...Object.entries(t).map(([k, v]) => `  ${k}: ${JSON.stringify(v)}`),
        '  guests:',
        ...this.guests.map(
          (x) =>
            `    - ${JSON.stringify({
              name: x.name,
              qmp: x.qmp,
              entitlement: `${this.entitlementMiB}M`,
              max: `${this.memMiB}M`,
              pagingDevice: x.device,
              agent: `unix:${this.agentApi}`,
            })}`,
        ),
        '',
      ].join('\n'),
    );
    const bin = path.join(repoRoot(), 'bin', 'ballast');
    this.daemonStderr = '';
    this.daemon = this.spawn(process.execPath, [bin, 'dumpd', '-c', cfg], (s) => {
      this.daemonStderr += s;
    });
    await this.until(async () => (await this.status()) !== null, 'the memory status answering');
  }

  /** kill -9 of the controller (a crash). */
  async killDaemon(): Promise<void> {
    const d = this.daemon;
    if (!d || d.exitCode !== null || d.signalCode !== null) return;
    const gone = new Promise((r) => d.once('exit', r));
    d.kill('SIGKILL');
    await gone;
  }

  /** GET /v1/memory on the guest daemon; null while it does not answer. */
  async status(): Promise<MemoryStatus | null> {
    try {
      const r = await httpRequest(
        { socketPath: this.dumpdSocket },
        'GET',
        '/v1/memory',
        undefined,
        {
          timeoutMs: 20_000,
        },
      );
      return r.status === 200 ? (JSON.parse(r.text) as MemoryStatus) : null;
    } catch {
      return null;
    }
  }

  /** Makes guest `i` hot and every other guest cold. */
  rotateTo(i: number): void {
    this.guests.forEach((x, j) => {
      x.console.send(j === i ? 'hot' : 'cold');
    });
  }

  /** Each guest now: resident guest RAM, its last memwork line, its paging device's bytes. */
  async snapshot(): Promise<GuestSnapshot[]> {
    let metrics = '';
    try {
      metrics = (await apiRequest(this.agentApi, 'GET', '/metrics', undefined, 20_000)).text;
    } catch {}
    return this.guests.map((x) => {
      const io = deviceBytes(metrics, x.device);
      const st = x.console.stat;
      return {
        name: x.name,
        resident: x.qemu.pid === undefined ? null : guestRamResident(x.qemu.pid, this.memMiB * MiB),
        stat: st ? { ...st } : null,
        pagingRead: io.read,
        pagingWritten: io.write,
      };
    });
  }

  /** Every guest verifies all its pages; their reports, and whether memwork still runs. */
  async verify(): Promise<{ name: string; line: string; alive: boolean; stat: WorkStat | null }[]> {
    return Promise.all(
      this.guests.map(async (x) => {
        const n = x.console.matching('MEMWORK-VERIFIED').length;
        const s = x.console.matching('MEMWORK-STAT').length;
        x.console.send('verify');
        const line = await x.console.waitLine('MEMWORK-VERIFIED', n + 1);
        // the counters as they are after the pass (memwork reports them right after it)
        await x.console.waitLine('MEMWORK-STAT', s + 1);
        const m = x.console.matching('BALLAST-ALIVE').length;
        x.console.send('alive');
        const alive = (await x.console.waitLine('BALLAST-ALIVE', m + 1)).includes('yes');
        return { name: x.name, line, alive, stat: x.console.stat };
      }),
    );
  }

  /** Polls `f` until it holds; the deadline is a hang guard. */
  async until(f: () => Promise<boolean>, what: string, timeoutMs = 300_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(await f())) {
      if (Date.now() > deadline) throw new Error(`${what}: not seen in ${timeoutMs} ms`);
      await sleep(200);
    }
  }

  async close(): Promise<void> {
    for (const x of this.guests) x.console.close();
    await Promise.all(
      this.children.map(async (c) => {
        if (c.exitCode !== null || c.signalCode !== null) return;
        const gone = new Promise((r) => c.once('exit', r));
        c.kill(c === this.agent ? 'SIGTERM' : 'SIGKILL');
        const t = setTimeout(() => c.kill('SIGKILL'), 20_000);
        await gone;
        clearTimeout(t);
      }),
    );
  }
}
