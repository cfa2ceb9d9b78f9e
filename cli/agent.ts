// `ballast agent`: run the per-host daemon until SIGTERM.

import type { Command } from 'commander';
import { DEFAULT_DATA_DIR } from '../agent/config.js';
import { Agent } from '../agentd/agent.js';

function log(msg: string): void {
  process.stderr.write(`ballast: ${msg}\n`);
}

export function registerAgent(program: Command, version: string): void {
  program
    .command('agent')
    .summary('run the agent: pools, devices over NBD, the management API and /metrics')
    .description(
      'Run the per-host agent. It keeps its state in an SQLite database in the data directory, ' +
        'serves every device over NBD (default /run/ballast/nbd.sock, root and group kvm; no TCP ' +
        'listener unless configured) and answers the management API and /metrics (default ' +
        '/run/ballast/api.sock, root only, and 127.0.0.1:10810 with the bearer token). Without --config it runs one pool in DATA_DIR/pools/default. ' +
        'SIGTERM or SIGINT stops taking connections, finishes the requests in flight, flushes ' +
        'and exits 0; SIGHUP reloads the config (pools, quotas, overcommit, token).',
    )
    .option('-c, --config <FILE>', 'YAML config (nbd, api, pools, limits, dataDir)')
    .option('-D, --data-dir <DIR>', `state, token and default pool (default ${DEFAULT_DATA_DIR})`)
    .option(
      '--api-listen <HOST:PORT|none>',
      "the API's TCP listener instead of the config's api.listen (default 127.0.0.1:10810); none: the Unix socket only",
    )
    .option('-v, --verbose', 'log every NBD connection and refused request')
    .option(
      '--hollow',
      'a cluster member with no data path, for scale tests: it joins, watches, acks and fences, ' +
        'and keeps devices and reservations, but makes and opens no files and serves no NBD',
    )
    .addHelpText(
      'after',
      `
Config example:
  nbd:  { listen: 127.0.0.1:10809, socket: /run/ballast/nbd.sock }
  api:  { listen: 127.0.0.1:10810, socket: /run/ballast/api.sock }
  pools:
    - { name: fast, path: /srv/ballast/fast }            # media type detected
    - { name: bulk, path: /srv/ballast/bulk, media: hdd, quota: 2T, overcommit: 4.0 }

Every TCP API listener demands the bearer token in DATA_DIR/api-token (made on first
start, mode 0600); api.requireToken: false lifts that on loopback only. On a TCP NBD
listener, clients must be named by TLS or nbd.identities (nbd.anonymous: any lifts it).
Limits: nbd.handshakeLimit (10 s, 0: none), nbd.maxHandshakes (64), nbd.maxConnections
(1024), nbd.maxPerSource (none); api.maxConnections (128), api.headersTimeout (10 s),
api.requestTimeout (30 s). Cores: nbd.workers (threads serving NBD connections; default
auto, the cores available; 1: one event loop).

NBD clients can be made to use TLS, and are then named by their certificate CN or PSK
username (for access lists and persistent reservations: ballast acl, ballast pr):
  nbd:
    tls: { mode: require, cert: /etc/ballast/tls/server-cert.pem,   # paths are absolute
           key: /etc/ballast/tls/server-key.pem, ca: /etc/ballast/tls/ca-cert.pem }
    # or tls: { mode: allow, pskFile: /etc/ballast/keys.psk }     (username:hexkey lines)
    identities: ['192.0.2.7=host-c', 'uid:0=root']   # names for clients TLS does not name

--hollow stands in for a host when measuring a large cluster (npm run bench -- --suite
scale hosts hundreds in one process): the config needs a cluster: section; its pools are
names and paths only (nothing is made there; declare a shared pool at the path the real
agents use, and the hollow member counts as serving its devices: changes wait for its
ack); the nbd: listeners are ignored; the API answers as configured. It is listed as a
member like any other ('ballast cluster members' shows NBD "none (hollow)"). Not for a
production cluster: it serves nothing, yet changes to its pools' devices wait for it.`,
    )
    .action(
      async (o: {
        config?: string;
        dataDir?: string;
        apiListen?: string;
        verbose?: boolean;
        hollow?: boolean;
      }) => {
        const agent = await Agent.start({
          configFile: o.config,
          dataDir: o.dataDir,
          apiListen: o.apiListen,
          version,
          verbose: Boolean(o.verbose),
          log,
          hollow: Boolean(o.hollow),
        });
        log('ready');
        let stopping = false;
        const stop = (signal: string): void => {
          if (stopping) {
            log(`${signal} again: exiting now`);
            process.exit(1);
          }
          stopping = true;
          log(`${signal}: finishing requests in flight`);
          agent.stop().then(
            () => {
              log('stopped');
              process.exit(0);
            },
            (e: Error & { code?: string }) => {
              log(`error ${e.code ?? 'BALLAST_INTERNAL'}: ${e.message}`);
              process.exit(1);
            },
          );
        };
        process.on('SIGTERM', () => stop('SIGTERM'));
        process.on('SIGINT', () => stop('SIGINT'));
        process.on('SIGHUP', () => {
          log('SIGHUP: reloading the config');
          void agent.reload();
        });
        await new Promise<never>(() => {});
      },
    );
}
