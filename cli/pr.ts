// `ballast pr` and `ballast acl`: persistent reservations and access lists of
// the agent's devices, in sg_persist's vocabulary. An admin acts for an
// initiator identity with --as (a TLS certificate CN, a PSK username, or a
// mapped name).

import { type Command, Option } from 'commander';
import { AgentError, Client } from '../agent/api-client.js';
import { BallastError } from '../agent/errors.js';
import { PR_ACTIONS, PR_TYPE_NAMES, type PrType } from '../agent/pr.js';
import { warnStale } from './manage.js';

interface Common {
  agent?: string;
  tokenFile?: string;
  json?: boolean;
}

interface PrOptions extends Common {
  key?: string;
  saKey?: string;
  type?: string;
  as?: string;
  target?: string;
  unregister?: boolean;
  ifGeneration?: string;
  wait?: boolean;
}

const OUT_ACTIONS = PR_ACTIONS;
const IN_ACTIONS = ['keys', 'show', 'audit'] as const;

function out(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}

function json(v: unknown): void {
  out(JSON.stringify(v, null, 2));
}

async function request(o: Common, method: string, path: string, body?: unknown): Promise<unknown> {
  try {
    return await new Client({ agent: o.agent, tokenFile: o.tokenFile }).request(method, path, body);
  } catch (e) {
    if (o.json && e instanceof BallastError) {
      json({ error: { code: e.code, message: e.message } });
    }
    throw e;
  }
}

function usage(o: Common, code: string, message: string): never {
  const e = new AgentError(code, message);
  if (o.json) json({ error: { code, message } });
  throw e;
}

function typeName(t: number | null | undefined): string {
  return t ? `${PR_TYPE_NAMES[t as PrType] ?? '?'} (${t})` : '-';
}

function common(cmd: Command): Command {
  return cmd
    .option(
      '--agent <URL>',
      'the agent: http://HOST:PORT or unix:/path/api.sock (default: $BALLAST_AGENT, else the local socket)',
    )
    .option(
      '--token-file <FILE>',
      'bearer token for an agent reached over TCP (default: $BALLAST_TOKEN)',
    )
    .option('--json', 'print JSON (for scripts)');
}

interface Status {
  device: string;
  generation: number;
  reservation: { type: number; key: string; holder: string | null } | null;
  registrations: { identity: string; key: string; holder: boolean }[];
  agents?: { host: string; applied: boolean; revision: number }[];
}

export function registerPr(program: Command): void {
  const pr = common(
    program
      .command('pr')
      .summary('persistent reservations of a device (SCSI PERSISTENT RESERVE IN/OUT)')
      .description(
        'Read or change the persistent reservations of a device, as sg_persist does for SCSI ' +
          'disks. Every NBD connection has an identity (certificate CN, PSK username, mapped ' +
          'name or anonymous); registrations and the reservation are per identity, and the agent ' +
          'refuses I/O the reservation forbids with EPERM. --as names the identity to act for.\n\n' +
          `ACTION: ${[...OUT_ACTIONS, ...IN_ACTIONS].join(', ')}`,
      )
      .argument('<DEVICE>')
      .argument('<ACTION>')
      .option('-k, --key <KEY>', 'the reservation key the identity holds now (0x-hex or decimal)')
      .option('-S, --sa-key <KEY>', 'service action key: the new key, or the key to preempt')
      .addOption(
        new Option(
          '-T, --type <TYPE>',
          'reservation type: 1/WE, 3/EA, 5/WERO, 6/EARO, 7/WEAR, 8/EAAR',
        ),
      )
      .option('--as <IDENTITY>', 'act for this initiator identity')
      .option('--target <IDENTITY>', 'register-move: the identity that gets the reservation')
      .option('--unregister', 'register-move: drop the mover’s own registration')
      .option(
        '--if-generation <N>',
        'only if the PRgeneration is still N (as last read); else PR_CONFLICT [stale-generation]',
      )
      .option(
        '--wait',
        'in a cluster: say whom the change waited for (agents applying it, or a lease running out)',
      ),
  ).addHelpText(
    'after',
    `
Examples (host A holds Write Exclusive; host B takes over):
  ballast pr swap0 register --as hostA --sa-key 0xa
  ballast pr swap0 reserve  --as hostA --key 0xa --type WE
  ballast pr swap0 register --as hostB --sa-key 0xb
  ballast pr swap0 preempt-abort --as hostB --key 0xb --sa-key 0xa --type WE
  ballast pr swap0 show

Conflicts exit 5 with PR_CONFLICT and the reason; bad keys or types exit 8
(PR_BAD_KEY, PR_BAD_TYPE, PR_INVALID_RELEASE, PR_INVALID_REQUEST).`,
  );
  pr.action(async (device: string, action: string, o: PrOptions) => {
    const path = `/v1/devices/${encodeURIComponent(device)}`;
    if (action === 'keys') {
      const r = (await request(o, 'GET', `${path}/pr/keys`)) as {
        generation: number;
        keys: string[];
        stale?: { since: string; reason: string };
      };
      warnStale(r);
      if (o.json) return json(r);
      out(`generation: ${r.generation}`);
      out(r.keys.length ? r.keys.map((k) => `  ${k}`).join('\n') : '  no registrations');
      return;
    }
    if (action === 'show') {
      const r = (await request(o, 'GET', `${path}/pr`)) as Status & {
        stale?: { since: string; reason: string };
      };
      warnStale(r);
      if (o.json) return json(r);
      out(`generation:  ${r.generation}`);
      out(
        `reservation: ${r.reservation ? `${typeName(r.reservation.type)} key ${r.reservation.key}, holder ${r.reservation.holder}` : 'none'}`,
      );
      out('registrations:');
      for (const g of r.registrations) {
        out(`  ${g.identity}  ${g.key}${g.holder ? '  (holder)' : ''}`);
      }
      if (r.registrations.length === 0) out('  none');
      if (r.agents) {
        out('agents (the state each serving agent has applied):');
        for (const g of r.agents) {
          out(`  ${g.host}  ${g.applied ? 'current' : `behind (at revision ${g.revision})`}`);
        }
      }
      return;
    }
    if (action === 'audit') {
      const r = (await request(o, 'GET', `${path}/pr/audit`)) as {
        entries: Record<string, unknown>[];
      };
      if (o.json) return json(r);
      for (const e of r.entries) {
        const extra = [
          e.saKey ? `sa-key ${e.saKey}` : '',
          e.type ? `type ${e.type}` : '',
          e.code ? `${e.code} ${e.reason}` : '',
        ]
          .filter(Boolean)
          .join(', ');
        out(
          `${e.time}  ${e.actor} as ${e.initiator}: ${e.action} key ${e.key}${extra ? ` (${extra})` : ''} → ${e.outcome}, generation ${e.generation}`,
        );
      }
      return;
    }
    if (!(OUT_ACTIONS as readonly string[]).includes(action)) {
      usage(
        o,
        'BALLAST_USAGE',
        `unknown action ${JSON.stringify(action)}: one of ${[...OUT_ACTIONS, ...IN_ACTIONS].join(', ')}`,
      );
    }
    if (!o.as)
      usage(o, 'BALLAST_USAGE', `${action} needs --as IDENTITY (the initiator to act for)`);
    const body: Record<string, unknown> = { action, as: o.as, key: o.key ?? '0' };
    if (o.saKey !== undefined) body.saKey = o.saKey;
    if (o.type !== undefined) body.type = o.type;
    if (o.target !== undefined) body.target = o.target;
    if (o.unregister) body.unregister = true;
    if (o.ifGeneration !== undefined) {
      const g = Number(o.ifGeneration);
      if (!/^\d+$/.test(o.ifGeneration) || !Number.isSafeInteger(g)) {
        usage(o, 'BALLAST_USAGE', `--if-generation must be a whole number, not ${o.ifGeneration}`);
      }
      body.ifGeneration = g;
    }
    const r = (await request(o, 'POST', `${path}/pr`, body)) as {
      changed: boolean;
      generation: number;
      preempted: string[];
      aborted: number;
      settled?: { waitedMs: number; hosts: { host: string; how: string }[] };
    };
    if (o.json) return json(r);
    const what = r.changed ? 'done' : 'nothing to change';
    const pre = r.preempted.length
      ? `; preempted ${r.preempted.join(', ')}${r.aborted ? ` (${r.aborted} connection(s) aborted here)` : ''}`
      : '';
    out(`${device}: ${action} as ${o.as}: ${what}, generation ${r.generation}${pre}`);
    if (r.settled && (o.wait || r.settled.waitedMs >= 1000)) {
      const why = r.settled.hosts
        .map((h) =>
          h.how === 'acked'
            ? `${h.host} applied it`
            : h.how === 'expired'
              ? `${h.host}'s lease expired (it fenced itself)`
              : h.how === 'left'
                ? `${h.host} left the cluster (stopped cleanly)`
                : `${h.host} (this agent)`,
        )
        .join('; ');
      out(`waited ${(r.settled.waitedMs / 1000).toFixed(2)} s: ${why}`);
    }
  });

  const acl = common(
    program
      .command('acl')
      .summary('which identities may open a device, read-only or read-write')
      .description(
        'Show or set the access list of a device. With a list, only the identities on it may ' +
          'open the device (others get ERR_POLICY at NBD_OPT_GO and do not see it in the export ' +
          'list); "ro" ones are served read-only. Without a list everyone may open it.',
      )
      .argument('<DEVICE>')
      .argument('[ENTRY...]', 'IDENTITY:ro or IDENTITY:rw; "none" removes the list')
      .addHelpText(
        'after',
        `
Examples:
  ballast acl swap0                      # show
  ballast acl swap0 hostA:rw hostB:ro    # only hostA (read-write) and hostB (read-only)
  ballast acl swap0 none                 # open to everyone again`,
      ),
  );
  acl.action(async (device: string, entries: string[], o: Common) => {
    const path = `/v1/devices/${encodeURIComponent(device)}/acl`;
    let r: {
      entries: { identity: string; access: string }[] | null;
      stale?: { since: string; reason: string };
    };
    if (entries.length === 0) {
      r = (await request(o, 'GET', path)) as typeof r;
    } else {
      const list =
        entries.length === 1 && entries[0] === 'none'
          ? null
          : entries.map((e) => {
              const i = e.lastIndexOf(':');
              return { identity: i < 0 ? e : e.slice(0, i), access: i < 0 ? '' : e.slice(i + 1) };
            });
      r = (await request(o, 'PUT', path, { entries: list })) as typeof r;
    }
    warnStale(r);
    if (o.json) return json(r);
    if (r.entries === null) out(`${device}: open to every identity`);
    else for (const e of r.entries) out(`${e.identity}  ${e.access}`);
  });
}
