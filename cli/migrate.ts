// `ballast migrate` and `ballast guest suspend|resume|takeover`: moving a guest and its
// devices' reservations between hosts. The work is in migrate/; this file is options
// and output.

import { type Command, Option } from 'commander';
import { shellQuote } from '../agent/attach.js';
import { parseSize } from '../agent/units.js';
import { areaLine } from '../migrate/area.js';
import { type AgentApi, MigrateError } from '../migrate/handoff.js';
import { migrateLibvirt } from '../migrate/libvirt.js';
import { migrateLive } from '../migrate/live.js';
import type { Progress } from '../migrate/qemu.js';
import { resumeGuest, type StreamVia, suspendGuest } from '../migrate/suspend.js';
import { movableLibvirt, movableQemuArgs, takeover } from '../migrate/takeover.js';
import { client, json, out, withCommon } from './manage.js';
import { positiveInt, sizeArg } from './options.js';

const MiB = 1024 * 1024;

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** An agent address as the member record lists it ("/path.sock", "HOST:PORT"). */
function agentAddress(a: string): string {
  if (a.startsWith('/')) return `unix:${a}`;
  if (a.startsWith('unix:') || a.startsWith('http')) return a;
  return `http://${a}`;
}

/** The agent of `host`, from the cluster's member list (as seen by `api`). */
async function agentOf(api: AgentApi, host: string): Promise<string> {
  const m = (
    (await api.request('GET', '/v1/cluster/members')) as {
      members: { host: string; state: string; api?: string[] }[];
    }
  ).members.find((x) => x.host === host);
  if (m?.state !== 'alive' || !m.api?.length) {
    throw new MigrateError(
      'MIGRATE_NO_AGENT',
      `host ${host} has no live agent in the cluster (${m ? m.state : 'not a member'})`,
    );
  }
  const unix = m.api.find((a) => a.startsWith('/') || a.startsWith('unix:'));
  return agentAddress(unix ?? (m.api[0] as string));
}

function progressLine(p: Progress): string {
  const pct = p.total ? Math.min(100, (100 * p.transferred) / p.total) : 0;
  return (
    `${(p.elapsedMs / 1000).toFixed(1).padStart(6)} s  ${p.status.padEnd(14)} ` +
    `ram ${(p.transferred / MiB).toFixed(0)}/${(p.total / MiB).toFixed(0)} MiB (${pct.toFixed(0)}%)  ` +
    `remaining ${(p.remaining / MiB).toFixed(1)} MiB  dirty ${p.dirtyRate} pages/s  ` +
    `${p.mbps.toFixed(0)} Mbit/s  pass ${p.passes}`
  );
}

interface MigrateOpts {
  agent?: string;
  tokenFile?: string;
  json?: boolean;
  from?: string;
  to?: string;
  libvirt?: string;
  toLibvirt?: string;
  migrateUri?: string;
  toHost?: string;
  toAgent?: string;
  toTokenFile?: string;
  uri?: string;
  device?: string[];
  maxBandwidth?: string;
  downtimeLimit?: number;
  keepSource?: boolean;
  quiet?: boolean;
}

export function registerMigrate(program: Command): void {
  withCommon(
    program
      .command('migrate')
      .summary('live-migrate a guest to another host, its devices’ reservations with it')
      .description(
        'Live-migrate a running QEMU guest between two hosts whose agents serve its devices ' +
          '(every device created with --guest GUEST, or --device). The destination QEMU must ' +
          'already run with the same devices (ballast attach --host HOST) and `-incoming defer ' +
          '-S`. The source holds every device Write Exclusive; the destination takes it over ' +
          '(preempt-and-abort) only once the source has stopped the guest and flushed its ' +
          'devices, and the destination starts only after that. A failure at any step leaves ' +
          'the guest running on the source with its reservations. --agent is the source ' +
          "host's agent.",
      )
      .argument('<GUEST>')
      .option('--from <QMP>', "the source QEMU's QMP socket (unix:/path or tcp:HOST:PORT)")
      .option('--to <QMP>', "the destination QEMU's QMP socket")
      .option(
        '--libvirt <URI>',
        'a guest libvirt runs: the source libvirt connection (instead of --from/--to); ' +
          'virsh migrate --live --suspend, the hand-off, then virsh resume on the destination',
      )
      .option('--to-libvirt <URI>', "with --libvirt: the destination's libvirt connection")
      .option('--migrate-uri <URI>', 'with --libvirt: virsh migrate --migrateuri')
      .option('--to-host <HOST>', 'the destination host (its agent is found in the cluster)')
      .option('--to-agent <URL>', "the destination host's agent (default: from --to-host)")
      .option(
        '--to-token-file <FILE>',
        "the destination agent's bearer token, for its TCP API (default: as --token-file)",
      )
      .option(
        '--uri <URI>',
        'where the destination listens for the stream: tcp:HOST:PORT or unix:/path ' +
          '(default unix:/tmp/ballast-migrate-GUEST.sock, for hosts that share /tmp)',
      )
      .option('--device <NAME>', 'move this device (repeatable; default: the guest’s)', collect)
      .option('--max-bandwidth <SIZE>', 'bytes per second, e.g. 1G (default: unlimited)')
      .addOption(
        new Option('--downtime-limit <MS>', "QEMU's downtime limit")
          .default(300)
          .argParser(positiveInt('--downtime-limit')),
      )
      .option('--keep-source', 'leave the source QEMU (paused) instead of quitting it')
      .option('-q, --quiet', 'no progress lines'),
  )
    .addHelpText(
      'after',
      `
Example (host-a → host-b):
  ballast migrate vm1 --from unix:/run/qemu/vm1.qmp --to unix:/run/qemu-b/vm1.qmp \\
      --to-host host-b --uri tcp:10.0.0.12:4444 --agent unix:/run/ballast-a/api.sock`,
    )
    .action(async (guest: string, o: MigrateOpts) => {
      const src = client(o);
      if (!o.toAgent && !o.toHost) {
        throw new MigrateError('BALLAST_USAGE', 'give --to-host or --to-agent');
      }
      const toAgent = o.toAgent ?? (await agentOf(src, o.toHost as string));
      const dst = client({ agent: toAgent, tokenFile: o.toTokenFile ?? o.tokenFile });
      if (o.libvirt !== undefined || o.toLibvirt !== undefined) {
        if (!o.libvirt || !o.toLibvirt || o.from || o.to)
          throw new MigrateError(
            'BALLAST_USAGE',
            'a libvirt guest takes --libvirt and --to-libvirt (not --from/--to)',
          );
        const r = await migrateLibvirt({
          guest,
          from: { api: src, libvirt: o.libvirt },
          to: { api: dst, libvirt: o.toLibvirt, host: o.toHost },
          migrateUri: o.migrateUri,
          devices: o.device,
          onStep:
            o.quiet || o.json
              ? undefined
              : (s, t) => out(`${(t / 1000).toFixed(1).padStart(6)} s  ${s}`),
        });
        if (o.json) return json(r);
        out(
          [
            `migrated ${r.guest} from ${r.from} to ${r.to} through libvirt (${r.devices.join(', ')})`,
            `  total ${ms(r.totalMs)}: virsh migrate ${ms(r.migrateMs)}, hand-off ${ms(r.handoffMs)}, resume ${ms(r.resumeMs)}`,
          ].join('\n'),
        );
        return;
      }
      if (!o.from || !o.to)
        throw new MigrateError(
          'BALLAST_USAGE',
          'give --from and --to (or --libvirt and --to-libvirt)',
        );
      const report = await migrateLive({
        guest,
        from: { qmp: o.from, api: src },
        to: { qmp: o.to, api: dst, host: o.toHost },
        uri: o.uri,
        devices: o.device,
        maxBandwidth: o.maxBandwidth === undefined ? undefined : parseSize(o.maxBandwidth),
        downtimeLimitMs: o.downtimeLimit,
        quitSource: !o.keepSource,
        onProgress: o.quiet || o.json ? undefined : throttle((p) => out(progressLine(p))),
        onStep:
          o.quiet || o.json
            ? undefined
            : (s, ms) => out(`${(ms / 1000).toFixed(1).padStart(6)} s  ${s}`),
      });
      if (o.json) return json(report);
      out(
        [
          `migrated ${report.guest} from ${report.from} to ${report.to} (${report.devices.join(', ')})`,
          `  total ${ms(report.totalMs)}: precopy ${ms(report.precopyMs)}, hand-off ${ms(report.handoffMs)}, switchover ${ms(report.switchoverMs)}`,
          `  downtime ${ms(report.downtimeMs)} (QEMU: ${ms(report.qemuDowntimeMs)})`,
          `  ram ${(report.ramTransferred / MiB).toFixed(1)} MiB sent of ${(report.ramTotal / MiB).toFixed(0)} MiB, ${report.passes} passes, ${report.mbps.toFixed(0)} Mbit/s`,
        ].join('\n'),
      );
    });
}

function ms(v: number): string {
  return Number.isFinite(v) ? `${v.toFixed(0)} ms` : '-';
}

/** At most one progress line per second, and every status change. */
function throttle(f: (p: Progress) => void): (p: Progress) => void {
  let last = -1e9;
  let status = '';
  return (p) => {
    if (p.status !== status || p.elapsedMs - last >= 1000) {
      last = p.elapsedMs;
      status = p.status;
      f(p);
    }
  };
}

interface TakeoverOpts {
  agent?: string;
  tokenFile?: string;
  json?: boolean;
  toHost?: string;
  device?: string[];
  format: string;
  guestRam?: number;
}

export function registerGuest(program: Command): void {
  const guest = program
    .command('guest')
    .summary('move a guest: suspend to its paging device, resume, take over from a dead host')
    .description(
      'A guest is the set of devices created with --guest NAME. These commands move what ' +
        'Ballast owns of it (the devices’ reservations, and a suspended guest’s state on its ' +
        'paging device); QEMU itself is started by you or libvirt.',
    );
  withCommon(
    guest
      .command('suspend')
      .description(
        'Stop a guest and stream its state (QEMU’s migration stream) into the suspend area ' +
          'of its paging device, then record it (size, checksum, QEMU version, machine ' +
          'type) in the header in the device’s last 4 KiB and quit QEMU. The agent that serves ' +
          'the device takes the stream from QEMU on a socket of its own and writes it into the ' +
          'device itself; where it does not serve the device (another host’s host-local ' +
          'device), or with --via nbd, the stream goes through this command into the device ' +
          'over NBD. The suspend area is the end of the device: by default room for the ' +
          'guest’s RAM plus an eighth and 16 MiB; the guest must see only the part before it ' +
          '(a raw node with size=OFFSET: `ballast attach DEVICE --guest-ram SIZE` prints it). ' +
          'Before it stops the guest, suspend asks QEMU what the guest’s disks see of the ' +
          'device and refuses (SUSPEND_AREA_VISIBLE) when one of them reaches into the ' +
          'suspend area, unless --force. On any failure the guest goes on running.',
      )
      .argument('<GUEST>')
      .requiredOption('--qmp <QMP>', "the guest's QMP socket (unix:/path or tcp:HOST:PORT)")
      .option('--device <NAME>', 'the device to suspend into (default: the guest’s paging device)')
      .option('--offset <SIZE>', 'where the suspend area starts on the device')
      .option('--keep-qemu', 'leave QEMU (stopped) instead of quitting it')
      .option(
        '--force',
        'suspend even when the guest sees the suspend area (what it wrote there is overwritten); warns on stderr',
      )
      .addOption(
        new Option('--checksum <ALG>', 'checksum of the stream')
          .choices(['crc32', 'sha256'])
          .default('crc32'),
      )
      .addOption(
        new Option(
          '--via <WHO>',
          'who moves the stream: the agent itself, or this command over NBD',
        )
          .choices(['auto', 'agent', 'nbd'])
          .default('auto'),
      ),
  ).action(
    async (
      name: string,
      o: { agent?: string; tokenFile?: string; json?: boolean } & {
        qmp: string;
        device?: string;
        offset?: string;
        keepQemu?: boolean;
        force?: boolean;
        checksum: 'crc32' | 'sha256';
        via: StreamVia;
      },
    ) => {
      const r = await suspendGuest({
        guest: name,
        qmp: o.qmp,
        api: client(o),
        device: o.device,
        offset: o.offset === undefined ? undefined : parseSize(o.offset),
        keepQemu: o.keepQemu,
        checksum: o.checksum,
        via: o.via,
        force: o.force,
        onWarning: (m) => process.stderr.write(`warning: ${m}\n`),
      });
      if (o.json) return json(r);
      out(
        `suspended ${r.guest} into ${r.device} at ${r.offset}: ${(r.bytes / MiB).toFixed(1)} MiB in ` +
          `${r.ms.toFixed(0)} ms (${r.mibPerSec.toFixed(0)} MiB/s), ${r.checksum}, QEMU ${r.qemu} ${r.machine}`,
      );
    },
  );
  withCommon(
    guest
      .command('resume')
      .description(
        'Resume a suspended guest on this agent’s host: start QEMU with the guest’s devices ' +
          '(ballast attach) and -incoming defer -S first. The agent reads the stream from the ' +
          'device into QEMU’s incoming socket (or this command, over NBD: see suspend). ' +
          'Refuses a stream written by a newer ' +
          'QEMU or for another machine type, and one whose checksum does not match (that QEMU is ' +
          'told to quit and nothing is taken); then takes every device of the guest for this ' +
          'host (preempt-and-abort) and starts the guest.',
      )
      .argument('<GUEST>')
      .requiredOption('--qmp <QMP>', 'the new QEMU’s QMP socket')
      .option('--device <NAME>', 'the device holding the stream (default: the paging device)')
      .addOption(
        new Option(
          '--via <WHO>',
          'who moves the stream: the agent itself, or this command over NBD',
        )
          .choices(['auto', 'agent', 'nbd'])
          .default('auto'),
      ),
  ).action(
    async (
      name: string,
      o: {
        agent?: string;
        tokenFile?: string;
        json?: boolean;
        qmp: string;
        device?: string;
        via: StreamVia;
      },
    ) => {
      const r = await resumeGuest({
        guest: name,
        qmp: o.qmp,
        api: client(o),
        device: o.device,
        via: o.via,
      });
      if (o.json) return json(r);
      out(
        `resumed ${r.guest} on ${r.host} from ${r.device}: ${(r.bytes / MiB).toFixed(1)} MiB in ` +
          `${r.streamMs.toFixed(0)} ms (${r.mibPerSec.toFixed(0)} MiB/s), checksum verified; ` +
          `running after ${r.ms.toFixed(0)} ms`,
      );
    },
  );
  withCommon(
    guest
      .command('takeover')
      .description(
        'Restart a guest on HOST after its host died: HOST’s identity takes every device of ' +
          'the guest (preempt-and-abort; this waits until the dead host’s lease has run out, ' +
          'so it has fenced itself), then prints what starts the guest on HOST.',
      )
      .argument('<GUEST>')
      .option('--to-host <HOST>', 'the host the guest restarts on (default: the agent’s host)')
      .option('--device <NAME>', 'take this device (repeatable; default: the guest’s)', collect)
      .addOption(
        new Option('--format <FORMAT>', 'what to print for each device')
          .choices(['qemu', 'libvirt', 'uri'])
          .default('qemu'),
      )
      .addOption(
        new Option(
          '--guest-ram <SIZE>',
          'the guest’s RAM: its paging device is given without its suspend area, as ' +
            '`ballast attach --guest-ram` gives it (a guest that saw the whole device cannot be suspended)',
        ).argParser(sizeArg('--guest-ram')),
      ),
  ).action(async (name: string, o: TakeoverOpts) => {
    if (o.guestRam !== undefined && o.format === 'uri') {
      throw new MigrateError(
        'BALLAST_USAGE',
        '--guest-ram needs --format qemu or libvirt: an NBD URI cannot leave out the suspend area',
      );
    }
    const r = await takeover(client(o), name, {
      host: o.toHost,
      devices: o.device,
      guestRam: o.guestRam,
    });
    if (o.json) return json(r);
    for (const s of r.steps) {
      const what =
        s.did === 'taken' ? `taken from ${s.from}` : s.did === 'reserved' ? 'reserved' : 'held';
      process.stderr.write(`${s.device}: ${what} by ${r.host} in ${s.ms.toFixed(0)} ms\n`);
    }
    for (const a of r.attach)
      if (a.suspendArea) process.stderr.write(areaLine(a.device, a.suspendArea));
    r.attach.forEach((a, i) => {
      if (o.format === 'qemu') out(movableQemuArgs(a.qemu).map(shellQuote).join(' '));
      else if (o.format === 'libvirt') out(movableLibvirt(a.libvirt, i));
      else out(a.uri);
    });
  });
}
