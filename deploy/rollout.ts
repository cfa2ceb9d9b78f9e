// plan, apply and rollback over the selected hosts.
//
// apply, per host: probe; upload and unpack the release unless present; write
// the deploy (config + run script); stop the old agent, start the new one from
// its deploy directory and wait for /healthz; only then switch `current`
// (rename, atomic). A failure or an interrupt before the switch stops the new
// agent and starts the old one again, so a host is on the old release or the
// new one, never between. Rolling: one host at a time unless --parallel, and
// no host is started after one fails.

import { formatDiff } from './diff.js';
import { DeployError, describeError, isDeployError } from './errors.js';
import type { HostSpec } from './inventory.js';
import type { KnownHosts } from './known-hosts.js';
import { forEachHost, type Outcome } from './pool.js';
import type { Release } from './release.js';
import { type Desired, desiredFor, Remote, type RemoteState, versionOf } from './remote.js';
import { Session } from './ssh.js';

export interface RunContext {
  hosts: HostSpec[];
  knownHosts: KnownHosts;
  parallel: number;
  /** Per-host progress lines. */
  progress: (host: string, msg: string) => void;
  signal: AbortSignal;
}

export async function withRemote<T>(
  host: HostSpec,
  kh: KnownHosts,
  fn: (r: Remote) => Promise<T>,
): Promise<T> {
  const s = await Session.connect(host, kh);
  try {
    return await fn(new Remote(s, host));
  } finally {
    s.close();
  }
}

/** Runs fn holding the host's deploy lock. */
async function locked<T>(r: Remote, fn: () => Promise<T>): Promise<T> {
  const unlock = await r.lock();
  try {
    return await fn();
  } finally {
    unlock();
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface Health {
  ok: boolean;
  version?: string;
  detail: string;
}

/** At least this long for the previous deploy to come back healthy after a failed one. */
const RESTORE_HEALTH_MS = 30_000;

/** One GET /healthz through the SSH session. */
export async function checkHealth(r: Remote, timeoutMs = 3000): Promise<Health> {
  const { host, port, token } = r.host.api;
  try {
    const res = await r.s.httpGet(host, port, '/healthz', timeoutMs, token);
    let body: { status?: string; version?: string } = {};
    try {
      body = JSON.parse(res.body) as typeof body;
    } catch {}
    const ok = res.status === 200 && (body.status === undefined || body.status === 'ok');
    const h: Health = {
      ok,
      detail: ok ? 'ok' : `HTTP ${res.status} ${res.body.trim().slice(0, 200)}`,
    };
    if (typeof body.version === 'string') h.version = body.version;
    return h;
  } catch (e) {
    return { ok: false, detail: (e as Error).message };
  }
}

function interrupted(host: string): DeployError {
  return new DeployError('DEPLOY_INTERRUPTED', `${host}: interrupted`, { host });
}

/** Waits until the agent of deploy `id` answers /healthz (with `version`, if it reports one). */
async function waitHealthy(
  r: Remote,
  id: string,
  version: string | null,
  signal: AbortSignal | null,
  healthMs = r.host.timeouts.healthMs,
): Promise<void> {
  const deadline = Date.now() + healthMs;
  let last = 'no answer yet';
  let probed = 0;
  for (;;) {
    if (signal?.aborted) throw interrupted(r.host.name);
    const h = await checkHealth(r);
    if (h.ok) {
      if (!version || !h.version || h.version === version) return;
      last = `it reports version ${h.version}, expected ${version}`;
    } else {
      last = h.detail;
    }
    // Is it still running? Asked about once a second: each question is a round trip.
    const st = Date.now() - probed >= 1000 ? await r.probe() : null;
    if (st) probed = Date.now();
    if (st && st.running !== id) {
      const tail = (await r.logTail(8, true).catch(() => '')).trim();
      throw new DeployError(
        'DEPLOY_HEALTH_FAILED',
        `${r.host.name}: the agent of ${id} exited before it was healthy` +
          (tail ? `; its log ends:\n    ${tail.split('\n').join('\n    ')}` : ''),
        { host: r.host.name },
      );
    }
    if (Date.now() > deadline) {
      throw new DeployError(
        'DEPLOY_HEALTH_FAILED',
        `${r.host.name}: /healthz on ${r.host.api.host}:${r.host.api.port} not healthy within ${Math.round(healthMs / 1000)} s (${last}); ` +
          `\`ballast deploy logs -g ${r.host.name}\` shows the agent's log, and timeouts.health gives a slow host longer`,
        { host: r.host.name },
      );
    }
    await sleep(300);
  }
}

// ---------------------------------------------------------------- plan

export type Action = 'none' | 'install' | 'upgrade' | 'reconfigure' | 'restart';

export interface HostPlan {
  host: string;
  action: Action;
  current: { deploy: string | null; version: string | null };
  desired: { deploy: string; version: string };
  upload: boolean;
  configDiff: string[];
  agent: { running: string | null; pid: number | null; manager: 'systemd' | 'pidfile' };
}

function decide(st: RemoteState, d: Desired): Action {
  if (st.current === d.id) return st.running === d.id ? 'none' : 'restart';
  if (!st.current) return 'install';
  return versionOf(st.current) === d.version && st.current.startsWith(`${d.releaseId}.`)
    ? 'reconfigure'
    : 'upgrade';
}

async function planHost(r: Remote, release: Release): Promise<HostPlan> {
  const d = desiredFor(r.host, release);
  const st = await r.probe(d);
  return {
    host: r.host.name,
    action: decide(st, d),
    current: { deploy: st.current, version: versionOf(st.current) },
    desired: { deploy: d.id, version: d.version },
    upload: !st.releasePresent,
    configDiff: formatDiff(st.currentConfig ?? '', d.config),
    agent: { running: st.running, pid: st.pid, manager: st.systemd ? 'systemd' : 'pidfile' },
  };
}

export function plan(ctx: RunContext, release: Release): Promise<Outcome<HostPlan>[]> {
  return forEachHost(
    ctx.hosts,
    {
      parallel: Math.max(ctx.parallel, ctx.hosts.length),
      stopOnFailure: false,
      signal: ctx.signal,
    },
    (h) => withRemote(h, ctx.knownHosts, (r) => planHost(r, release)),
  );
}

// ---------------------------------------------------------------- apply

export interface HostResult {
  host: string;
  result: 'unchanged' | 'deployed' | 'rolled back';
  deploy: string;
  previous: string | null;
}

/**
 * Brings back the agent of `old` after a new one could not take over; `old` null
 * means there was none, and the host is left stopped.
 */
async function restoreOld(
  r: Remote,
  old: string | null,
  say: (m: string) => void,
): Promise<string> {
  if (!old) {
    await r.stop();
    say('no previous deploy: left stopped');
    return 'left stopped (no previous deploy)';
  }
  say(`rolling back: starting ${old}`);
  await r.restart(old);
  try {
    // A short timeouts.health judges the new deploy; the old one was healthy before, and
    // giving up on it early would leave the host without an agent.
    await waitHealthy(r, old, null, null, Math.max(r.host.timeouts.healthMs, RESTORE_HEALTH_MS));
  } catch (e) {
    say(`the previous deploy did not come back healthy: ${describeError(e)}`);
    return `restarted ${old}, but it is not healthy`;
  }
  say(`rolled back to ${old}; healthy`);
  return `rolled back to ${old}`;
}

/**
 * After the new agent failed to take over: brings back `old` and returns the failure to
 * throw, its message ending with what became of the host.
 */
async function restoredAfter(
  e: unknown,
  r: Remote,
  old: string | null,
  say: (m: string) => void,
): Promise<DeployError> {
  say(`failed: ${describeError(e)}`);
  const what = await restoreOld(r, old, say).catch(
    (e2: unknown) => `could not restore ${old ?? 'it'}: ${describeError(e2)}`,
  );
  return new DeployError(
    isDeployError(e) ? e.code : 'DEPLOY_STEP_FAILED',
    `${(e as Error).message}\n  ${r.host.name}: ${what}`,
    { host: r.host.name, cause: e },
  );
}

async function applyHost(
  r: Remote,
  release: Release,
  signal: AbortSignal,
  say: (m: string) => void,
): Promise<HostResult> {
  const d = desiredFor(r.host, release);
  const st = await r.probe(d);
  if (st.current === d.id && st.running === d.id) {
    const h = await checkHealth(r);
    if (h.ok) {
      say(`unchanged (${d.id}, healthy)`);
      return { host: r.host.name, result: 'unchanged', deploy: d.id, previous: st.previous };
    }
    say(`current deploy is running but not healthy (${h.detail}); restarting it`);
  }
  if (signal.aborted) throw interrupted(r.host.name);
  if (st.releasePresent) say(`release ${d.releaseId} already present`);
  else await r.installRelease(release, say);
  await r.writeDeploy(d);
  if (signal.aborted) throw interrupted(r.host.name);

  // From here the host's service changes: any failure restores the old agent.
  const old = st.current !== d.id ? st.current : null;
  try {
    if (st.running) say(`stopping ${st.running} (pid ${st.pid})`);
    say(`starting ${d.id} (${st.systemd ? `systemd unit ${r.host.service.unit}` : 'pidfile'})`);
    await r.restart(d.id);
    say(`waiting for /healthz on ${r.host.api.host}:${r.host.api.port}`);
    await waitHealthy(r, d.id, d.version, signal);
  } catch (e) {
    throw await restoredAfter(e, r, old, say);
  }
  await r.switchTo(d.id, true);
  say(`current -> ${d.id}`);
  say('done, healthy');
  return { host: r.host.name, result: 'deployed', deploy: d.id, previous: old ?? st.previous };
}

/**
 * Runs fn on each host holding its deploy lock, rolling: no host is started after one
 * fails or after an interrupt.
 */
function rolling(
  ctx: RunContext,
  fn: (r: Remote, say: (m: string) => void) => Promise<HostResult>,
): Promise<Outcome<HostResult>[]> {
  return forEachHost(
    ctx.hosts,
    { parallel: ctx.parallel, stopOnFailure: true, signal: ctx.signal },
    (h) => {
      const say = (m: string) => ctx.progress(h.name, m);
      say('connecting');
      return withRemote(h, ctx.knownHosts, (r) => locked(r, () => fn(r, say)));
    },
  );
}

export function apply(ctx: RunContext, release: Release): Promise<Outcome<HostResult>[]> {
  return rolling(ctx, (r, say) => applyHost(r, release, ctx.signal, say));
}

// ---------------------------------------------------------------- rollback

async function rollbackHost(
  r: Remote,
  to: string | undefined,
  signal: AbortSignal,
  say: (m: string) => void,
): Promise<HostResult> {
  const st = await r.probe();
  const target = to ?? st.previous;
  if (!target || target === st.current) {
    throw new DeployError(
      'DEPLOY_NO_PREVIOUS',
      `${r.host.name}: no previous deploy to go back to (current: ${st.current ?? 'none'}); ` +
        'an apply that changes the release or the agent config keeps the deploy before it',
      { host: r.host.name },
    );
  }
  const present = await r.probe({ id: target });
  if (!present.deployPresent) {
    throw new DeployError(
      'DEPLOY_NO_PREVIOUS',
      `${r.host.name}: deploy ${target} is not on the host (it may have been pruned)`,
      { host: r.host.name },
    );
  }
  if (signal.aborted) throw interrupted(r.host.name);
  try {
    say(`stopping ${st.running ?? 'nothing running'}, starting ${target}`);
    await r.restart(target);
    await waitHealthy(r, target, null, signal);
  } catch (e) {
    throw await restoredAfter(e, r, st.current, say);
  }
  await r.switchTo(target);
  say(`current -> ${target}`);
  return { host: r.host.name, result: 'rolled back', deploy: target, previous: st.current };
}

export function rollback(ctx: RunContext, to?: string): Promise<Outcome<HostResult>[]> {
  return rolling(ctx, (r, say) => rollbackHost(r, to, ctx.signal, say));
}

// ---------------------------------------------------------------- stop, uninstall

export interface StopResult {
  host: string;
  result: 'stopped' | 'was not running' | 'uninstalled';
}

/** Stops each host's agent (and keeps it stopped); all hosts, not one at a time. */
export function stopAgents(ctx: RunContext): Promise<Outcome<StopResult>[]> {
  return forEachHost(
    ctx.hosts,
    { parallel: Math.max(ctx.parallel, 1), stopOnFailure: false, signal: ctx.signal },
    (h) =>
      withRemote(h, ctx.knownHosts, (r) =>
        locked(r, async () => {
          const was = await r.stopAndDisable();
          ctx.progress(h.name, was ? 'agent stopped' : 'no agent was running');
          return { host: h.name, result: was ? 'stopped' : 'was not running' } as StopResult;
        }),
      ),
  );
}

/** Removes the agent from each host; its data directory too with `purge`. */
export function uninstall(ctx: RunContext, purge: boolean): Promise<Outcome<StopResult>[]> {
  return forEachHost(
    ctx.hosts,
    { parallel: Math.max(ctx.parallel, 1), stopOnFailure: false, signal: ctx.signal },
    (h) =>
      withRemote(h, ctx.knownHosts, async (r) => {
        // The lock file lives in the prefix, which goes: take it, then remove.
        const unlock = await r.lock();
        try {
          await r.uninstall(purge);
        } finally {
          unlock();
        }
        ctx.progress(
          h.name,
          `uninstalled${purge ? `, ${h.prefix} removed` : `; ${h.prefix}/data and the pools kept (--purge removes ${h.prefix})`}`,
        );
        return { host: h.name, result: 'uninstalled' } as StopResult;
      }),
  );
}
