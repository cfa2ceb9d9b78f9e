// What deploy does on one host, as small POSIX sh scripts run over SSH.
//
// Layout under the host's prefix P:
//   P/releases/<release>/         an unpacked release (code + dependencies)
//   P/deploys/<deploy>/           release link, agent.yaml and the `run` script
//   P/current -> deploys/<id>     what the host runs; switched by rename(2), so
//   P/previous -> deploys/<id>    it is always either the old or the new one
//   P/run/agent.pid, P/log/agent.log, P/data/ (the agent's data directory)
// A deploy id is the release id plus a hash of the config and command, so a
// config change is a new deploy of the same release.

import { createHash } from 'node:crypto';
import { stringify as toYaml } from 'yaml';
import { DeployError } from './errors.js';
import type { HostSpec } from './inventory.js';
import type { Release } from './release.js';
import type { ExecOptions, ExecResult, Session } from './ssh.js';

/** Quotes a string for sh. */
export function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export interface Desired {
  id: string;
  releaseId: string;
  version: string;
  config: string;
  run: string;
}

export function desiredFor(host: HostSpec, release: { id: string; version: string }): Desired {
  const P = host.prefix;
  const config =
    `# Ballast agent configuration for ${host.name}; written by ballast deploy.\n` +
    toYaml(host.agent);
  const hash = createHash('sha256')
    .update(JSON.stringify([config, host.service.command, host.service.env]))
    .digest('hex')
    .slice(0, 8);
  const id = `${release.id}.${hash}`;
  const vars: Record<string, string> = {
    release: `${P}/releases/${release.id}`,
    config: `${P}/deploys/${id}/agent.yaml`,
  };
  const argv = host.service.command.map((a) =>
    a.replace(/\{(release|config)\}/g, (m, k: string) => vars[k] ?? m),
  );
  const env = Object.entries(host.service.env)
    .map(([k, v]) => `export ${k}=${shq(v)}\n`)
    .join('');
  const run =
    '#!/bin/sh\n' +
    `# Ballast agent of ${host.name}, deploy ${id}; written by ballast deploy.\n` +
    `export BALLAST_DEPLOY_PREFIX=${shq(P)}\n` +
    `export BALLAST_DEPLOY_ID=${shq(id)}\n` +
    env +
    `cd ${shq(P)}\n` +
    `exec ${argv.map(shq).join(' ')}\n`;
  return { id, releaseId: release.id, version: release.version, config, run };
}

export interface RemoteState {
  current: string | null;
  previous: string | null;
  /** Deploy id of the live agent process (ours, checked by its environment). */
  running: string | null;
  pid: number | null;
  systemd: boolean;
  releasePresent: boolean;
  deployPresent: boolean;
  /** agent.yaml of the current deploy. */
  currentConfig: string | null;
}

/** Release id of a deploy id. */
export function releaseOf(deployId: string | null): string | null {
  if (!deployId) return null;
  const i = deployId.lastIndexOf('.');
  return i > 0 ? deployId.slice(0, i) : deployId;
}

/** Version of a deploy id (`0.1.0-abcdef123456.12345678` → `0.1.0`). */
export function versionOf(deployId: string | null): string | null {
  const r = releaseOf(deployId);
  return r ? r.replace(/-[0-9a-f]{12}$/, '') : null;
}

const OURS = `ours() { [ -n "$1" ] && [ -r "/proc/$1/environ" ] && tr '\\0' '\\n' < "/proc/$1/environ" | grep -qxF "BALLAST_DEPLOY_PREFIX=$P"; }
issystemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
agentpid() {
  if issystemd; then systemctl show -p MainPID --value "$UNIT" 2>/dev/null
  else cat "$P/run/agent.pid" 2>/dev/null; fi
}
`;

const STOP = `if issystemd; then systemctl stop "$UNIT" 2>/dev/null || true
else
  pid=$(agentpid || true)
  if ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    i=0; while ours "$pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  fi
  rm -f "$P/run/agent.pid"
fi`;

/** Starts deploy $ID: a systemd unit where systemd runs, else a process in its own session. */
const START = `set -eu; D="$P/deploys/$ID"
mkdir -p "$P/run" "$P/log" "$P/data"
# QEMU in the kvm group (libvirt's) must reach the NBD socket in run/, whatever the umask.
chmod go+x "$P" "$P/run"
if issystemd; then
  cat > "/etc/systemd/system/$UNIT.service" <<UNIT_EOF
[Unit]
Description=Ballast agent (deploy $ID)
After=network-online.target
[Service]
ExecStart=$D/run
Restart=on-failure
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT_EOF
  systemctl daemon-reload; systemctl enable --quiet "$UNIT"; systemctl restart "$UNIT"; exit 0
fi
echo "=== ballast deploy: starting $ID at $(date -u +%Y-%m-%dT%H:%M:%SZ) ===" >> "$P/log/agent.log"
setsid "$D/run" >> "$P/log/agent.log" 2>&1 < /dev/null &
echo $! > "$P/run/agent.pid.tmp"; mv "$P/run/agent.pid.tmp" "$P/run/agent.pid"`;

/** Removes deploys that neither `current` nor `previous` names, and releases no deploy uses. */
const PRUNE = `cur=$(readlink "$P/current" 2>/dev/null || true); prev=$(readlink "$P/previous" 2>/dev/null || true)
keepd=" \${cur#deploys/} \${prev#deploys/} "; keepr=" "
for d in "$P"/deploys/*/; do
  [ -d "$d" ] || continue; id=$(basename "$d")
  case "$keepd" in *" $id "*) keepr="$keepr$(readlink "$d/release" | sed 's|.*/||') ";; *) rm -rf "$d";; esac
done
for r in "$P"/releases/*/; do
  [ -d "$r" ] || continue; id=$(basename "$r")
  case "$keepr" in *" $id "*) ;; *) rm -rf "$r";; esac
done`;

function header(host: HostSpec): string {
  return `P=${shq(host.prefix)}; UNIT=${shq(host.service.unit)}\n${OURS}`;
}

/**
 * A script for POSIX sh, whatever the login shell that sshd starts is (zsh, fish,
 * ...): the remote side runs `exec /bin/sh -c 'SCRIPT'`.
 */
export function posix(script: string): string {
  return `exec /bin/sh -c ${shq(script)}`;
}

/** The deploy-side view of one host. */
export class Remote {
  constructor(
    readonly s: Session,
    readonly host: HostSpec,
  ) {}

  private get stepMs(): number {
    return this.host.timeouts.stepMs;
  }

  private run(script: string, step: string, timeoutMs = this.stepMs): Promise<string> {
    return this.s.run(posix(script), step, timeoutMs);
  }

  private exec(script: string, opts: ExecOptions): Promise<ExecResult> {
    return this.s.exec(posix(script), opts);
  }

  /**
   * Takes the host's deploy lock (flock on PREFIX/.deploy.lock, held by a remote
   * process for as long as this session lasts), so that two deploys never work on
   * one host at once. Returns the function that lets it go.
   */
  async lock(): Promise<() => void> {
    const P = shq(this.host.prefix);
    const got = await this.s.hold(
      posix(
        `mkdir -p ${P} && exec flock -n -E 75 ${P}/.deploy.lock sh -c 'echo locked; exec cat >/dev/null'`,
      ),
      'locked',
      'lock',
      this.stepMs,
    );
    if (typeof got === 'function') return got;
    throw new DeployError(
      got === 75 ? 'DEPLOY_HOST_BUSY' : 'DEPLOY_STEP_FAILED',
      got === 75
        ? `${this.host.name}: another deploy is working on this host (it holds ${this.host.prefix}/.deploy.lock)`
        : `${this.host.name}: cannot take the deploy lock (flock exited ${got})`,
      { host: this.host.name },
    );
  }

  /** What the host has and runs; `want` asks whether that release and deploy are present. */
  async probe(want?: { id?: string; releaseId?: string }): Promise<RemoteState> {
    const R = shq(want?.releaseId ?? '-');
    const ID = shq(want?.id ?? '-');
    const out = await this.run(
      `${header(this.host)}R=${R}; ID=${ID}
cur=$(readlink "$P/current" 2>/dev/null || true); echo "current=\${cur#deploys/}"
prev=$(readlink "$P/previous" 2>/dev/null || true); echo "previous=\${prev#deploys/}"
if issystemd; then echo systemd=1; else echo systemd=0; fi
pid=$(agentpid || true)
if ours "$pid"; then echo "pid=$pid"; echo "running=$(tr '\\0' '\\n' < "/proc/$pid/environ" | sed -n 's/^BALLAST_DEPLOY_ID=//p')"; fi
if [ -f "$P/releases/$R/.ballast-release" ]; then echo release_present=1; fi
if [ -f "$P/deploys/$ID/run" ]; then echo deploy_present=1; fi
if [ -n "$cur" ] && [ -f "$P/$cur/agent.yaml" ]; then echo "config=$(base64 -w0 < "$P/$cur/agent.yaml")"; fi
`,
      'probe',
    );
    const kv = new Map<string, string>();
    for (const line of out.split('\n')) {
      const i = line.indexOf('=');
      if (i > 0) kv.set(line.slice(0, i), line.slice(i + 1));
    }
    const cfg = kv.get('config');
    return {
      current: kv.get('current') || null,
      previous: kv.get('previous') || null,
      running: kv.get('running') || null,
      pid: kv.get('pid') ? Number(kv.get('pid')) : null,
      systemd: kv.get('systemd') === '1',
      releasePresent: kv.get('release_present') === '1',
      deployPresent: kv.get('deploy_present') === '1',
      currentConfig: cfg ? Buffer.from(cfg, 'base64').toString('utf8') : null,
    };
  }

  /** Uploads, checks and unpacks a release unless the host already has it. */
  async installRelease(release: Release, log: (msg: string) => void): Promise<void> {
    const P = this.host.prefix;
    const R = release.id;
    const incoming = `${P}/incoming/${R}.tar.gz`;
    await this.run(`mkdir -p ${shq(`${P}/incoming`)} ${shq(`${P}/releases`)}`, 'mkdir');
    log(`upload ${(release.size / 1048576).toFixed(1)} MiB over SFTP`);
    await this.s.upload(release.tarball, incoming, this.stepMs);
    const node = this.node();
    const smoke =
      "const fs=require('fs'),r=process.argv[1];" +
      "if(fs.existsSync(r+'/build/Release/ballast_native.node'))require(r+'/build/Release/ballast_native.node');" +
      "if(fs.existsSync(r+'/node_modules/better-sqlite3'))new(require(r+'/node_modules/better-sqlite3'))(':memory:').close();";
    const r = await this.exec(
      `set -eu; P=${shq(P)}; R=${shq(R)}; T="$P/releases/.tmp-$R-$$"; F="$P/incoming/$R.tar.gz"
sum=$(sha256sum "$F" | cut -d' ' -f1)
if [ "$sum" != ${shq(release.sha256)} ]; then rm -f "$F"; echo "$sum"; exit 4; fi
rm -rf "$T"; mkdir -p "$T"
tar -xzf "$F" -C "$T"
if ! ${shq(node)} -e ${shq(smoke)} "$T" >&2; then rm -rf "$T"; exit 3; fi
echo "$R" > "$T/.ballast-release"
rm -rf "$P/releases/$R"; mv "$T" "$P/releases/$R"
rm -f "$P/incoming/$R.tar.gz"`,
      { timeoutMs: this.stepMs, step: 'unpack' },
    );
    if (r.code === 4) {
      throw new DeployError(
        'DEPLOY_CHECKSUM_MISMATCH',
        `${this.host.name}: the uploaded release has sha256 ${r.stdout.trim()}, expected ${release.sha256}`,
        { host: this.host.name },
      );
    }
    if (r.code !== 0) {
      throw new DeployError(
        r.code === 3 ? 'DEPLOY_INSTALL_FAILED' : 'DEPLOY_STEP_FAILED',
        `${this.host.name}: ${r.code === 3 ? `the release's dependencies do not load with ${node} there` : 'unpacking failed'}: ${r.stderr.trim().split('\n').slice(-3).join(' / ')}`,
        { host: this.host.name },
      );
    }
    log('checksum ok, unpacked');
  }

  /** The Node the agent runs with (for the install check). */
  private node(): string {
    const first = this.host.service.command[0] ?? 'node';
    return /(^|\/)node(js)?$/.test(first) ? first : 'node';
  }

  async writeDeploy(d: Desired): Promise<void> {
    const b64 = (s: string) => shq(Buffer.from(s).toString('base64'));
    await this.run(
      `set -eu; P=${shq(this.host.prefix)}; ID=${shq(d.id)}; R=${shq(d.releaseId)}
D="$P/deploys/$ID"; T="$P/deploys/.tmp-$ID-$$"
if [ -f "$D/run" ]; then exit 0; fi
rm -rf "$T"; mkdir -p "$T" "$P/data" "$P/run" "$P/log"
printf %s ${b64(d.config)} | base64 -d > "$T/agent.yaml"
printf %s ${b64(d.run)} | base64 -d > "$T/run"; chmod 755 "$T/run"
ln -s "../../releases/$R" "$T/release"
rm -rf "$D"; mv "$T" "$D"`,
      'write config',
    );
  }

  async stop(): Promise<void> {
    await this.run(`${header(this.host)}${STOP}`, 'stop agent');
  }

  /**
   * Stops the agent and keeps it stopped across reboots (the systemd unit is
   * disabled; `apply` or `rollback` starts it again). Says whether one ran.
   */
  async stopAndDisable(): Promise<boolean> {
    const out = await this.run(
      `${header(this.host)}pid=$(agentpid || true)
if ours "$pid"; then echo was=running; fi
${STOP}
if issystemd; then systemctl disable --quiet "$UNIT" 2>/dev/null || true; fi`,
      'stop agent',
    );
    return out.includes('was=running');
  }

  /**
   * Removes what deploy installed: the agent stopped, its systemd unit, the
   * releases, deploys, links, logs and run directory under the prefix. The rest
   * (the data directory, pools under the prefix) stays unless `purge`, which
   * removes the whole prefix; nothing outside it is touched.
   */
  async uninstall(purge: boolean): Promise<void> {
    await this.run(
      `${header(this.host)}${STOP}
if issystemd; then
  systemctl disable --quiet "$UNIT" 2>/dev/null || true
  rm -f "/etc/systemd/system/$UNIT.service"; systemctl daemon-reload || true
fi
rm -rf "$P/releases" "$P/deploys" "$P/incoming" "$P/run" "$P/log" "$P/current" "$P/previous"
rm -f "$P/.current.tmp" "$P/.previous.tmp" "$P/.deploy.lock"
${purge ? 'rm -rf "$P"' : 'rmdir "$P" 2>/dev/null || true'}`,
      'uninstall',
    );
  }

  /**
   * Stops the agent and starts the one of deploy `id`, in one round trip. It runs
   * from its deploy directory, not through `current`, which may still name the old one.
   */
  async restart(id: string): Promise<void> {
    await this.run(`${header(this.host)}${STOP}\nID=${shq(id)}\n${START}`, 'restart agent');
  }

  /**
   * Points `current` at a deploy (and `previous` at what current was). Each link is
   * replaced by rename(2), so it names the old deploy or the new one, never neither.
   * With `prune`, deploys and releases that neither link names are removed.
   */
  async switchTo(id: string, prune = false): Promise<void> {
    await this.run(
      `set -eu; P=${shq(this.host.prefix)}; ID=${shq(id)}
[ -f "$P/deploys/$ID/run" ]
old=$(readlink "$P/current" 2>/dev/null || true)
if [ -n "$old" ] && [ "$old" != "deploys/$ID" ]; then ln -sfn "$old" "$P/.previous.tmp"; mv -T "$P/.previous.tmp" "$P/previous"; fi
ln -sfn "deploys/$ID" "$P/.current.tmp"; mv -T "$P/.current.tmp" "$P/current"
${prune ? PRUNE : ''}`,
      'switch current',
    );
  }

  /** The agent's log since its last start (or the last `lines` lines of the journal). */
  async logTail(lines: number, sinceStart = false): Promise<string> {
    const n = Math.max(1, Math.floor(lines));
    const pidfileTail = sinceStart
      ? `awk '/^=== ballast deploy: starting /{b=""} {b=b $0 "\\n"} END{printf "%s", b}' "$P/log/agent.log" | tail -n ${n}`
      : `tail -n ${n} "$P/log/agent.log"`;
    const r = await this.exec(
      `${header(this.host)}
if issystemd; then journalctl -u "$UNIT" -n ${n} --no-pager; exit $?; fi
[ -f "$P/log/agent.log" ] || exit 0
${pidfileTail}`,
      { timeoutMs: this.stepMs, step: 'logs' },
    );
    return r.stdout;
  }
}
