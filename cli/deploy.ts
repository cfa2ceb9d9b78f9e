// `ballast deploy`: roll the agent out to an inventory of hosts over SSH and run
// ops there. The work is in deploy/; this file is the command line.

import { homedir } from 'node:os';
import { join } from 'node:path';
import { type Command, Option } from 'commander';
import { DeployError, describeError, isDeployError } from '../deploy/errors.js';
import { type HostSpec, loadInventory, selectHosts } from '../deploy/inventory.js';
import { KnownHosts } from '../deploy/known-hosts.js';
import { execAll, logs, status } from '../deploy/ops.js';
import type { Outcome } from '../deploy/pool.js';
import { packageRoot, packRelease, type Release } from '../deploy/release.js';
import {
  apply,
  plan,
  type RunContext,
  rollback,
  type StopResult,
  stopAgents,
  uninstall,
} from '../deploy/rollout.js';
import { positiveInt } from './options.js';

/** OpenSSH's system-wide file, read with the user's when --known-hosts is not given. */
const GLOBAL_KNOWN_HOSTS = '/etc/ssh/ssh_known_hosts';

interface Common {
  inventory: string;
  knownHosts?: string;
  acceptNew?: boolean;
  group?: string;
  parallel?: number;
  json?: boolean;
}

function common(cmd: Command, opts: { parallel?: number; json?: boolean }): Command {
  cmd
    .option('-i, --inventory <FILE>', 'the inventory (YAML)', 'inventory.yaml')
    .option(
      '-k, --known-hosts <FILE>',
      'OpenSSH known_hosts file the host keys are checked against, and new keys go to ' +
        '(default: ~/.ssh/known_hosts, with /etc/ssh/ssh_known_hosts consulted too)',
    )
    .option('--accept-new', 'accept and record the key of a host not yet in known_hosts')
    .option('-g, --group <GROUP>', 'only the hosts of this group (or this one host)');
  if (opts.parallel !== undefined) {
    // 0: all selected hosts at once
    const o = new Option(
      '-p, --parallel <N>',
      `hosts worked on at once${opts.parallel > 0 ? '' : ' (default: all)'}`,
    ).argParser(positiveInt('--parallel'));
    cmd.addOption(opts.parallel > 0 ? o.default(opts.parallel) : o);
  }
  if (opts.json) cmd.option('--json', 'print the result as JSON');
  return cmd;
}

const started = Date.now();

function progress(host: string, msg: string): void {
  const t = `${((Date.now() - started) / 1000).toFixed(1)}s`.padStart(6);
  for (const l of msg.split('\n')) process.stderr.write(`${t} ${host}: ${l}\n`);
}

function context(o: Common, signal: AbortSignal, allParallel = false): RunContext {
  const inv = loadInventory(o.inventory);
  const hosts = selectHosts(inv, o.group);
  return {
    hosts,
    knownHosts: new KnownHosts(
      o.knownHosts ?? join(homedir(), '.ssh', 'known_hosts'),
      Boolean(o.acceptNew),
      o.knownHosts ? [] : [GLOBAL_KNOWN_HOSTS],
      (m) => process.stderr.write(`deploy: ${m}\n`),
    ),
    parallel: o.parallel ?? (allParallel ? hosts.length : 1),
    progress,
    signal,
  };
}

/**
 * Runs fn with a signal that Ctrl-C (or SIGTERM) aborts: it stops starting hosts; the
 * ones in progress finish or roll back.
 */
async function interruptible<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const ac = new AbortController();
  const onSignal = (sig: string) => {
    if (!ac.signal.aborted) {
      process.stderr.write(
        `deploy: ${sig}: stopping; hosts in progress finish on their old or new release\n`,
      );
      ac.abort();
    } else {
      process.stderr.write('deploy: still finishing the hosts in progress, please wait\n');
    }
  };
  const int = () => onSignal('SIGINT');
  const term = () => onSignal('SIGTERM');
  process.on('SIGINT', int);
  process.on('SIGTERM', term);
  try {
    return await fn(ac.signal);
  } finally {
    process.off('SIGINT', int);
    process.off('SIGTERM', term);
  }
}

function outcomeError<T>(o: Outcome<T>): string {
  if (o.status === 'failed') return describeError(o.error);
  if (o.status === 'skipped') return `skipped: ${o.reason}`;
  return 'ok';
}

function outcomesJson<T>(results: Outcome<T>[]): unknown[] {
  return results.map((o) =>
    o.status === 'ok'
      ? { host: o.host, status: 'ok', ...(o.value as object) }
      : o.status === 'failed'
        ? {
            host: o.host,
            status: 'failed',
            code: isDeployError(o.error) ? o.error.code : 'DEPLOY_STEP_FAILED',
            message: (o.error as Error)?.message ?? String(o.error),
          }
        : { host: o.host, status: 'skipped', reason: o.reason },
  );
}

function printStopped(results: Outcome<StopResult>[], json: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(outcomesJson(results), null, 2)}\n`);
    return;
  }
  for (const r of results)
    process.stdout.write(`${r.host}: ${r.status === 'ok' ? r.value.result : outcomeError(r)}\n`);
}

function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length))) ?? [];
  return rows
    .map((r) =>
      r
        .map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c] ?? 0)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** Runs an action; a DeployError ends the command with its code and exit status 1. */
function run<A extends unknown[]>(fn: (...a: A) => Promise<void>): (...a: A) => Promise<void> {
  return async (...a: A) => {
    try {
      await fn(...a);
    } catch (e) {
      if (!isDeployError(e)) throw e;
      process.stderr.write(`ballast: error ${e.code}: ${e.message}\n`);
      process.exit(1);
    }
    process.exit(process.exitCode ?? 0);
  };
}

function failIfAny<T>(results: Outcome<T>[], code: DeployError['code'], what: string): void {
  const bad = results.filter((o) => o.status !== 'ok');
  if (bad.length === 0) return;
  const interrupted = bad.some(
    (o) =>
      (o.status === 'skipped' && o.reason === 'interrupted') ||
      (o.status === 'failed' && isDeployError(o.error) && o.error.code === 'DEPLOY_INTERRUPTED'),
  );
  // The host's own code goes into the summary: scripts see why, not only that.
  const why = (o: Outcome<T>): string =>
    o.status === 'skipped'
      ? o.reason
      : o.status === 'failed' && isDeployError(o.error)
        ? `failed: ${o.error.code}`
        : 'failed';
  throw new DeployError(
    interrupted ? 'DEPLOY_INTERRUPTED' : code,
    `${what}: ${bad.map((o) => `${o.host} (${why(o)})`).join(', ')}`,
  );
}

async function withRelease<T>(dir: string | undefined, fn: (r: Release) => Promise<T>) {
  const root = dir ?? packageRoot();
  process.stderr.write(`deploy: packing ${root}\n`);
  const release = await packRelease(root);
  process.stderr.write(
    `deploy: release ${release.id} (${(release.size / 1048576).toFixed(1)} MiB, sha256 ${release.sha256.slice(0, 16)}…)\n`,
  );
  try {
    return await fn(release);
  } finally {
    release.dispose();
  }
}

export function registerDeploy(program: Command): void {
  const deploy = program
    .command('deploy')
    .summary('roll the agent out to an inventory of hosts over SSH, and run ops there')
    .description(
      'Deploy the Ballast agent to the hosts of an inventory over SSH (host keys checked ' +
        'against known_hosts), and run operations on them. See `ballast deploy <command> --help`.',
    )
    .addHelpText(
      'after',
      `
Inventory (YAML): settings merge defaults < groups (in the order a host lists them) < host;
mappings merge key by key, lists replace.
  defaults: { SETTINGS }
  groups:   { NAME: { SETTINGS } }
  hosts:    { NAME: { address: HOST, groups: [NAME...], SETTINGS } }
SETTINGS:
  port: 22              user: (you)             key: FILE | sshAgent: true|SOCKET
  jump: HOST-NAME | { address, port, user, key }          prefix: /opt/ballast
  agent: { nbd, api, pools, ... }     the agent's config file; "{prefix}", "{host}" and
                                      "{address}" are replaced; dataDir defaults to
                                      PREFIX/data; the first api.listen gets /healthz
  service: { command: [ARGV], unit: ballast-agent, env: { NAME: VALUE } }
           command defaults to [node, "{release}/bin/ballast", agent, --config, "{config}"]
  timeouts: { connect: 10, step: 120, health: 30 }        (seconds)

On each host: PREFIX/releases/RELEASE, PREFIX/deploys/DEPLOY (agent.yaml, run),
PREFIX/current and PREFIX/previous (links to deploys), PREFIX/log/agent.log.

Errors (stable codes): DEPLOY_INVENTORY_INVALID, DEPLOY_HOST_KEY_UNKNOWN,
DEPLOY_HOST_KEY_CHANGED, DEPLOY_CONNECT_FAILED, DEPLOY_AUTH_FAILED, DEPLOY_HEALTH_FAILED,
DEPLOY_ROLLOUT_FAILED, DEPLOY_INTERRUPTED, ... (docs/errors.md).`,
    );

  common(
    deploy
      .command('plan')
      .summary('show what apply would change on each host')
      .description(
        'Show, per host, the release and deploy that apply would install, the agent config ' +
          'diff and the state of the agent, without changing anything.',
      )
      .option('--release-dir <DIR>', 'package directory to release (default: this Ballast)'),
    { json: true },
  ).action(
    run(async (o: Common & { releaseDir?: string }) => {
      const ctx = context(o, new AbortController().signal, true);
      await withRelease(o.releaseDir, async (release) => {
        const results = await plan(ctx, release);
        if (o.json) {
          process.stdout.write(`${JSON.stringify(outcomesJson(results), null, 2)}\n`);
        } else {
          for (const r of results) {
            const h = ctx.hosts.find((x) => x.name === r.host) as HostSpec;
            process.stdout.write(`${r.host} (${h.user}@${h.address}:${h.port})\n`);
            if (r.status !== 'ok') {
              process.stdout.write(`  error:   ${outcomeError(r)}\n`);
              continue;
            }
            const p = r.value;
            process.stdout.write(`  action:  ${p.action}\n`);
            process.stdout.write(
              `  release: ${p.current.deploy ?? '(none)'} -> ${p.desired.deploy}${p.upload ? ' (upload)' : ''}\n`,
            );
            process.stdout.write(
              `  agent:   ${p.agent.running ? `running ${p.agent.running} (pid ${p.agent.pid})` : 'stopped'}, ${p.agent.manager}\n`,
            );
            if (p.configDiff.length === 0) process.stdout.write('  config:  unchanged\n');
            else
              process.stdout.write(
                `  config:\n${p.configDiff.map((l) => `    ${l}`).join('\n')}\n`,
              );
          }
        }
        failIfAny(results, 'DEPLOY_HOSTS_FAILED', 'could not plan');
      });
    }),
  );

  common(
    deploy
      .command('apply')
      .summary('deploy the current release to the hosts, rolling')
      .description(
        'Pack this Ballast, upload it over SFTP (checksum checked), install it into a ' +
          "versioned directory under each host's prefix, write the agent config, restart the " +
          'agent (systemd where it runs, else a pidfile-supervised process), wait for /healthz ' +
          'and switch the `current` link. One host at a time by default; the first failure ' +
          'stops the rollout and that host goes back to its previous release. Hosts already ' +
          'up to date are left alone. Ctrl-C leaves each host on its old or its new release.',
      )
      .option('--release-dir <DIR>', 'package directory to release (default: this Ballast)'),
    { parallel: 1, json: true },
  ).action(
    run((o: Common & { releaseDir?: string }) =>
      interruptible(async (signal) => {
        const ctx = context(o, signal);
        await withRelease(o.releaseDir, async (release) => {
          const results = await apply(ctx, release);
          if (o.json) process.stdout.write(`${JSON.stringify(outcomesJson(results), null, 2)}\n`);
          else {
            for (const r of results) {
              const line =
                r.status === 'ok'
                  ? `${r.value.result} ${r.value.deploy}`
                  : r.status === 'failed'
                    ? `FAILED: ${describeError(r.error).split('\n').join('\n    ')}`
                    : `skipped (${r.reason})`;
              process.stdout.write(`${r.host}: ${line}\n`);
            }
          }
          failIfAny(results, 'DEPLOY_ROLLOUT_FAILED', 'rollout stopped');
        });
      }),
    ),
  );

  common(
    deploy
      .command('stop')
      .summary('stop the agent on the hosts and keep it stopped')
      .description(
        'Stop the agent on each host (SIGTERM: requests in flight finish, devices are ' +
          'flushed) and keep it stopped across reboots (its systemd unit is disabled). ' +
          '`apply` or `rollback` starts it again. Everything deployed stays in place.',
      ),
    { parallel: 1, json: true },
  ).action(
    run((o: Common) =>
      interruptible(async (signal) => {
        const ctx = context(o, signal);
        const results = await stopAgents(ctx);
        printStopped(results, Boolean(o.json));
        failIfAny(results, 'DEPLOY_HOSTS_FAILED', 'stop failed');
      }),
    ),
  );

  common(
    deploy
      .command('uninstall')
      .summary('remove the agent from the hosts')
      .description(
        'Stop the agent on each host and remove what deploy put there: the systemd unit, and ' +
          "under the host's prefix the releases, deploys, links, run and log directories. The " +
          "rest of the prefix (PREFIX/data: the agent's state; pools under the prefix: the " +
          'devices) is kept unless --purge. Nothing outside the prefix is touched.',
      )
      .option('--purge', 'remove the whole prefix, data and pools in it: those devices are lost'),
    { parallel: 1, json: true },
  ).action(
    run((o: Common & { purge?: boolean }) =>
      interruptible(async (signal) => {
        const ctx = context(o, signal);
        const results = await uninstall(ctx, Boolean(o.purge));
        printStopped(results, Boolean(o.json));
        failIfAny(results, 'DEPLOY_HOSTS_FAILED', 'uninstall failed');
      }),
    ),
  );

  common(
    deploy
      .command('rollback')
      .summary('go back to the previous deploy on each host')
      .description(
        'Start the previous deploy (or --to DEPLOY), wait for /healthz and switch `current` ' +
          'back, one host at a time by default; a host that fails goes back to what it ran.',
      )
      .option('--to <DEPLOY>', 'the deploy id to go back to (default: previous)'),
    { parallel: 1, json: true },
  ).action(
    run((o: Common & { to?: string }) =>
      interruptible(async (signal) => {
        const ctx = context(o, signal);
        const results = await rollback(ctx, o.to);
        if (o.json) process.stdout.write(`${JSON.stringify(outcomesJson(results), null, 2)}\n`);
        else {
          for (const r of results) {
            process.stdout.write(
              `${r.host}: ${r.status === 'ok' ? `rolled back to ${r.value.deploy}` : outcomeError(r)}\n`,
            );
          }
        }
        failIfAny(results, 'DEPLOY_ROLLOUT_FAILED', 'rollback stopped');
      }),
    ),
  );

  common(
    deploy
      .command('status')
      .summary('version, health, devices and reservations per host')
      .description(
        'Show per host: the current deploy and version, whether the agent runs, its /healthz, ' +
          'and the device and reservation counts from its API (through the SSH connection).',
      ),
    { json: true },
  ).action(
    run(async (o: Common) => {
      const ctx = context(o, new AbortController().signal, true);
      const results = await status(ctx);
      if (o.json) {
        process.stdout.write(`${JSON.stringify(outcomesJson(results), null, 2)}\n`);
      } else {
        const rows = [['HOST', 'VERSION', 'DEPLOY', 'AGENT', 'HEALTH', 'DEVICES', 'RESERVATIONS']];
        for (const r of results) {
          if (r.status !== 'ok') {
            const code =
              r.status === 'failed' && isDeployError(r.error) ? r.error.code : 'unreachable';
            rows.push([r.host, '-', '-', '-', code, '-', '-']);
            continue;
          }
          const s = r.value;
          const num = (n: number | null) => (n === null ? '-' : String(n));
          rows.push([
            s.host,
            s.version ?? '-',
            s.deploy ?? '(none)',
            s.agent === 'running' ? `running (pid ${s.pid})` : 'stopped',
            s.health,
            num(s.devices),
            num(s.reservations),
          ]);
        }
        process.stdout.write(`${table(rows)}\n`);
        for (const r of results) {
          if (r.status !== 'ok') process.stderr.write(`${r.host}: ${outcomeError(r)}\n`);
        }
      }
      failIfAny(results, 'DEPLOY_HOSTS_FAILED', 'no status from');
    }),
  );

  common(
    deploy
      .command('exec')
      .summary('run a command on every host (or a group) in parallel')
      .description(
        'Run CMD with the remote shell on each selected host, all at once unless --parallel; ' +
          'output lines are prefixed with the host name, and a summary of exit codes follows. ' +
          'Exits 1 if any host failed.',
      )
      .argument('<CMD...>', 'the command (put it after --)')
      .addOption(
        new Option('--timeout <SECONDS>', 'kill the command after this long').argParser(
          positiveInt('--timeout'),
        ),
      ),
    { parallel: 0, json: true },
  ).action(
    run(async (cmd: string[], o: Common & { timeout?: number }) => {
      const ctx = context(
        { ...o, parallel: o.parallel || undefined },
        new AbortController().signal,
        true,
      );
      const width = Math.max(...ctx.hosts.map((h) => h.name.length));
      const captured: Record<string, { stdout: string[]; stderr: string[] }> = {};
      const results = await execAll(
        ctx,
        cmd.join(' '),
        (host, stream, line) => {
          if (o.json) {
            captured[host] ??= { stdout: [], stderr: [] };
            captured[host][stream].push(line);
            return;
          }
          (stream === 'stdout' ? process.stdout : process.stderr).write(
            `${host.padEnd(width)} | ${line}\n`,
          );
        },
        o.timeout === undefined ? undefined : o.timeout * 1000,
      );
      const failed = results.filter((r) => r.status !== 'ok' || r.value.code !== 0);
      if (o.json) {
        process.stdout.write(
          `${JSON.stringify(
            outcomesJson(results).map((x) => ({
              ...(x as object),
              ...(captured[(x as { host: string }).host] ?? { stdout: [], stderr: [] }),
            })),
            null,
            2,
          )}\n`,
        );
      } else {
        process.stderr.write('--\n');
        for (const r of results) {
          const what =
            r.status === 'ok'
              ? `exit ${r.value.code}${r.value.signal ? ` (signal ${r.value.signal})` : ''}`
              : outcomeError(r);
          process.stderr.write(`${r.host.padEnd(width)}   ${what}\n`);
        }
      }
      if (failed.length > 0) {
        throw new DeployError(
          'DEPLOY_EXEC_FAILED',
          `the command failed on ${failed.length} of ${results.length} hosts: ${failed.map((r) => r.host).join(', ')}`,
        );
      }
    }),
  );

  common(
    deploy
      .command('logs')
      .summary("tail of the agent's log on each host")
      .addOption(
        new Option('-n, --lines <N>', 'lines per host')
          .default(50)
          .argParser(positiveInt('--lines')),
      ),
    {},
  ).action(
    run(async (o: Common & { lines: number }) => {
      const ctx = context(o, new AbortController().signal, true);
      const results = await logs(ctx, o.lines);
      for (const r of results) {
        process.stdout.write(`==> ${r.host} <==\n`);
        if (r.status === 'ok')
          process.stdout.write(r.value.endsWith('\n') || !r.value ? r.value : `${r.value}\n`);
        else process.stdout.write(`(${outcomeError(r)})\n`);
      }
      failIfAny(results, 'DEPLOY_HOSTS_FAILED', 'no logs from');
    }),
  );
}
