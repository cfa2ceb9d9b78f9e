// `ballast dumpd` (the dump daemon) and `ballast dump now|ls|get|rm` (dumps on dump
// devices, from any host). A DEVICE is an NBD URI, or the name of a device on the
// agent (--agent, BALLAST_AGENT, or the local one).

import { closeSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import http from 'node:http';
import type { Command } from 'commander';
import { Client } from '../agent/api-client.js';
import { BallastError } from '../agent/errors.js';
import { type DumpEntry, DumpError } from '../dumpd/catalog.js';
import { DEFAULT_LISTEN, DEFAULT_RUN_DIR, type DeviceRef, parseConfig } from '../dumpd/config.js';
import { kdumpFromElf, writeElfFromStream } from '../dumpd/core.js';
import { type AgentDeviceRef, Dumpd, type DumpEvent, tokenPath } from '../dumpd/daemon.js';
import { DumpDevice } from '../dumpd/device.js';
import { FlattenedReader, isFlattened } from '../dumpd/flattened.js';
import type { DumpResult } from '../dumpd/job.js';
import { Pull, readSnapshotHeader } from '../dumpd/migration.js';
import { memoryRoutes } from '../guestd/memory/api.js';
import { type MemoryConfig, parseMemoryConfig } from '../guestd/memory/config.js';
import { MemoryController } from '../guestd/memory/controller.js';
import type { RebalanceEvent } from '../guestd/memory/policy.js';
import { readHost } from '../guestd/memory/sources.js';
import { table } from './manage.js';

/** Coded errors of the NBD client, QMP, dumpd and memory reach the user as `ballast: error CODE`. */
export function coded(e: unknown): unknown {
  if (e instanceof BallastError) return e;
  const code = (e as { code?: unknown })?.code;
  if (typeof code === 'string' && /^(NBD|QMP|DUMP|MEMORY)_[A-Z0-9_]+$/.test(code))
    return new BallastError(code, (e as Error).message, { cause: e });
  return e;
}

function action<A extends unknown[]>(f: (...a: A) => Promise<void>): (...a: A) => Promise<void> {
  return async (...a: A) => {
    try {
      await f(...a);
    } catch (e) {
      throw coded(e);
    }
  };
}

/** An agent device's NBD URI, from the agent's attach endpoint. */
async function agentDeviceUri(agent: string | undefined, device: string, tokenFile?: string) {
  const c = new Client({ agent, tokenFile });
  const r = (await c.request(
    'GET',
    `/v1/devices/${encodeURIComponent(device)}/attach?format=qemu`,
  )) as {
    uri?: string;
  };
  if (!r.uri)
    throw new DumpError('DUMP_DEVICE_UNRESOLVED', `the agent gave no NBD URI for ${device}`);
  return r.uri;
}

export async function resolveDevice(ref: DeviceRef): Promise<string> {
  if ('uri' in ref) return ref.uri;
  return agentDeviceUri(ref.agent, ref.device, ref.tokenFile);
}

/**
 * A `memory.rebalanced` event to the agents of the guests' paging devices (each once),
 * for their notification recipients. Best effort: a failure is logged.
 */
function postMemoryEvent(cfg: MemoryConfig, ev: RebalanceEvent): void {
  const agents = new Map<string, { agent?: string; tokenFile?: string }>();
  for (const g of cfg.guests)
    if (g.pagingDevice !== undefined)
      agents.set(`${g.agent ?? ''}\u0000${g.tokenFile ?? ''}`, {
        ...(g.agent !== undefined ? { agent: g.agent } : {}),
        ...(g.tokenFile !== undefined ? { tokenFile: g.tokenFile } : {}),
      });
  for (const a of agents.values())
    new Client(a)
      .request('POST', '/v1/events', { kind: ev.kind, subject: 'memory', data: ev.data })
      .catch((e: Error) => process.stderr.write(`dumpd: memory: event not posted: ${e.message}\n`));
}

/** A dump event to the agent of an agent device: POST /v1/events (recorded for its recipients). */
export async function postDumpEvent(ref: AgentDeviceRef, ev: DumpEvent): Promise<void> {
  const c = new Client({ agent: ref.agent, tokenFile: ref.tokenFile });
  await c.request('POST', '/v1/events', ev);
}

interface DeviceOpts {
  agent?: string;
  tokenFile?: string;
  tlsCerts?: string;
}

async function openDevice(device: string, o: DeviceOpts): Promise<DumpDevice> {
  const uri = /^nbds?(\+unix)?:\/\//.test(device)
    ? device
    : await agentDeviceUri(o.agent, device, o.tokenFile);
  return DumpDevice.open(uri, o.tlsCerts ? { tls: { dir: o.tlsCerts } } : {});
}

function human(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${u[i]}`;
}

/** How long a finished dump took, and its rate; nulls while it is written. */
/**
 * A dump found unfinished after its writer stopped (catalog.ts, recoverInterrupted):
 * what it had written and when it stopped are not known (its finish time is when it
 * was found; its space was freed).
 */
export function interrupted(e: Pick<DumpEntry, 'state' | 'reason'>): boolean {
  return e.state === 'failed' && e.reason === 'interrupted';
}

export function dumpTiming(
  e: Pick<DumpEntry, 'createdAt' | 'finishedAt' | 'length' | 'state' | 'reason'>,
): {
  durationMs: number | null;
  bytesPerSecond: number | null;
} {
  if (!e.finishedAt || e.finishedAt < e.createdAt || interrupted(e))
    return { durationMs: null, bytesPerSecond: null };
  const durationMs = e.finishedAt - e.createdAt;
  return {
    durationMs,
    bytesPerSecond: durationMs > 0 ? Math.round((e.length * 1000) / durationMs) : null,
  };
}

/** "12.3 s", "850 ms", "2 min 5 s". */
export function humanDuration(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

function entryJson(e: DumpEntry) {
  const iso = (t: number) => (t ? new Date(t).toISOString() : null);
  return {
    ...e,
    createdAt: new Date(e.createdAt).toISOString(),
    finishedAt: iso(e.finishedAt),
    panicAt: iso(e.panicAt),
    runningAt: iso(e.runningAt),
    // The timeline of a panic, when known: service downtime and time to a complete dump.
    panicToRunningMs: e.panicAt && e.runningAt ? e.runningAt - e.panicAt : null,
    panicToCompleteMs:
      e.panicAt && e.finishedAt && e.state === 'complete' ? e.finishedAt - e.panicAt : null,
    ...dumpTiming(e),
  };
}

/**
 * Writes an early-reboot dump (a migration stream) as an ELF core or a kdump file,
 * reading the stream off the device once. Returns the checksum of everything read.
 */
async function convertStream(
  dev: DumpDevice,
  e: DumpEntry,
  output: string,
  format: 'elf' | 'kdump-zlib',
  onBytes: (n: number) => void,
): Promise<string> {
  const { chunks, checksum } = dev.pieces(e);
  const counting: AsyncIterator<Buffer> = {
    next: async () => {
      const r = await chunks.next();
      if (!r.done) onBytes(r.value.length);
      return r;
    },
  };
  const p = new Pull(counting);
  const meta = await readSnapshotHeader(p);
  const elfPath = format === 'elf' ? output : `${output}.elf~`;
  const fd = openSync(elfPath, 'w+', 0o600);
  try {
    await writeElfFromStream(p, meta, fd);
    // The device state after the RAM is not needed, but the checksum covers it.
    for (let r = await counting.next(); !r.done; r = await counting.next());
    if (format === 'kdump-zlib') {
      const out = openSync(output, 'w', 0o600);
      try {
        kdumpFromElf(fd, out, meta.cpus.length);
      } finally {
        closeSync(out);
      }
    }
  } finally {
    closeSync(fd);
    if (format !== 'elf') rmSync(elfPath, { force: true });
  }
  return checksum();
}

function parseId(s: string): number {
  const n = Number(s);
  if (!Number.isInteger(n) || n <= 0) throw new DumpError('DUMP_NOT_FOUND', `bad dump id ${s}`);
  return n;
}

/** A one-line progress bar on stderr, redrawn at most 10 times a second. */
function progress(total: number, enabled: boolean) {
  let last = 0;
  const draw = (done: number, final = false) => {
    if (!enabled) return;
    const now = Date.now();
    if (!final && now - last < 100) return;
    last = now;
    const pct = total ? Math.floor((done / total) * 100) : 100;
    const width = 30;
    const fill = Math.round((pct / 100) * width);
    process.stderr.write(
      `\r[${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${String(pct).padStart(3)}% ${human(done)} / ${human(total)}${final ? '\n' : ''}`,
    );
  };
  return draw;
}

/**
 * The bearer token for dumpd's TCP listener: --dumpd-token-file, else
 * BALLAST_DUMPD_TOKEN, else the local dumpd's own (DEFAULT_RUN_DIR/token, for
 * whoever may read it: root).
 */
export function dumpdToken(file: string | undefined): string | undefined {
  if (file !== undefined) {
    try {
      return readFileSync(file, 'utf8').trim();
    } catch (e) {
      throw new DumpError(
        'DUMP_UNAUTHORIZED',
        `cannot read the token file ${file}: ${(e as Error).message}`,
      );
    }
  }
  if (process.env.BALLAST_DUMPD_TOKEN) return process.env.BALLAST_DUMPD_TOKEN.trim();
  try {
    return readFileSync(tokenPath(DEFAULT_RUN_DIR), 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

export function dumpdRequest(
  where: string,
  method: string,
  path: string,
  token?: string,
): Promise<unknown> {
  const target =
    where.startsWith('/') || where.startsWith('unix:')
      ? { socketPath: where.replace(/^unix:/, '') }
      : (() => {
          const u = new URL(where.includes('://') ? where : `http://${where}`);
          return { host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port || 80) };
        })();
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        ...target,
        method,
        path,
        headers: {
          accept: 'application/json',
          ...(token && !('socketPath' in target) ? { authorization: `Bearer ${token}` } : {}),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          let body: unknown;
          try {
            body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            body = undefined;
          }
          const b = body as { code?: string; message?: string } | undefined;
          if ((res.statusCode ?? 500) >= 400 || body === undefined)
            reject(
              new DumpError(
                b?.code ?? 'DUMP_FAILED',
                b?.message ?? `dumpd answered HTTP ${res.statusCode}`,
              ),
            );
          else resolve(body);
        });
      },
    );
    req.on('error', (e: NodeJS.ErrnoException) =>
      reject(
        new DumpError(
          'DUMP_DUMPD_UNREACHABLE',
          `cannot reach dumpd at ${where}: ${e.code ?? e.message}; is \`ballast dumpd\` running ` +
            '(and listening yet)? Another listener: --dumpd ADDR or BALLAST_DUMPD',
        ),
      ),
    );
    req.end();
  });
}

export function registerDump(program: Command): void {
  program
    .command('dumpd')
    .summary(
      'watch guests over QMP; on a panic dump their memory onto their dump device, then reboot',
    )
    .description(
      'Run the dump daemon. For every configured guest (and every QMP socket in a watched ' +
        'directory) it keeps a QMP connection, reconnecting when QEMU restarts. On GUEST_PANICKED ' +
        '(QEMU started with -device pvpanic -action panic=pause) it streams dump-guest-memory ' +
        "through a FIFO onto the guest's dump device over NBD, marks the dump complete with its " +
        'CRC-32 (or failed), then applies the after-dump policy. /metrics and the control API ' +
        'are on --listen (default 127.0.0.1:9411); on TCP a dump on request needs the bearer token ' +
        'dumpd writes to RUNDIR/token (mode 0600). SIGTERM or SIGINT lets running dumps finish, then exits 0.',
    )
    .option(
      '-c, --config <FILE>',
      'YAML or JSON configuration (guests, watch, defaults)',
      '/etc/ballast/dumpd.yaml',
    )
    .option('-l, --listen <ADDR>', 'HOST:PORT or a Unix socket path for /metrics and the API')
    .addHelpText(
      'after',
      `
Config example:
  listen: 127.0.0.1:9411
  runDir: /run/ballast-dumpd
  defaults: { format: elf, after: reboot, keep: 3 }   # format: elf | kdump-zlib | win-dmp ...
  guests:
    - { name: web1, qmp: /run/qemu/web1.qmp, device: "nbd+unix:///web1-dump?socket=/run/ballast/nbd.sock" }
    - { name: db1, qmp: /run/qemu/db1.qmp, agentDevice: db1-dump, after: pause, keep: 1 }
  watch:
    - { dir: /run/qemu, suffix: .qmp, device: "nbd+unix:///{guest}-dump?socket=/run/ballast/nbd.sock" }`,
    )
    .action(
      action(async (o: { config: string; listen?: string }) => {
        let text: string;
        try {
          text = readFileSync(o.config, 'utf8');
        } catch (e) {
          throw new DumpError(
            'DUMP_BAD_CONFIG',
            `cannot read ${o.config}: ${(e as Error).message}`,
          );
        }
        const cfg = parseConfig(text, o.config);
        if (o.listen) cfg.listen = o.listen;
        // The memory part (guestd/memory): refused here, before anything starts, when
        // its pool cannot hold the entitlements.
        const memCfg = parseMemoryConfig(text, readHost().memTotal, o.config);
        let memory: MemoryController | null = null;
        const d = new Dumpd(cfg, {
          resolveDevice: (ref) => resolveDevice(ref),
          postEvent: postDumpEvent,
          log: (s) => process.stderr.write(`dumpd: ${s}\n`),
          routes: (method, url) =>
            memory ? memoryRoutes(memory)(method, url) : Promise.resolve(null),
        });
        const addr = await d.start();
        if (memCfg) {
          const mc = new MemoryController(memCfg, {
            monitor: (name) => d.monitorOf(name),
            registry: d.registry,
            onEvent: (e) => postMemoryEvent(memCfg, e),
            log: (s) => process.stderr.write(`dumpd: ${s}\n`),
          });
          memory = mc;
          mc.start();
        }
        process.stderr.write(`dumpd: listening on ${addr}\n`);
        await new Promise<void>((resolve) => {
          const stop = () => {
            process.stderr.write('dumpd: stopping\n');
            void Promise.all([memory?.stop(), d.stop()]).then(() => resolve());
          };
          process.once('SIGTERM', stop);
          process.once('SIGINT', stop);
        });
      }),
    );

  const dump = program
    .command('dump')
    .summary('dumps on dump devices: now, ls, get, rm')
    .description(
      'Work with crash dumps. DEVICE is an NBD URI (nbd://HOST:PORT/EXPORT, ' +
        'nbd+unix:///EXPORT?socket=PATH) or the name of a device on the agent.',
    );
  const common = (c: Command) =>
    c
      .option(
        '--agent <URL>',
        'the agent, for DEVICE names (default BALLAST_AGENT or the local one)',
      )
      .option('--token-file <FILE>', 'bearer token for the agent (default BALLAST_TOKEN)')
      .option(
        '--tls-certs <DIR>',
        'STARTTLS to the device with ca-cert.pem, client-cert.pem, client-key.pem from DIR (nbds:// URIs use TLS anyway)',
      );

  dump
    .command('now')
    .description('ask dumpd to dump a guest now; waits until the dump is settled')
    .argument('<GUEST>')
    .option('--dumpd <ADDR>', `dumpd's listener (default BALLAST_DUMPD or ${DEFAULT_LISTEN})`)
    .option(
      '--dumpd-token-file <FILE>',
      `dumpd's bearer token, for a TCP listener (default BALLAST_DUMPD_TOKEN, else ${tokenPath(DEFAULT_RUN_DIR)})`,
    )
    .option(
      '--after <WHAT>',
      "then: reboot | pause | poweroff | none (default: the guest's configured policy if it sits panicked, else none)",
    )
    .option(
      '--early-reboot',
      'reboot the guest as soon as a background snapshot of its memory has started, and stream the snapshot to the device meanwhile (falls back to dump-then-reboot where QEMU cannot)',
    )
    .option('--json', 'print the result as JSON')
    .action(
      action(
        async (
          guest: string,
          o: {
            dumpd?: string;
            dumpdTokenFile?: string;
            after?: string;
            earlyReboot?: boolean;
            json?: boolean;
          },
        ) => {
          const where = o.dumpd ?? process.env.BALLAST_DUMPD ?? DEFAULT_LISTEN;
          const params = new URLSearchParams();
          // An early reboot reboots: that is its point.
          if (o.earlyReboot) params.set('after', 'reboot');
          else if (o.after !== undefined) params.set('after', o.after);
          if (o.earlyReboot) params.set('mode', 'early-reboot');
          const qs = params.toString();
          const q = qs ? `?${qs}` : '';
          const r = (await dumpdRequest(
            where,
            'POST',
            `/v1/guests/${encodeURIComponent(guest)}/dump${q}`,
            dumpdToken(o.dumpdTokenFile),
          )) as DumpResult;
          if (o.json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
          else if (r.ok && r.entry)
            process.stdout.write(
              `dump ${r.entry.id} of ${guest}: ${human(r.bytes)} in ${(r.durationMs / 1000).toFixed(1)} s, ${r.entry.checksum}; after: ${r.after}${r.fallback ? ` (dump-then-reboot: ${r.fallback})` : ''}${r.runningAt && r.panicAt ? `; running again after ${r.runningAt - r.panicAt} ms` : ''}\n`,
            );
          if (!r.ok)
            throw new DumpError(
              r.error?.code ?? 'DUMP_FAILED',
              r.error?.message ?? 'the dump failed',
            );
        },
      ),
    );

  common(dump.command('ls').description('list the dumps on a dump device').argument('<DEVICE>'))
    .option('--json', 'print JSON')
    .action(
      action(async (device: string, o: DeviceOpts & { json?: boolean }) => {
        const dev = await openDevice(device, o);
        try {
          const es = [...dev.catalog.entries].sort((a, b) => a.id - b.id);
          if (o.json) {
            process.stdout.write(
              `${JSON.stringify({ size: dev.size, dumps: es.map(entryJson) }, null, 2)}\n`,
            );
            return;
          }
          process.stdout.write(
            `${table(
              [
                'ID',
                'GUEST',
                'FORMAT',
                'STATE',
                'DOWNTIME',
                'SIZE',
                'CREATED',
                'TOOK',
                'RATE',
                'CHECKSUM',
              ],
              es.map((e) => {
                const t = dumpTiming(e);
                return [
                  String(e.id),
                  e.guest,
                  e.format,
                  e.state === 'failed' && e.reason ? `failed (${e.reason.split(':')[0]})` : e.state,
                  e.panicAt && e.runningAt ? `${e.runningAt - e.panicAt} ms` : '-',
                  interrupted(e) ? '-' : human(e.length),
                  new Date(e.createdAt).toISOString().replace(/\.\d+Z$/, 'Z'),
                  t.durationMs === null ? '-' : humanDuration(t.durationMs),
                  t.bytesPerSecond === null ? '-' : `${human(t.bytesPerSecond)}/s`,
                  e.checksum ? e.checksum.slice(0, 23) : '-',
                ];
              }),
            )}\n`,
          );
        } finally {
          await dev.close();
        }
      }),
    );

  common(
    dump
      .command('get')
      .description(
        'copy a dump off the device into FILE, verifying its checksum. kdump dumps are stored ' +
          "in makedumpfile's flattened format; --reassemble writes a regular kdump file instead " +
          '(what makedumpfile -R does), which crash opens directly. Early-reboot dumps are ' +
          "stored as QEMU's migration stream and written as an ELF core (--format elf, the " +
          'default) or a kdump file (--format kdump-zlib); --format migration copies the stream.',
      )
      .argument('<DEVICE>')
      .argument('<ID>'),
  )
    .requiredOption('-o, --output <FILE>', 'where to write the dump')
    .option('--reassemble', 'turn a flattened kdump into a regular kdump file')
    .option(
      '--format <FORMAT>',
      'for early-reboot dumps: elf (default) | kdump-zlib | migration (the stored stream)',
    )
    .option('--progress', 'show a progress bar (default: when stderr is a terminal)')
    .option('--no-progress', 'no progress bar')
    .action(
      action(
        async (
          device: string,
          id: string,
          o: DeviceOpts & {
            output: string;
            reassemble?: boolean;
            progress?: boolean;
            format?: string;
          },
        ) => {
          const dev = await openDevice(device, o);
          try {
            const e = dev.find(parseId(id));
            if (e.state !== 'complete')
              throw new DumpError(
                'DUMP_NOT_COMPLETE',
                `dump ${e.id} is ${e.state}${e.reason ? ` (${e.reason})` : ''}`,
              );
            const bar = progress(e.length, o.progress ?? process.stderr.isTTY === true);
            let done = 0;
            /** What was written must be what was stored: else no output file is left. */
            const verify = (sum: string) => {
              if (sum === e.checksum) return;
              rmSync(o.output, { force: true });
              throw new DumpError(
                'DUMP_CHECKSUM_MISMATCH',
                `dump ${e.id}: read back ${sum}, the catalog says ${e.checksum}`,
              );
            };
            const want = o.format ?? (e.format === 'migration' ? 'elf' : e.format);
            if (want !== e.format) {
              if (e.format !== 'migration' || (want !== 'elf' && want !== 'kdump-zlib'))
                throw new DumpError(
                  'DUMP_BAD_FORMAT',
                  `dump ${e.id} is stored as ${e.format}; only early-reboot dumps (migration) convert, to elf or kdump-zlib`,
                );
              const sum = await convertStream(dev, e, o.output, want, (n) => {
                done += n;
                bar(done);
              });
              bar(done, true);
              verify(sum);
              process.stderr.write(
                `dump ${e.id}: ${human(e.length)} stream, ${sum} verified, written as ${want}\n`,
              );
              return;
            }
            const head = e.length
              ? await dev.nbd.read(e.offset, Math.min(16, e.length))
              : Buffer.alloc(0);
            const flat = o.reassemble === true && isFlattened(head);
            if (o.reassemble && !flat)
              throw new DumpError(
                'DUMP_NOT_FLATTENED',
                `dump ${e.id} (${e.format}) is not in the flattened format`,
              );
            const fd = openSync(o.output, 'w', 0o600);
            let sum: string;
            try {
              if (flat) {
                const fr = new FlattenedReader((off, data) => {
                  writeSync(fd, data, 0, data.length, off);
                });
                sum = await dev.read(e, async (chunk) => {
                  await fr.push(chunk);
                  done += chunk.length;
                  bar(done);
                });
                fr.finish();
              } else {
                sum = await dev.read(e, (chunk, pos) => {
                  writeSync(fd, chunk, 0, chunk.length, pos);
                  done += chunk.length;
                  bar(done);
                });
              }
            } finally {
              closeSync(fd);
            }
            bar(done, true);
            verify(sum);
            process.stderr.write(
              `dump ${e.id}: ${human(e.length)}, ${sum} verified${flat ? ', reassembled' : ''}\n`,
            );
          } finally {
            await dev.close();
          }
        },
      ),
    );

  common(
    dump
      .command('rm')
      .description('remove a dump and trim its space')
      .argument('<DEVICE>')
      .argument('<ID>'),
  ).action(
    action(async (device: string, id: string, o: DeviceOpts) => {
      const dev = await openDevice(device, o);
      try {
        const e = await dev.remove(parseId(id));
        process.stderr.write(`dump ${e.id} of ${e.guest} removed\n`);
      } finally {
        await dev.close();
      }
    }),
  );
}
