// The `ballast` command line. Exit codes: 0 success, 1 runtime error (a
// stable BALLAST_* code is printed), 2 usage error.

import { readFileSync } from 'node:fs';
import { Command, CommanderError, Option } from 'commander';
import { EXIT } from '../agent/api-client.js';
import { isBallastError } from '../agent/errors.js';
import type { CacheMode } from '../agent/sparse-file.js';
import { parseSize } from '../agent/units.js';
import { defaultWorkers } from '../nbd/workers.js';
import { registerAgent } from './agent.js';
import { registerCluster } from './cluster.js';
import { registerDeploy } from './deploy.js';
import { registerDump } from './dump.js';
import { registerManagement } from './manage.js';
import { registerMemory } from './memory.js';
import { registerGuest, registerMigrate } from './migrate.js';
import { registerNotify } from './notify.js';
import { nonNegativeInt, positiveInt, sizeArg } from './options.js';
import { registerPr } from './pr.js';
import { type ExportSpec, parseExportSpec, serve } from './serve.js';

/** package.json sits two levels up from dist/cli/, one from cli/ (tests). */
function packageVersion(): string {
  for (const rel of ['../../package.json', '../package.json']) {
    try {
      const p = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as {
        name?: string;
        version?: string;
      };
      if (p.name === 'ballast' && p.version) return p.version;
    } catch {}
  }
  return '0.0.0';
}
const pkg = { version: packageVersion() };

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

export function buildProgram(): Command {
  const program = new Command('ballast')
    .description(
      'Ballast: a virtual I/O server for Linux/KVM. Serves virtual block devices over NBD, ' +
        'backed by sparse files, for guest paging (swap) and crash-dump devices.',
    )
    .version(pkg.version, '-V, --version', 'print the version and exit')
    .helpOption('-h, --help', 'show help for ballast or for a command (ballast <command> --help)')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();

  program
    .command('serve')
    .summary('serve files over NBD, like qemu-nbd or nbdkit file')
    .description(
      'Serve one or more files over the NBD protocol (fixed newstyle, structured replies, ' +
        'base:allocation). FILE is created as a sparse file when it does not exist and --size ' +
        'is given. With a single export, the empty export name reaches it too, so ' +
        'nbd://127.0.0.1/ works. SIGTERM or SIGINT stops accepting, finishes the requests ' +
        'in flight, flushes and exits 0.',
    )
    .argument('[FILE]', 'the file to serve (or use --export for several)')
    .option('-s, --size <SIZE>', 'size of FILE when creating it, e.g. 64M, 10G (binary units)')
    .option('-n, --name <NAME>', 'export name for FILE (default: the empty name)')
    .option('-r, --read-only', 'serve read-only: writes fail with EPERM, no write flags advertised')
    .option('-d, --description <TEXT>', 'export description shown by nbdinfo and NBD_OPT_LIST')
    .addOption(
      new Option(
        '--cache <MODE>',
        "host page cache for FILE's writes: writeback, or none (aligned writes use O_DIRECT, " +
          'as the agent does for dump devices)',
      ).choices(['writeback', 'none']),
    )
    .option(
      '-e, --export <SPEC>',
      'serve another file: name=N,file=F[,size=S][,read-only][,cache=none][,description=D] (repeatable)',
      collect,
    )
    .option(
      '-l, --listen <HOST:PORT>',
      'listen on a TCP address (repeatable; default 127.0.0.1:10809 unless --socket is given)',
      collect,
    )
    .option('-u, --socket <PATH>', 'listen on a Unix socket (repeatable)', collect)
    .addOption(
      new Option('--max-connections <N>', 'connections served at once; more are closed')
        .default(256)
        .argParser(positiveInt('--max-connections')),
    )
    .addOption(
      new Option(
        '--handshake-limit <SECONDS>',
        'drop clients that have not finished the handshake (TLS included) in this time; 0: no limit',
      )
        .default(10)
        .argParser(nonNegativeInt('--handshake-limit')),
    )
    .addOption(
      new Option('--handshake-timeout <SECONDS>', 'the former name of --handshake-limit')
        .argParser(nonNegativeInt('--handshake-timeout'))
        .hideHelp(),
    )
    .addOption(
      new Option(
        '--max-handshakes <N>',
        'connections still in handshake at once; past it the oldest of them is closed',
      )
        .default(64)
        .argParser(positiveInt('--max-handshakes')),
    )
    .addOption(
      new Option(
        '--max-per-source <N>',
        'connections per client address (or per uid on a Unix socket); 0: no limit',
      )
        .default(0)
        .argParser(nonNegativeInt('--max-per-source')),
    )
    .addOption(
      new Option(
        '--workers <N>',
        'threads serving established connections (default auto: the cores this process may use; 1: one event loop)',
      ).argParser((v: string) => (v === 'auto' ? defaultWorkers() : positiveInt('--workers')(v))),
    )
    .addOption(
      new Option(
        '--thread-buffers <SIZE>',
        'data buffers all connections of one thread hold at once (default 16M); past it they wait for replies to leave',
      ).argParser(sizeArg('--thread-buffers')),
    )
    .option('-v, --verbose', 'log every connection and refused request to stderr')
    .addOption(
      new Option('--tls <MODE>', 'STARTTLS: off, allow (offer it) or require (refuse plaintext)')
        .choices(['off', 'allow', 'require'])
        .default('off'),
    )
    .option('--tls-cert <PEM>', 'the server certificate (X.509)')
    .option('--tls-key <PEM>', 'the private key of --tls-cert')
    .option(
      '--tls-ca <PEM>',
      'CA certificate(s): clients must present a certificate they signed; its CN names the client',
    )
    .option(
      '--tls-psk-file <FILE>',
      'pre-shared keys, one username:hexkey per line (psktool, nbdkit, QEMU); the username names the client',
    )
    .option(
      '--identity <WHO=NAME>',
      'name clients TLS does not name: ADDRESS=NAME (TCP source) or uid:N=NAME (Unix socket peer) (repeatable)',
      collect,
    )
    .addHelpText(
      'after',
      `
Examples:
  ballast serve disk.img --size 10G                 # nbd://127.0.0.1:10809/
  ballast serve disk.img --socket /run/disk.sock    # nbd+unix:///?socket=/run/disk.sock
  ballast serve --export name=swap,file=swap.img,size=4G \\
                --export name=dump,file=dump.img,size=8G,read-only --listen 127.0.0.1:10809
  ballast serve disk.img --tls require --tls-cert server-cert.pem --tls-key server-key.pem \\
                --tls-ca ca-cert.pem                # nbds://127.0.0.1/ with a client certificate

Errors (stable codes): BALLAST_FILE_NOT_FOUND, BALLAST_FILE_LOCKED, BALLAST_BAD_SIZE,
BALLAST_SIZE_MISMATCH, BALLAST_BAD_EXPORT, BALLAST_BAD_ADDRESS, BALLAST_ADDRESS_IN_USE,
BALLAST_TLS_CONFIG, BALLAST_BAD_IDENTITY.`,
    )
    .action(async (file: string | undefined, o: Record<string, unknown>) => {
      const exports: ExportSpec[] = [];
      if (file !== undefined) {
        exports.push({
          name: (o.name as string | undefined) ?? '',
          file,
          size: o.size === undefined ? undefined : parseSize(o.size as string),
          readOnly: Boolean(o.readOnly),
          description: (o.description as string | undefined) ?? '',
          cache: o.cache as CacheMode | undefined,
        });
      } else if (o.size !== undefined || o.readOnly || o.name || o.cache) {
        throw new CommanderError(
          2,
          'ballast.usage',
          '--size, --name, --read-only and --cache apply to FILE; with --export put them in the spec',
        );
      }
      for (const spec of (o.export as string[] | undefined) ?? [])
        exports.push(parseExportSpec(spec));
      await serve({
        exports,
        listen: (o.listen as string[] | undefined) ?? [],
        socket: (o.socket as string[] | undefined) ?? [],
        maxConnections: o.maxConnections as number,
        handshakeTimeoutMs:
          ((o.handshakeTimeout as number | undefined) ?? (o.handshakeLimit as number)) * 1000,
        maxHandshakes: o.maxHandshakes as number,
        maxPerSource: o.maxPerSource as number,
        workers: o.workers as number | undefined,
        threadBufferedBytes: o.threadBuffers as number | undefined,
        verbose: Boolean(o.verbose),
        tls: {
          mode: o.tls as 'off' | 'allow' | 'require',
          cert: o.tlsCert as string | undefined,
          key: o.tlsKey as string | undefined,
          ca: o.tlsCa as string | undefined,
          pskFile: o.tlsPskFile as string | undefined,
        },
        identities: (o.identity as string[] | undefined) ?? [],
      });
    });

  registerAgent(program, pkg.version);
  registerManagement(program);
  registerCluster(program);
  registerNotify(program);
  registerDeploy(program);
  registerDump(program);
  registerMemory(program);
  registerPr(program);
  registerMigrate(program);
  registerGuest(program);
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (
        e.code === 'commander.helpDisplayed' ||
        e.code === 'commander.version' ||
        e.exitCode === 0
      ) {
        process.exit(0);
      }
      if (e.code === 'ballast.usage') process.stderr.write(`ballast: ${e.message}\n`);
      process.exit(2);
    }
    if (isBallastError(e)) {
      process.stderr.write(`ballast: error ${e.code}: ${e.message}\n`);
      process.exit(
        e.code === 'BALLAST_USAGE'
          ? 2
          : ((e as { exitCode?: number }).exitCode ?? EXIT[e.code] ?? 1),
      );
    }
    process.stderr.write(`ballast: internal error: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exit(1);
  }
}
