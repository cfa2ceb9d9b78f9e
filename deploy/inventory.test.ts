import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import type { DeployError } from './errors.js';
import {
  apiTarget,
  expand,
  loadInventory,
  mergeSettings,
  parseInventory,
  selectHosts,
} from './inventory.js';

const inv = (yaml: string) => parseInventory(parse(yaml), 'inv.yaml', '/etc/fleet');

function errorOf(yaml: string): DeployError {
  try {
    inv(yaml);
  } catch (e) {
    return e as DeployError;
  }
  throw new Error('no error');
}

const FLEET = `
defaults:
  user: ops
  key: keys/fleet
  prefix: /opt/ballast
  timeouts: { connect: 5 }
  agent:
    nbd: { listen: 127.0.0.1:10809 }
    api: { listen: 127.0.0.1:10810 }
    pools: [{ name: default, path: "{prefix}/pools/default" }]
    cluster: { endpoints: [http://10.0.0.1:2379] }
groups:
  east:
    user: east-ops
    agent:
      cluster: { endpoints: [http://10.1.0.1:2379, http://10.1.0.2:2379] }
  ssd:
    agent:
      pools: [{ name: fast, path: /srv/fast, media: ssd }]
      limits: { maxInFlight: 128 }
hosts:
  kvm1:
    address: 10.1.0.11
    groups: [east, ssd]
    agent:
      api: { token: abcdefghijklmnopq }
  kvm2:
    address: 10.1.0.12
    port: 2222
    groups: [east]
    user: root
    jump: kvm1
    service: { env: { NODE_OPTIONS: --max-old-space-size=256 } }
  lab:
    address: lab.example
    sshAgent: /run/agent.sock
    prefix: /var/tmp/ballast
    timeouts: { health: 2.5 }
    agent:
      api: { listen: ":20810" }
`;

describe('inventory merging', () => {
  const fleet = inv(FLEET);
  const host = (n: string) => fleet.hosts.find((h) => h.name === n)!;

  it('keeps the hosts in file order, with their groups', () => {
    expect(fleet.hosts.map((h) => h.name)).toEqual(['kvm1', 'kvm2', 'lab']);
    expect(host('kvm1').groups).toEqual(['east', 'ssd']);
    expect(fleet.groups).toEqual(['east', 'ssd']);
  });

  it('merges defaults < groups (in the order listed) < host', () => {
    const k1 = host('kvm1');
    expect(k1.user).toBe('east-ops'); // group over defaults
    expect(host('kvm2').user).toBe('root'); // host over group
    expect(host('lab').user).toBe('ops'); // defaults
    expect(k1.agent.cluster).toEqual({
      endpoints: ['http://10.1.0.1:2379', 'http://10.1.0.2:2379'],
    });
    // lists replace, mappings merge key by key
    expect(k1.agent.pools).toEqual([{ name: 'fast', path: '/srv/fast', media: 'ssd' }]);
    expect(k1.agent.api).toEqual({ listen: '127.0.0.1:10810', token: 'abcdefghijklmnopq' });
    expect(k1.agent.limits).toEqual({ maxInFlight: 128 });
    expect(k1.api).toEqual({ host: '127.0.0.1', port: 10810, token: 'abcdefghijklmnopq' });
  });

  it('expands {prefix}, {host} and {address}, and puts the data directory under the prefix', () => {
    expect(host('lab').agent.pools).toEqual([
      { name: 'default', path: '/var/tmp/ballast/pools/default' },
    ]);
    expect(host('lab').agent.dataDir).toBe('/var/tmp/ballast/data');
    expect(host('kvm2').agent.dataDir).toBe('/opt/ballast/data');
    expect(expand({ a: ['{host}@{address}', '{other}'] }, { host: 'h', address: 'a' })).toEqual({
      a: ['h@a', '{other}'],
    });
  });

  it('resolves keys against the inventory directory, and jump hosts by name', () => {
    expect(host('kvm1').key).toBe('/etc/fleet/keys/fleet');
    expect(host('lab').sshAgent).toBe('/run/agent.sock');
    expect(host('kvm2').jump).toEqual({
      label: 'kvm1',
      address: '10.1.0.11',
      port: 22,
      user: 'east-ops',
      key: '/etc/fleet/keys/fleet',
      keyAsWritten: 'keys/fleet',
    });
    expect(host('kvm2').port).toBe(2222);
    // Kept so that an unreadable key's message can say where it was looked for.
    expect(host('kvm1').keyAsWritten).toBe('keys/fleet');
  });

  it('gives a host whose prefix is not the default its own agent sockets', () => {
    const two = inv(`
defaults: { key: /k }
hosts:
  a: { address: 10.0.0.1 }
  b: { address: 10.0.0.1, prefix: /opt/ballast-b }
  c: { address: 10.0.0.1, prefix: /srv/c, agent: { api: { socket: /run/c-api.sock } } }
`);
    const agentOf = (n: string) =>
      two.hosts.find((h) => h.name === n)!.agent as Record<string, { socket?: string }>;
    expect(agentOf('a').nbd?.socket).toBeUndefined(); // the agent's own /run/ballast default
    expect(agentOf('b').nbd?.socket).toBe('/opt/ballast-b/run/nbd.sock');
    expect(agentOf('b').api?.socket).toBe('/opt/ballast-b/run/api.sock');
    expect(agentOf('c').api?.socket).toBe('/run/c-api.sock');
    expect(agentOf('c').nbd?.socket).toBe('/srv/c/run/nbd.sock');
  });

  it('fills in service and timeout defaults', () => {
    expect(host('kvm1').service.command).toEqual([
      'node',
      '{release}/bin/ballast',
      'agent',
      '--config',
      '{config}',
    ]);
    expect(host('kvm1').service.unit).toBe('ballast-agent');
    expect(host('kvm2').service.env).toEqual({ NODE_OPTIONS: '--max-old-space-size=256' });
    expect(host('lab').timeouts).toEqual({ connectMs: 5000, stepMs: 120000, healthMs: 2500 });
    expect(host('lab').api).toEqual({ host: '127.0.0.1', port: 20810 });
  });

  it('selects a group or a single host', () => {
    expect(selectHosts(fleet, 'east').map((h) => h.name)).toEqual(['kvm1', 'kvm2']);
    expect(selectHosts(fleet, 'lab').map((h) => h.name)).toEqual(['lab']);
    expect(selectHosts(fleet).length).toBe(3);
    expect(() => selectHosts(fleet, 'west')).toThrow(/no group or host named "west"/);
  });

  it('deep-merges only mappings', () => {
    expect(mergeSettings({ a: { b: 1, c: [1] }, d: 1 }, { a: { c: [2] }, d: null })).toEqual({
      a: { b: 1, c: [2] },
      d: null,
    });
  });

  it('turns listen addresses into where to connect', () => {
    expect(apiTarget('0.0.0.0:1')).toEqual({ host: '127.0.0.1', port: 1 });
    expect(apiTarget('[::]:80')).toEqual({ host: '::1', port: 80 });
    expect(apiTarget('10810')).toEqual({ host: '127.0.0.1', port: 10810 });
    expect(apiTarget('h:99999')).toBeNull();
    expect(apiTarget('nope')).toBeNull();
  });
});

describe('inventory validation names the host and the key', () => {
  const base = 'defaults: { key: k }\n';
  const cases: [string, string][] = [
    ['hosts: {}', '(top level): hosts: must name at least one host'],
    ['hosts: { h1: {} }', 'host h1: address: must be a non-empty string'],
    [
      'hosts: { h1: { address: a, port: 0 } }',
      'host h1: port: must be a whole number from 1 to 65535',
    ],
    ['hosts: { h1: { address: a, port: "22" } }', 'host h1: port:'],
    ['hosts: { h1: { address: a, colour: red } }', 'host h1: colour: unknown key'],
    ['hosts: { h1: { address: a, groups: [nope] } }', 'host h1: groups[0]: no group named "nope"'],
    ['hosts: { h1: { address: a, groups: east } }', 'host h1: groups: must be a list'],
    ['hosts: { h1: { address: a, prefix: rel } }', 'host h1: prefix: must be an absolute path'],
    ['hosts: { h1: { address: a, jump: h9 } }', 'host h1: jump: no host named "h9"'],
    [
      'hosts: { h1: { address: a, jump: h1 } }',
      'host h1: jump: a host cannot be its own jump host',
    ],
    [
      'hosts: { h1: { address: a, agent: { api: { listen: null } } } }',
      'host h1: agent.api.listen: needs a TCP address',
    ],
    ['hosts: { h1: { address: a, agent: [] } }', 'host h1: agent: must be a mapping'],
    ['hosts: { h1: { address: a, service: { command: [] } } }', 'host h1: service.command:'],
    [
      'hosts: { h1: { address: a, service: { restart: x } } }',
      'host h1: service.restart: unknown key',
    ],
    ['hosts: { h1: { address: a, timeouts: { step: -1 } } }', 'host h1: timeouts.step:'],
    ['hosts: { "bad name": { address: a } }', 'host bad name: (name):'],
    [
      'groups: { g: { address: a } }\nhosts: { h1: { address: a } }',
      'group g: address: unknown key',
    ],
    ['defaults: { groups: [a] }\nhosts: { h1: { address: a } }', 'defaults: groups: unknown key'],
    ['hosts: { h1: { address: a } }\nextra: 1', '(top level): extra: unknown key'],
  ];
  for (const [yaml, want] of cases) {
    it(want, () => {
      const e = errorOf(
        yaml.startsWith('defaults:')
          ? yaml.replace(/^defaults: \{ /, 'defaults: { key: k, ')
          : base + yaml,
      );
      expect(e.code).toBe('DEPLOY_INVENTORY_INVALID');
      expect(e.message).toContain(`inv.yaml: ${want}`);
    });
  }

  it('names the host whose merged settings lack a key', () => {
    const e = errorOf('hosts: { h1: { address: a } }');
    expect(e.message).toContain('host h1: key: missing: set key');
  });

  it('names the jump host and the host it serves', () => {
    const e = errorOf(
      'defaults: { key: k }\nhosts: { j: { address: "" }, h1: { address: a, jump: j } }',
    );
    expect(e.message).toMatch(/host j/);
  });

  it('reports unreadable files and bad YAML with codes', () => {
    const dir = mkdtempSync(join(tmpdir(), 'ballast-inv-'));
    afterAll(() => rmSync(dir, { recursive: true, force: true }));
    expect(() => loadInventory(join(dir, 'missing.yaml'))).toThrow(
      expect.objectContaining({ code: 'DEPLOY_INVENTORY_UNREADABLE' }),
    );
    writeFileSync(join(dir, 'bad.yaml'), 'hosts: [\n');
    expect(() => loadInventory(join(dir, 'bad.yaml'))).toThrow(
      expect.objectContaining({ code: 'DEPLOY_INVENTORY_INVALID' }),
    );
    writeFileSync(join(dir, 'ok.yaml'), 'hosts: { h: { address: a, key: ./k } }\n');
    expect(loadInventory(join(dir, 'ok.yaml')).hosts[0]!.key).toBe(join(dir, 'k'));
  });
});
