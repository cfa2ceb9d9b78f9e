// The fleet inventory: a YAML file naming hosts, how to reach them over SSH and
// the agent settings each gets. Settings merge defaults < groups (in the order
// a host lists them) < host; mappings merge key by key, lists and scalars
// replace. Every validation error names the host (or group) and the key.

import { readFileSync } from 'node:fs';
import { homedir, userInfo } from 'node:os';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { DeployError } from './errors.js';

export interface JumpSpec {
  /** How messages name it: an inventory host name or user@address:port. */
  label: string;
  address: string;
  port: number;
  user: string;
  key?: string;
  /** `key:` as the inventory wrote it, when it was relative (resolved against the inventory's folder). */
  keyAsWritten?: string;
  sshAgent?: string;
}

export interface ServiceSpec {
  /** argv of the agent; placeholders already expanded except {release} and {config}. */
  command: string[];
  /** systemd unit name, where systemd runs. */
  unit: string;
  env: Record<string, string>;
}

export interface Timeouts {
  connectMs: number;
  stepMs: number;
  healthMs: number;
}

export interface HostSpec {
  name: string;
  address: string;
  port: number;
  user: string;
  /** Absolute path of a private key file. */
  key?: string;
  /** `key:` as the inventory wrote it, when it was relative (resolved against the inventory's folder). */
  keyAsWritten?: string;
  /** ssh-agent socket path. */
  sshAgent?: string;
  jump?: JumpSpec;
  groups: string[];
  /** Install root on the host: releases/, deploys/, current, data/, log/, run/. */
  prefix: string;
  /** The agent's configuration file, as a mapping. */
  agent: Record<string, unknown>;
  service: ServiceSpec;
  timeouts: Timeouts;
  /** Where the deploy reaches the agent's API on the host (for /healthz). */
  api: { host: string; port: number; token?: string };
}

export interface Inventory {
  source: string;
  hosts: HostSpec[];
  groups: string[];
}

type Obj = Record<string, unknown>;

const SETTING_KEYS = [
  'user',
  'port',
  'key',
  'sshAgent',
  'jump',
  'prefix',
  'agent',
  'service',
  'timeouts',
];
const HOST_KEYS = ['address', 'groups', ...SETTING_KEYS];
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
export const DEFAULT_PREFIX = '/opt/ballast';
export const DEFAULT_API_LISTEN = '127.0.0.1:10810';
export const DEFAULT_COMMAND = ['node', '{release}/bin/ballast', 'agent', '--config', '{config}'];

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Deep merge: mappings merge key by key; anything else in `over` replaces. */
export function mergeSettings(base: Obj, over: Obj): Obj {
  const out: Obj = { ...base };
  for (const [k, v] of Object.entries(over)) {
    const b = out[k];
    out[k] = isObj(b) && isObj(v) ? mergeSettings(b, v) : v;
  }
  return out;
}

/** Replaces {prefix}, {host} and {address} in every string of a YAML value. */
export function expand(v: unknown, vars: Record<string, string>): unknown {
  if (typeof v === 'string') {
    return v.replace(/\{(prefix|host|address)\}/g, (m, name: string) => vars[name] ?? m);
  }
  if (Array.isArray(v)) return v.map((x) => expand(x, vars));
  if (isObj(v)) {
    const out: Obj = {};
    for (const [k, x] of Object.entries(v)) out[k] = expand(x, vars);
    return out;
  }
  return v;
}

/** Parses HOST:PORT, [V6]:PORT, :PORT or PORT into where a client on that host connects. */
export function apiTarget(listen: string): { host: string; port: number } | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]*)):(\d{1,5})$|^(\d{1,5})$/.exec(listen);
  if (!m) return null;
  const port = Number(m[3] ?? m[4]);
  if (port < 1 || port > 65535) return null;
  let host = m[1] ?? m[2] ?? '';
  if (host === '' || host === '0.0.0.0') host = '127.0.0.1';
  if (host === '::') host = '::1';
  return { host, port };
}

class Checker {
  constructor(
    private readonly source: string,
    private readonly where: string,
  ) {}

  fail(key: string, problem: string): never {
    throw new DeployError(
      'DEPLOY_INVENTORY_INVALID',
      `${this.source}: ${this.where}: ${key}: ${problem}`,
    );
  }

  known(o: Obj, allowed: string[], prefix = ''): void {
    for (const k of Object.keys(o)) {
      if (!allowed.includes(k)) {
        this.fail(`${prefix}${k}`, `unknown key (expected one of: ${allowed.join(', ')})`);
      }
    }
  }

  obj(v: unknown, key: string): Obj {
    if (v === undefined || v === null) return {};
    if (!isObj(v)) this.fail(key, 'must be a mapping');
    return v;
  }

  str(v: unknown, key: string): string {
    if (typeof v !== 'string' || v === '') this.fail(key, 'must be a non-empty string');
    return v;
  }

  int(v: unknown, key: string, min: number, max: number): number {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      this.fail(key, `must be a whole number from ${min} to ${max}`);
    }
    return v;
  }

  seconds(v: unknown, key: string, dflt: number): number {
    if (v === undefined) return dflt * 1000;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0 || v > 86400) {
      this.fail(key, 'must be a number of seconds, greater than 0');
    }
    return Math.round(v * 1000);
  }
}

function filePath(v: string, base: string): string {
  if (v === '~') return homedir();
  if (v.startsWith('~/')) return resolve(homedir(), v.slice(2));
  return resolve(base, v);
}

interface Auth {
  key?: string;
  keyAsWritten?: string;
  sshAgent?: string;
}

function auth(c: Checker, s: Obj, base: string, prefix = ''): Auth {
  const out: Auth = {};
  if (s.key !== undefined && s.key !== null) {
    const written = c.str(s.key, `${prefix}key`);
    out.key = filePath(written, base);
    if (!isAbsolute(written) && !written.startsWith('~')) out.keyAsWritten = written;
  }
  if (s.sshAgent !== undefined && s.sshAgent !== null && s.sshAgent !== false) {
    if (s.sshAgent === true) {
      const sock = process.env.SSH_AUTH_SOCK;
      if (!sock) c.fail(`${prefix}sshAgent`, 'is true but SSH_AUTH_SOCK is not set');
      out.sshAgent = sock;
    } else {
      out.sshAgent = filePath(c.str(s.sshAgent, `${prefix}sshAgent`), base);
    }
  }
  if (!out.key && !out.sshAgent) {
    c.fail(
      `${prefix}key`,
      'missing: set key (a private key file) or sshAgent (true or a socket path)',
    );
  }
  return out;
}

/** Validates an inventory document; `source` names it in messages. */
export function parseInventory(doc: unknown, source: string, baseDir: string): Inventory {
  const top: Checker = new Checker(source, '(top level)');
  if (!isObj(doc)) top.fail('(document)', 'must be a mapping with hosts:');
  top.known(doc, ['defaults', 'groups', 'hosts']);
  const defaults = top.obj(doc.defaults, 'defaults');
  const dc: Checker = new Checker(source, 'defaults');
  dc.known(defaults, SETTING_KEYS);

  const groupDocs = top.obj(doc.groups, 'groups');
  const groups = new Map<string, Obj>();
  for (const [g, v] of Object.entries(groupDocs)) {
    const c: Checker = new Checker(source, `group ${g}`);
    if (!NAME.test(g)) c.fail('(name)', 'letters, digits, ".", "_" and "-" only');
    const o = c.obj(v, '(group)');
    c.known(o, SETTING_KEYS);
    groups.set(g, o);
  }

  const hostDocs = top.obj(doc.hosts, 'hosts');
  if (Object.keys(hostDocs).length === 0) top.fail('hosts', 'must name at least one host');

  // Merged settings first, so that a jump host named by another host is known.
  const merged = new Map<string, Obj>();
  for (const [name, v] of Object.entries(hostDocs)) {
    const c: Checker = new Checker(source, `host ${name}`);
    if (!NAME.test(name)) c.fail('(name)', 'letters, digits, ".", "_" and "-" only, at most 63');
    const o = c.obj(v, '(host)');
    c.known(o, HOST_KEYS);
    let s = { ...defaults };
    const memberOf = o.groups === undefined ? [] : o.groups;
    if (!Array.isArray(memberOf)) c.fail('groups', 'must be a list of group names');
    memberOf.forEach((g, i) => {
      if (typeof g !== 'string' || !groups.has(g)) {
        c.fail(`groups[${i}]`, `no group named ${JSON.stringify(g)} under groups:`);
      }
      s = mergeSettings(s, groups.get(g) ?? {});
    });
    const { groups: _g, ...own } = o;
    merged.set(name, mergeSettings(s, own));
  }

  const hosts: HostSpec[] = [];
  for (const [name, s] of merged) {
    const c: Checker = new Checker(source, `host ${name}`);
    const address = c.str(s.address, 'address');
    const port = s.port === undefined ? 22 : c.int(s.port, 'port', 1, 65535);
    const user = s.user === undefined ? userInfo().username : c.str(s.user, 'user');
    const prefix = s.prefix === undefined ? DEFAULT_PREFIX : c.str(s.prefix, 'prefix');
    if (!isAbsolute(prefix) || prefix === '/')
      c.fail('prefix', 'must be an absolute path other than /');
    const a = auth(c, s, baseDir);

    let jump: JumpSpec | undefined;
    if (s.jump !== undefined && s.jump !== null) {
      if (typeof s.jump === 'string') {
        if (s.jump === name) c.fail('jump', 'a host cannot be its own jump host');
        const j = merged.get(s.jump);
        if (!j) c.fail('jump', `no host named ${JSON.stringify(s.jump)} in the inventory`);
        if (j.jump !== undefined && j.jump !== null)
          c.fail('jump', `${s.jump} itself has a jump host; only one hop is supported`);
        const jc: Checker = new Checker(source, `host ${s.jump} (jump host of ${name})`);
        jump = {
          label: s.jump,
          address: jc.str(j.address, 'address'),
          port: j.port === undefined ? 22 : jc.int(j.port, 'port', 1, 65535),
          user: j.user === undefined ? userInfo().username : jc.str(j.user, 'user'),
          ...auth(jc, j, baseDir),
        };
      } else {
        const j = c.obj(s.jump, 'jump');
        c.known(j, ['address', 'port', 'user', 'key', 'sshAgent'], 'jump.');
        const jAddress = c.str(j.address, 'jump.address');
        const jPort = j.port === undefined ? 22 : c.int(j.port, 'jump.port', 1, 65535);
        const jUser = j.user === undefined ? user : c.str(j.user, 'jump.user');
        const jAuth =
          j.key === undefined && j.sshAgent === undefined ? a : auth(c, j, baseDir, 'jump.');
        jump = {
          label: `${jUser}@${jAddress}:${jPort}`,
          address: jAddress,
          port: jPort,
          user: jUser,
          ...jAuth,
        };
      }
    }

    const vars = { prefix, host: name, address };
    const agent = expand(c.obj(s.agent, 'agent'), vars) as Obj;
    if (agent.dataDir === undefined) agent.dataDir = `${prefix}/data`;
    // The agent's sockets default to /run/ballast; a second prefix on the same
    // host would take them over, so any other prefix gets its own.
    if (prefix !== DEFAULT_PREFIX) {
      for (const [part, file] of [
        ['nbd', 'nbd.sock'],
        ['api', 'api.sock'],
      ] as const) {
        const sec = agent[part] === undefined ? {} : agent[part];
        if (isObj(sec) && sec.socket === undefined) {
          sec.socket = `${prefix}/run/${file}`;
          agent[part] = sec;
        }
      }
    }
    const api = c.obj(agent.api, 'agent.api');
    const listenV = api.listen === undefined ? DEFAULT_API_LISTEN : api.listen;
    const first = Array.isArray(listenV) ? listenV[0] : listenV;
    const target =
      typeof first === 'string' || typeof first === 'number' ? apiTarget(String(first)) : null;
    if (!target) {
      c.fail(
        'agent.api.listen',
        'needs a TCP address (HOST:PORT) as its first entry: the rollout checks /healthz there',
      );
    }
    const apiSpec: HostSpec['api'] = { ...target };
    if (typeof api.token === 'string') apiSpec.token = api.token;

    const svc = c.obj(s.service, 'service');
    c.known(svc, ['command', 'unit', 'env'], 'service.');
    let command = DEFAULT_COMMAND;
    if (svc.command !== undefined) {
      if (
        !Array.isArray(svc.command) ||
        svc.command.length === 0 ||
        !svc.command.every((x) => typeof x === 'string' && x !== '')
      ) {
        c.fail('service.command', 'must be a non-empty list of strings (argv)');
      }
      command = svc.command as string[];
    }
    const unit = svc.unit === undefined ? 'ballast-agent' : c.str(svc.unit, 'service.unit');
    if (!/^[A-Za-z0-9@_.-]+$/.test(unit)) c.fail('service.unit', 'not a valid systemd unit name');
    const envDoc = c.obj(svc.env, 'service.env');
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(envDoc)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) c.fail(`service.env.${k}`, 'not a variable name');
      if (typeof v !== 'string' && typeof v !== 'number')
        c.fail(`service.env.${k}`, 'must be a string');
      env[k] = String(expand(String(v), vars));
    }

    const t = c.obj(s.timeouts, 'timeouts');
    c.known(t, ['connect', 'step', 'health'], 'timeouts.');
    const host: HostSpec = {
      name,
      address,
      port,
      user,
      ...a,
      groups: ((hostDocs[name] as Obj).groups as string[] | undefined) ?? [],
      prefix,
      agent,
      service: { command: expand(command, vars) as string[], unit, env },
      timeouts: {
        connectMs: c.seconds(t.connect, 'timeouts.connect', 10),
        stepMs: c.seconds(t.step, 'timeouts.step', 120),
        healthMs: c.seconds(t.health, 'timeouts.health', 30),
      },
      api: apiSpec,
    };
    if (jump) host.jump = jump;
    hosts.push(host);
  }
  return { source, hosts, groups: [...groups.keys()] };
}

export function loadInventory(file: string): Inventory {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new DeployError(
      'DEPLOY_INVENTORY_UNREADABLE',
      `cannot read inventory ${file}: ${(e as Error).message}`,
      { cause: e },
    );
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new DeployError(
      'DEPLOY_INVENTORY_INVALID',
      `${file}: not valid YAML: ${(e as Error).message.split('\n')[0]}`,
    );
  }
  return parseInventory(doc, file, dirname(resolve(file)));
}

/** The hosts of one group (all hosts without a group), in inventory order. */
export function selectHosts(inv: Inventory, group?: string): HostSpec[] {
  if (group === undefined || group === 'all') return inv.hosts;
  if (!inv.groups.includes(group) && !inv.hosts.some((h) => h.name === group)) {
    throw new DeployError(
      'DEPLOY_NO_HOSTS',
      `${inv.source}: no group or host named ${JSON.stringify(group)} (groups: ${inv.groups.join(', ') || 'none'})`,
    );
  }
  const hosts = inv.hosts.filter((h) => h.groups.includes(group) || h.name === group);
  if (hosts.length === 0) {
    throw new DeployError('DEPLOY_NO_HOSTS', `${inv.source}: group ${group} has no hosts`);
  }
  return hosts;
}
