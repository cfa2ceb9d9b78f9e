// `ballast pool|device|attach|status`: the agent's management API from the
// command line. Human tables by default, --json for scripts; exit codes in
// agent/api-client.ts (EXIT) and docs/errors.md.

import { type Command, Option } from 'commander';
import { AgentError, Client } from '../agent/api-client.js';
import {
  FIRST_TARGET,
  nextTarget,
  targetOrder,
  validTarget,
  virshAttach,
} from '../agent/attach.js';
import { BallastError } from '../agent/errors.js';
import type { PoolStatus } from '../agent/pools.js';
import { formatSize, parseSize } from '../agent/units.js';
import { areaLine, areaOf, leaveOutArea, type SuspendAreaView } from '../migrate/area.js';
import { sizeArg } from './options.js';

export interface Common {
  agent?: string;
  tokenFile?: string;
  json?: boolean;
}

interface DeviceView {
  name: string;
  size: number;
  role: string;
  guest: string | null;
  extents: { pool: string; file: string; size: number }[];
  state: string;
  createdAt: string;
  updatedAt: string;
  allocatedBytes: number;
  connections: number;
  exported: boolean;
  problem?: string;
  /** In a cluster: the hosts that serve it, and its owner when it is host-local. */
  hosts?: string[];
  host?: string | null;
}

/** In a cluster, an agent cut off from etcd answers from its cache: say so on stderr. */
export function warnStale(r: { stale?: { since: string; reason: string } | null }): void {
  if (r.stale) {
    process.stderr.write(
      `warning: stale: the agent is cut off from the cluster since ${r.stale.since} (${r.stale.reason}); this is its cached view\n`,
    );
  }
}

/** With --json, errors are also printed on stdout as {"error": {code, message}}. */
let jsonErrors = false;

function printJsonError(e: unknown): void {
  if (jsonErrors && e instanceof BallastError) {
    process.stdout.write(
      `${JSON.stringify({ error: { code: e.code, message: e.message } }, null, 2)}\n`,
    );
  }
}

function call<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    printJsonError(e);
    throw e;
  }
}

/**
 * Runs a command's work that asks no agent (it does not go through `client`): with
 * `json`, its errors reach stdout as JSON too, as every other command's do.
 */
export async function callJson<T>(json: boolean | undefined, fn: () => Promise<T>): Promise<T> {
  jsonErrors = Boolean(json);
  return callAsync(fn);
}

async function callAsync<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    printJsonError(e);
    throw e;
  }
}

export function withCommon(cmd: Command): Command {
  cmd.hook('preAction', (_self, action) => {
    jsonErrors = Boolean(action.opts().json);
  });
  return cmd
    .option(
      '--agent <URL>',
      'the agent: http://HOST:PORT or unix:/path/api.sock (default: $BALLAST_AGENT, else /run/ballast/api.sock, else http://127.0.0.1:10810)',
    )
    .option(
      '--token-file <FILE>',
      'bearer token for an agent reached over TCP that demands one (default: $BALLAST_TOKEN)',
    )
    .option('--json', 'print JSON (for scripts) instead of tables');
}

export function client(o: Common): Pick<Client, 'request' | 'where'> {
  return call(() => {
    const c = new Client({ agent: o.agent, tokenFile: o.tokenFile });
    return {
      where: c.where,
      request: (method: string, path: string, body?: unknown) =>
        callAsync(() => c.request(method, path, body)),
    };
  });
}

export function out(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}

export function json(v: unknown): void {
  out(JSON.stringify(v, null, 2));
}

/** Left-aligned columns, two spaces apart. */
export function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) =>
    r
      .map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(head), ...rows.map(line)].join('\n');
}

/** Exact sizes as given (4 GiB), others to one decimal (251.9 GiB). */
function size(n: number): string {
  const exact = formatSize(n);
  if (!/KiB$/.test(exact) || n < 1024 ** 2) return exact;
  const units = ['MiB', 'GiB', 'TiB', 'PiB'];
  let v = n / 1024 ** 2;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

function enc(name: string): string {
  return encodeURIComponent(name);
}

/** A size given on the command line; bad ones exit like the agent's refusals. */
function cliSize(text: string, what: string): number {
  try {
    return parseSize(text, what);
  } catch (e) {
    const err = e instanceof BallastError ? new AgentError(e.code, e.message) : e;
    printJsonError(err);
    throw err;
  }
}

function showDevice(d: DeviceView): string {
  const lines = [
    `name:        ${d.name}`,
    `size:        ${size(d.size)} (${d.size} bytes)`,
    `role:        ${d.role}`,
    `guest:       ${d.guest ?? '-'}`,
    `state:       ${d.state}${d.problem ? ` (${d.problem})` : ''}`,
    ...(d.hosts
      ? [
          `hosts:       ${d.hosts.join(', ') || '-'}${d.host ? ` (belongs to ${d.host})` : ' (shared pool)'}`,
        ]
      : []),
    `exported:    ${d.exported ? 'yes' : 'no'}`,
    `connections: ${d.connections}`,
    `allocated:   ${size(d.allocatedBytes)}`,
    `created:     ${d.createdAt}`,
    `updated:     ${d.updatedAt}`,
    'extents:',
    table(
      ['  POOL', 'SIZE', 'FILE'],
      d.extents.map((e) => [`  ${e.pool}`, size(e.size), e.file]),
    ),
  ];
  return lines.join('\n');
}

function devicePools(d: DeviceView): string {
  return [...new Set(d.extents.map((e) => e.pool))].join(',');
}

export function registerManagement(program: Command): void {
  // ---- pools ----
  const pool = program
    .command('pool')
    .summary("list the agent's storage pools")
    .description(
      'Storage pools of the running agent: media, capacity, provisioned and allocated bytes.',
    );
  withCommon(pool.command('ls').description('list the pools')).action(async (o: Common) => {
    const r = (await client(o).request('GET', '/v1/pools')) as { pools: PoolStatus[] };
    if (o.json) return json(r);
    out(
      table(
        ['NAME', 'MEDIA', 'CAPACITY', 'LIMIT', 'PROVISIONED', 'ALLOCATED', 'AVAIL', 'PATH'],
        r.pools.map((p) => [
          p.name,
          p.media,
          size(p.capacityBytes),
          `${size(p.limitBytes)} (x${p.overcommit})`,
          size(p.provisionedBytes),
          size(p.allocatedBytes),
          size(p.fsAvailBytes),
          p.path,
        ]),
      ),
    );
  });
  withCommon(
    pool
      .command('rescan')
      .description(
        "look at every pool's medium and fullness again; a changed medium sends tier.changed for its devices",
      ),
  ).action(async (o: Common) => {
    const r = (await client(o).request('POST', '/v1/pools/rescan')) as {
      media: { pool: string; before: string; after: string }[];
      tiers: { device: string; before: string[]; after: string[] }[];
      full: string[];
    };
    if (o.json) return json(r);
    if (r.media.length === 0) out('no medium changed');
    for (const m of r.media) out(`pool ${m.pool}: ${m.before} -> ${m.after}`);
    for (const t of r.tiers)
      out(`device ${t.device}: tier ${t.before.join('+')} -> ${t.after.join('+')}`);
    for (const p of r.full) out(`pool ${p}: full`);
  });
  withCommon(pool.command('show').description('show one pool').argument('<NAME>')).action(
    async (name: string, o: Common) => {
      const p = (await client(o).request('GET', `/v1/pools/${enc(name)}`)) as PoolStatus;
      if (o.json) return json(p);
      out(
        [
          `name:        ${p.name}`,
          `path:        ${p.path}`,
          `media:       ${p.media} (${p.mediaSource}${p.device ? `, ${p.device}` : ''})`,
          `capacity:    ${size(p.capacityBytes)}`,
          `overcommit:  ${p.overcommit}`,
          `limit:       ${size(p.limitBytes)}`,
          `provisioned: ${size(p.provisionedBytes)}`,
          `allocated:   ${size(p.allocatedBytes)}`,
          `fs avail:    ${size(p.fsAvailBytes)}`,
        ].join('\n'),
      );
    },
  );

  // ---- devices ----
  const device = program
    .command('device')
    .summary('create, list, resize, extend and delete virtual devices')
    .description(
      'Virtual block devices of the running agent. Each is exported over NBD under its name as ' +
        'soon as it exists.',
    );
  withCommon(
    device
      .command('create')
      .description('create a device (thin: a sparse file in a pool)')
      .argument('<NAME>', '1 to 63 of a-z 0-9 . _ -, starting with a letter or digit')
      .requiredOption('-s, --size <SIZE>', 'size, e.g. 4G (binary units)')
      .option('-p, --pool <POOL>', 'pool to put it in (default: the one with most room)')
      .addOption(
        new Option('-r, --role <ROLE>', 'what the guest uses it for')
          .choices(['paging', 'dump', 'data'])
          .default('data'),
      )
      .option('-g, --guest <GUEST>', 'the guest that owns it'),
  ).action(
    async (
      name: string,
      o: Common & { size: string; pool?: string; role: string; guest?: string },
    ) => {
      const body: Record<string, unknown> = { name, size: o.size, role: o.role };
      if (o.pool !== undefined) body.pool = o.pool;
      if (o.guest !== undefined) body.guest = o.guest;
      const d = (await client(o).request('POST', '/v1/devices', body)) as DeviceView;
      if (o.json) return json(d);
      out(
        `created ${d.role} device ${d.name}: ${size(d.size)} in pool ${devicePools(d)}` +
          (d.guest ? ` for guest ${d.guest}` : ''),
      );
    },
  );
  withCommon(device.command('ls').description('list the devices')).action(async (o: Common) => {
    const r = await allDevices(client(o));
    warnStale(r);
    if (o.json) return json(r);
    const cluster = r.devices.some((d) => d.hosts !== undefined);
    out(
      table(
        [
          'NAME',
          'SIZE',
          'ROLE',
          'GUEST',
          'POOLS',
          'STATE',
          'CONN',
          'ALLOCATED',
          ...(cluster ? ['HOSTS'] : []),
        ],
        r.devices.map((d) => [
          d.name,
          size(d.size),
          d.role,
          d.guest ?? '-',
          devicePools(d),
          d.state,
          String(d.connections),
          d.state === 'remote' ? '-' : size(d.allocatedBytes),
          ...(cluster ? [(d.hosts ?? []).join(',') || '-'] : []),
        ]),
      ),
    );
  });
  withCommon(device.command('show').description('show one device').argument('<NAME>')).action(
    async (name: string, o: Common) => {
      const d = (await client(o).request('GET', `/v1/devices/${enc(name)}`)) as DeviceView & {
        stale?: { since: string; reason: string };
      };
      warnStale(d);
      if (o.json) return json(d);
      out(showDevice(d));
    },
  );
  withCommon(
    device
      .command('resize')
      .description('grow a device (its last extent); shrinking discards data and needs --force')
      .argument('<NAME>')
      .requiredOption('-s, --size <SIZE>', 'the new size, or +SIZE to grow by')
      .option('-f, --force', 'allow shrinking, disconnecting its clients'),
  ).action(async (name: string, o: Common & { size: string; force?: boolean }) => {
    const c = client(o);
    let target: number;
    if (o.size.startsWith('+')) {
      const cur = (await c.request('GET', `/v1/devices/${enc(name)}`)) as DeviceView;
      target = cur.size + cliSize(o.size.slice(1), '--size');
    } else {
      target = cliSize(o.size, '--size');
    }
    const d = (await c.request('POST', `/v1/devices/${enc(name)}/resize`, {
      size: target,
      force: Boolean(o.force),
    })) as DeviceView;
    if (o.json) return json(d);
    out(`resized ${d.name} to ${size(d.size)}`);
  });
  withCommon(
    device
      .command('extend')
      .description('grow a device by a new extent in a pool (a device can span pools)')
      .argument('<NAME>')
      .requiredOption('-p, --pool <POOL>', 'pool for the new extent')
      .requiredOption('-s, --size <+SIZE>', 'how much to add, e.g. +1G'),
  ).action(async (name: string, o: Common & { size: string; pool: string }) => {
    const grow = o.size.startsWith('+') ? o.size.slice(1) : o.size;
    const d = (await client(o).request('POST', `/v1/devices/${enc(name)}/extend`, {
      pool: o.pool,
      size: grow,
    })) as DeviceView;
    if (o.json) return json(d);
    out(`extended ${d.name} to ${size(d.size)} over pools ${devicePools(d)}`);
  });
  withCommon(
    device
      .command('rm')
      .description('delete a device and its files')
      .argument('<NAME>')
      .option('-f, --force', 'delete even with clients connected (they are disconnected)'),
  ).action(async (name: string, o: Common & { force?: boolean }) => {
    const r = await client(o).request(
      'DELETE',
      `/v1/devices/${enc(name)}${o.force ? '?force=true' : ''}`,
    );
    if (o.json) return json(r);
    out(`deleted ${name}`);
  });

  // ---- attach ----
  withCommon(
    program
      .command('attach')
      .summary("print what attaches a device (or all of a guest's devices) to a guest")
      .description(
        'Print what a user pastes to give a guest the device: QEMU -blockdev/-device arguments, ' +
          "a libvirt <disk type='network'> element, the virsh attach-device command that hot-plugs " +
          'it into a running domain (and its definition), or the NBD URI. The Unix socket is used ' +
          'when the agent has one, unless --transport tcp. With --guest, every device of the guest ' +
          '(paging first, then dump, then the others) with distinct targets from vdb (or --target) on. ' +
          'With --guest-ram, the paging device (or NAME) is given to the guest without its ' +
          'suspend area, where `ballast guest suspend` writes the guest: QEMU gets a raw node ' +
          'with size=OFFSET over the NBD node and the -device on it, libvirt a storage <slice>; ' +
          'the offset is printed on stderr (in --json: suspendArea).',
      )
      .argument('[NAME]', 'the device (or give --guest)')
      .addOption(
        new Option('-f, --format <FORMAT>', 'what to print')
          .choices(['qemu', 'libvirt', 'virsh', 'uri'])
          .default('qemu'),
      )
      .addOption(new Option('-t, --transport <T>', 'NBD transport').choices(['unix', 'tcp']))
      .option(
        '-g, --guest <GUEST>',
        'every device created for this guest (--guest of device create)',
      )
      .option(
        '--target <DEV>',
        "libvirt/virsh: the disk's target (vdb, vdc...); with --guest the first of them",
      )
      .option('--domain <DOMAIN>', "virsh: the libvirt domain (default: the device's guest)")
      .option(
        '-H, --host <HOST>',
        "in a cluster: for a guest on HOST (that host's agent socket or address)",
      )
      .addOption(
        new Option(
          '--guest-ram <SIZE>',
          "the guest's RAM (e.g. 128M): leave out its suspend area (RAM plus an eighth and 16 MiB, then the 4 KiB header, at the device's end)",
        ).argParser(sizeArg('--guest-ram')),
      )
      .addHelpText(
        'after',
        `
Examples:
  ballast attach swap-vm1                       # QEMU arguments for one device
  ballast attach --guest vm1 --format libvirt   # a <disk> for each device of vm1
  ballast attach --guest vm1 --guest-ram 128M   # vm1 (-m 128M) sees its paging device
                                                # up to the suspend area only`,
      ),
  ).action(
    async (
      name: string | undefined,
      o: Common & {
        format: string;
        transport?: string;
        host?: string;
        guest?: string;
        target?: string;
        domain?: string;
        guestRam?: number;
      },
    ) => {
      if ((name === undefined) === (o.guest === undefined)) {
        throw new BallastError('BALLAST_USAGE', 'give a device NAME or --guest GUEST (not both)');
      }
      if (o.guestRam !== undefined && o.format === 'uri') {
        throw new BallastError(
          'BALLAST_USAGE',
          '--guest-ram needs --format qemu, libvirt or virsh: an NBD URI cannot leave out the suspend area',
        );
      }
      let names: string[];
      /** The devices whose suspend area is left out (--guest-ram). */
      let parted: DeviceView[] = [];
      if (name !== undefined) {
        names = [name];
        if (o.guestRam !== undefined) {
          parted = [(await client(o).request('GET', `/v1/devices/${enc(name)}`)) as DeviceView];
        }
      } else {
        const r = await allDevices(client(o));
        warnStale(r);
        const mine = targetOrder(r.devices.filter((d) => d.guest === o.guest));
        names = mine.map((d) => d.name);
        if (names.length === 0) {
          throw new BallastError(
            'BALLAST_DEVICE_NOT_FOUND',
            `no device was created for guest ${o.guest} (device create --guest ${o.guest})`,
          );
        }
        if (o.guestRam !== undefined) {
          parted = mine.filter((d) => d.role === 'paging');
          if (parted.length === 0) {
            throw new BallastError(
              'BALLAST_USAGE',
              `guest ${o.guest} has no paging device, whose suspend area --guest-ram leaves out (name the device to suspend into instead of --guest)`,
            );
          }
        }
      }
      const areas = new Map<string, SuspendAreaView>();
      for (const d of parted) areas.set(d.name, areaOf(d, o.guestRam as number));
      if (o.target !== undefined && !validTarget(o.target)) {
        throw new BallastError(
          'BALLAST_USAGE',
          `--target must name a virtio disk, vd and 1 to 3 letters (vdb, vdc...), not ${o.target}`,
        );
      }
      const domain = o.domain ?? o.guest;
      let target = o.target ?? FIRST_TARGET;
      const replies: {
        device: string;
        target: string;
        uri: string;
        qemu: string[];
        libvirt: string;
        domain?: string;
        virsh?: string;
        note?: string;
        suspendArea?: SuspendAreaView;
      }[] = [];
      for (const n of names) {
        const q = new URLSearchParams({ format: o.format, target });
        if (o.transport) q.set('transport', o.transport);
        if (o.host) q.set('host', o.host);
        if (domain) q.set('domain', domain);
        const area = areas.get(n);
        const reply = leaveOutArea(
          (await client(o).request(
            'GET',
            `/v1/devices/${enc(n)}/attach?${q}`,
          )) as (typeof replies)[number],
          area,
        );
        if (area) {
          if (reply.virsh !== undefined && reply.domain !== undefined)
            reply.virsh = virshAttach(reply.domain, [reply.libvirt]);
          if (!o.json) {
            process.stderr.write(areaLine(n, area));
          }
        }
        replies.push(reply);
        target = nextTarget(target);
      }
      // What the agent says it takes over TCP (or why it would refuse this), once.
      const note = replies.find((r) => r.note)?.note;
      if (note) process.stderr.write(`note: ${note}\n`);
      if (o.json)
        return json(name !== undefined ? replies[0] : { guest: o.guest, devices: replies });
      if (o.format === 'uri') out(replies.map((r) => r.uri).join('\n'));
      else if (o.format === 'libvirt') out(replies.map((r) => r.libvirt).join('\n'));
      else if (o.format === 'virsh')
        out(
          virshAttach(
            replies[0]?.domain ?? '',
            replies.map((r) => r.libvirt),
          ),
        );
      else out(replies.map((r) => r.qemu.join(' ')).join(' '));
    },
  );

  // ---- status ----
  withCommon(
    program
      .command('status')
      .summary("the agent's state, and problems found at start")
      .description(
        'Where the agent listens, how many pools and devices it has, and what reconciling the ' +
          'database with the files found at start: orphan files and missing files are reported ' +
          'here, never deleted.',
      ),
  ).action(async (o: Common) => {
    const s = (await client(o).request('GET', '/v1/status')) as Record<string, unknown> & {
      problems: { kind: string; device?: string; path?: string; message: string }[];
      recovered: string[];
    };
    if (o.json) return json(s);
    const lines = [
      `agent:       ${client(o).where} (version ${s.version}, pid ${s.pid}, up ${s.uptimeSeconds} s)`,
      `config:      ${s.config}`,
      `data dir:    ${s.dataDir}`,
      `NBD:         ${(s.nbd as string[]).join(', ') || '-'}`,
      `API:         ${(s.api as string[]).join(', ') || '-'}${s.tokenRequired ? ' (TCP: bearer token)' : ''}`,
      `pools:       ${s.pools}`,
      `devices:     ${s.devices}${s.devicesUnavailable ? ` (${s.devicesUnavailable} unavailable)` : ''}`,
      `connections: ${s.connections}${(s.nbdWorkers as number[] | undefined)?.length ? ` (NBD, on ${(s.nbdWorkers as number[]).length} worker threads: ${(s.nbdWorkers as number[]).join(', ')})` : ''}`,
      `store:       revision ${s.storeRevision}`,
    ];
    if (s.lastReloadError) lines.push(`last reload: FAILED: ${s.lastReloadError}`);
    if (s.recovered.length > 0) {
      lines.push('recovered at start:');
      for (const r of s.recovered) lines.push(`  ${r}`);
    }
    lines.push(s.problems.length === 0 ? 'problems:    none' : 'problems:');
    for (const p of s.problems) lines.push(`  ${p.kind}: ${p.message}`);
    out(lines.join('\n'));
  });
}

/** The agent's page size for the listings the CLI reads whole: a large cluster comes in pieces. */
const LIST_PAGE = 500;

/**
 * A whole listing, page by page (`PATH?limit&continue`): the pages are one moment
 * of the cluster, so an item created meanwhile is listed once or not at all. An
 * agent cut off from etcd answers from its cache in one piece, marked stale.
 */
export async function allPages<T>(
  c: Pick<Client, 'request'>,
  path: string,
  field: string,
): Promise<Record<string, unknown> & { items: T[] }> {
  type Page = Record<string, unknown> & { continue?: string };
  const first = (await c.request('GET', `${path}?limit=${LIST_PAGE}`)) as Page;
  const items = [...((first[field] as T[] | undefined) ?? [])];
  for (let token = first.continue; token !== undefined; ) {
    const page = (await c.request(
      'GET',
      `${path}?limit=${LIST_PAGE}&continue=${encodeURIComponent(token)}`,
    )) as Page;
    items.push(...((page[field] as T[] | undefined) ?? []));
    token = page.continue;
  }
  const { continue: _, ...rest } = first;
  return { ...rest, [field]: items, items };
}

/** Every device (GET /v1/devices, in pages). */
export async function allDevices(c: Pick<Client, 'request'>): Promise<{
  devices: DeviceView[];
  revision?: number;
  stale?: { since: string; reason: string };
}> {
  const { items, ...r } = await allPages<DeviceView>(c, '/v1/devices', 'devices');
  return { ...r, devices: items };
}
