// status, exec and logs over the selected hosts.

import { DeployError } from './errors.js';
import type { HostSpec } from './inventory.js';
import { forEachHost, type Outcome } from './pool.js';
import { type Remote, shq, versionOf } from './remote.js';
import { checkHealth, type RunContext, withRemote } from './rollout.js';

export interface HostStatus {
  host: string;
  address: string;
  deploy: string | null;
  version: string | null;
  previous: string | null;
  agent: 'running' | 'stopped';
  pid: number | null;
  manager: 'systemd' | 'pidfile';
  health: string;
  /** Version the agent itself reports on /healthz. */
  reportedVersion: string | null;
  devices: number | null;
  reservations: number | null;
}

function count(v: unknown): number | null {
  if (Array.isArray(v)) return v.length;
  if (typeof v === 'number') return v;
  if (v && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    for (const k of ['count', 'total']) if (typeof o[k] === 'number') return o[k] as number;
  }
  return null;
}

/** GET a JSON API path; a 401 is retried with the token the agent keeps in its data dir. */
async function apiJson(r: Remote, path: string, token: { value?: string; tried: boolean }) {
  const { host, port } = r.host.api;
  let res = await r.s.httpGet(host, port, path, 5000, token.value);
  if (res.status === 401 && !token.tried) {
    token.tried = true;
    const api = (r.host.agent.api ?? {}) as Record<string, unknown>;
    const file =
      typeof api.tokenFile === 'string'
        ? api.tokenFile
        : `${String(r.host.agent.dataDir)}/api-token`;
    const t = await r.s.exec(`cat ${shq(file)}`, { timeoutMs: 5000, step: 'read token' });
    if (t.code === 0 && t.stdout.trim()) {
      token.value = t.stdout.trim();
      res = await r.s.httpGet(host, port, path, 5000, token.value);
    }
  }
  if (res.status !== 200) return null;
  try {
    return JSON.parse(res.body) as Record<string, unknown>;
  } catch {
    return null;
  }
}

/** Devices with a persistent reservation held, from each device's /pr; null if the agent has none. */
async function reservations(
  r: Remote,
  devices: { name?: unknown }[],
  token: { value?: string; tried: boolean },
): Promise<number | null> {
  let n = 0;
  for (const d of devices.slice(0, 500)) {
    if (typeof d.name !== 'string') continue;
    const pr = await apiJson(r, `/v1/devices/${encodeURIComponent(d.name)}/pr`, token).catch(
      () => null,
    );
    if (!pr) return null;
    if (pr.reservation) n++;
  }
  return n;
}

async function statusHost(r: Remote): Promise<HostStatus> {
  const st = await r.probe();
  const h = st.running ? await checkHealth(r) : null;
  const out: HostStatus = {
    host: r.host.name,
    address: `${r.host.address}:${r.host.port}`,
    deploy: st.current,
    version: versionOf(st.current),
    previous: st.previous,
    agent: st.running ? 'running' : 'stopped',
    pid: st.pid,
    manager: st.systemd ? 'systemd' : 'pidfile',
    health: h ? (h.ok ? 'ok' : h.detail) : '-',
    reportedVersion: h?.version ?? null,
    devices: null,
    reservations: null,
  };
  if (st.running && st.running !== st.current) {
    out.health = `${out.health} (runs ${st.running}, not current)`;
  }
  if (h?.ok) {
    const token: { value?: string; tried: boolean } = { tried: false };
    if (r.host.api.token) token.value = r.host.api.token;
    const s = await apiJson(r, '/v1/status', token).catch(() => null);
    out.devices = count(s?.devices);
    out.reservations = count(s?.reservations);
    const list = await apiJson(r, '/v1/devices', token).catch(() => null);
    if (out.devices === null) out.devices = count(list?.devices);
    if (out.reservations === null && Array.isArray(list?.devices)) {
      out.reservations = await reservations(r, list.devices as { name?: unknown }[], token);
    }
  }
  return out;
}

export function status(ctx: RunContext): Promise<Outcome<HostStatus>[]> {
  return forEachHost(
    ctx.hosts,
    {
      parallel: Math.max(ctx.parallel, ctx.hosts.length),
      stopOnFailure: false,
      signal: ctx.signal,
    },
    (h) => withRemote(h, ctx.knownHosts, statusHost),
  );
}

export interface ExecHostResult {
  code: number;
  signal?: string;
}

/** Splits a byte stream into lines and hands each complete one on. */
export function lineSplitter(emit: (line: string) => void): {
  push: (b: Buffer) => void;
  end: () => void;
} {
  let rest = '';
  return {
    push(b) {
      const parts = (rest + b.toString('utf8')).split('\n');
      rest = parts.pop() ?? '';
      for (const p of parts) emit(p);
    },
    end() {
      if (rest !== '') emit(rest);
      rest = '';
    },
  };
}

export function execAll(
  ctx: RunContext,
  command: string,
  out: (host: string, stream: 'stdout' | 'stderr', line: string) => void,
  timeoutMs?: number,
): Promise<Outcome<ExecHostResult>[]> {
  return forEachHost(
    ctx.hosts,
    { parallel: ctx.parallel, stopOnFailure: false, signal: ctx.signal },
    (h: HostSpec) =>
      withRemote(h, ctx.knownHosts, async (r) => {
        const o = lineSplitter((l) => out(h.name, 'stdout', l));
        const e = lineSplitter((l) => out(h.name, 'stderr', l));
        const res = await r.s.exec(command, {
          timeoutMs: timeoutMs ?? h.timeouts.stepMs,
          step: 'exec',
          onStdout: o.push,
          onStderr: e.push,
        });
        o.end();
        e.end();
        const x: ExecHostResult = { code: res.code };
        if (res.signal) x.signal = res.signal;
        return x;
      }),
  );
}

export function logs(ctx: RunContext, lines: number): Promise<Outcome<string>[]> {
  return forEachHost(
    ctx.hosts,
    {
      parallel: Math.max(ctx.parallel, ctx.hosts.length),
      stopOnFailure: false,
      signal: ctx.signal,
    },
    (h) => withRemote(h, ctx.knownHosts, (r) => r.logTail(lines)),
  );
}

export function failedHosts<T>(results: Outcome<T>[]): string[] {
  return results.filter((o) => o.status !== 'ok').map((o) => o.host);
}

export function assertAllOk<T>(results: Outcome<T>[], what: string): void {
  const bad = failedHosts(results);
  if (bad.length) {
    throw new DeployError('DEPLOY_HOSTS_FAILED', `${what} failed on ${bad.join(', ')}`);
  }
}
