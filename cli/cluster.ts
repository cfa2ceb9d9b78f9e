// `ballast cluster status|members|join`: the cluster as the agent sees it, and
// bringing a host that ran alone into one.

import type { Command } from 'commander';
import { loadConfig } from '../agent/config.js';
import { joinCluster } from '../cluster/join.js';
import {
  allPages,
  type Common,
  callJson,
  client,
  json,
  out,
  table,
  warnStale,
  withCommon,
} from './manage.js';

interface Member {
  host: string;
  state: string;
  version?: string;
  pid?: number;
  machine?: string;
  api?: string[];
  nbd?: { socket?: string; tcp?: { host: string; port: number } };
  pools?: { name: string; shared: boolean; media: string }[];
  startedAt?: string;
  since?: string;
  applied?: number;
  hollow?: boolean;
}

function nbdOf(m: Member): string {
  if (m.hollow) return 'none (hollow)';
  const parts: string[] = [];
  if (m.nbd?.tcp) parts.push(`${m.nbd.tcp.host}:${m.nbd.tcp.port}`);
  if (m.nbd?.socket) parts.push(m.nbd.socket);
  return parts.join(' ') || '-';
}

function membersTable(members: Member[]): string {
  return table(
    ['HOST', 'STATE', 'SINCE', 'VERSION', 'APPLIED', 'POOLS', 'NBD'],
    members.map((m) => [
      m.host,
      m.state,
      m.since ?? '-',
      m.version ?? '-',
      m.applied === undefined ? '-' : String(m.applied),
      (m.pools ?? []).map((p) => `${p.name}${p.shared ? '(shared)' : ''}`).join(',') || '-',
      nbdOf(m),
    ]),
  );
}

export function registerCluster(program: Command): void {
  const cluster = program
    .command('cluster')
    .summary('the cluster: members, etcd, joining it')
    .description(
      'Agents whose config has a cluster: section share one catalog in etcd. These commands ' +
        'ask any agent of the cluster; while that agent is cut off from etcd it answers from ' +
        'its cache and says so.',
    );
  withCommon(
    cluster
      .command('status')
      .description('this agent, the etcd endpoints and leader, the revision, the members'),
  ).action(async (o: Common) => {
    const s = (await client(o).request('GET', '/v1/cluster/status')) as Record<string, unknown> & {
      membersList: Member[];
      etcd: {
        endpoints?: {
          url: string;
          ok: boolean;
          leader?: boolean;
          version?: string;
          error?: string;
        }[];
        leaderId?: string;
        revision?: number;
        raftTerm?: number;
        error?: string;
      } | null;
      members: { alive: number; expired: number; left: number };
      stale: { since: string; reason: string } | null;
      inDoubt?: { keys: string[]; since: string; reason: string }[];
      sizing?: {
        dbSize?: number;
        quota?: number | null;
        compactRevision?: number;
        devices?: number;
        warnings?: string[];
        error?: string;
      } | null;
    };
    warnStale(s);
    if (o.json) return json(s);
    const e = s.etcd;
    const lines = [
      `cluster:    ${s.name} (keys under ${s.prefix})`,
      `this host:  ${s.host}, lease ${s.lease} (TTL ${s.leaseTtl} s), ${s.healthy ? 'healthy' : 'CUT OFF'}`,
      `revision:   ${s.revision} applied, watch lag ${s.watchLag}`,
      `members:    ${s.members.alive} alive, ${s.members.expired} expired, ${s.members.left} left`,
      'etcd:',
    ];
    if (!e || e.error) lines.push(`  unreachable: ${e?.error ?? 'no answer'}`);
    for (const ep of e?.endpoints ?? []) {
      lines.push(
        `  ${ep.url}  ${ep.ok ? 'ok' : `DOWN (${ep.error ?? 'no answer'})`}${ep.leader ? '  leader' : ''}${ep.version ? `  etcd ${ep.version}` : ''}`,
      );
    }
    if (e?.raftTerm !== undefined) lines.push(`  raft term ${e.raftTerm}, revision ${e.revision}`);
    const z = s.sizing;
    if (z && z.dbSize !== undefined) {
      const MiB = 1024 * 1024;
      lines.push(
        `  database ${Math.round(z.dbSize / MiB)} MiB` +
          (z.quota ? ` of a ${Math.round(z.quota / MiB)} MiB quota` : ' (quota not known)') +
          `, compacted up to ${z.compactRevision}, ${z.devices} devices`,
      );
    }
    for (const w of z?.warnings ?? []) lines.push(`  WARNING: ${w}`);
    // Changes etcd did not answer in time: found out, and logged, as soon as it does.
    for (const d of s.inDoubt ?? []) {
      lines.push(`in doubt:   a change to ${d.keys.join(', ')} since ${d.since} (${d.reason})`);
    }
    lines.push('', membersTable(s.membersList));
    out(lines.join('\n'));
  });
  withCommon(
    cluster
      .command('members')
      .description('every host that joined: alive (lease held), expired (lease ran out) or left'),
  ).action(async (o: Common) => {
    const { items, ...rest } = await allPages<Member>(client(o), '/v1/cluster/members', 'members');
    const r = { ...rest, members: items } as {
      members: Member[];
      stale: { since: string; reason: string } | null;
    };
    warnStale(r);
    if (o.json) return json(r);
    out(membersTable(r.members));
  });
  cluster
    .command('join')
    .description(
      "Import this host's devices (with their reservations and access lists) from its local " +
        'store into the cluster named in the config, before the agent is first started with ' +
        'that cluster: section. The agent must be stopped. Refused, importing nothing, if the ' +
        'cluster already has a device of the same name. The local store is kept as ' +
        'DATA_DIR/state.db.joined.',
    )
    .requiredOption('-c, --config <FILE>', "the agent's YAML config, with its cluster: section")
    .option('-D, --data-dir <DIR>', 'the data directory (default: from the config)')
    .option('--json', 'print JSON')
    .action(async (o: { config: string; dataDir?: string; json?: boolean }) => {
      const { config, r } = await callJson(o.json, async () => {
        const config = loadConfig({ file: o.config, dataDir: o.dataDir });
        return { config, r: await joinCluster(config) };
      });
      if (o.json) return json(r);
      out(
        r.devices.length === 0 && !r.setAside
          ? `nothing to import: ${config.dataDir} has no local store; host ${r.host} can start in cluster ${r.cluster}`
          : `imported ${r.devices.length} device(s) (${r.keys} keys) into cluster ${r.cluster} as host ${r.host}` +
              (r.devices.length ? `: ${r.devices.join(', ')}` : '') +
              `\nthe local store is kept as ${r.setAside}`,
      );
    });
}
