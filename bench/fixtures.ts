// What the TLS and agent server kinds need before the first round: throw-away
// X.509 credentials made with openssl, and agent data directories holding one
// device that serves the benchmark image itself (a hard link to it), with or
// without a Write Exclusive reservation held by the identity fio connects as.

import { linkSync, mkdirSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type ApiReply, apiRequest } from './api.js';
import { Child, run } from './proc.js';

/** The identity fio's connections get on the agent (mapped from its Unix peer uid or TCP source). */
export const BENCH_IDENTITY = 'bench';
/** The agent device that serves the benchmark image. */
export const AGENT_DEVICE = 'bench';
/** The reservation key the bench identity registers. */
const PR_KEY = '0xbe9c';

export interface TlsFiles {
  /** Holds ca-cert.pem, server-cert.pem, server-key.pem (nbdkit --tls-certificates=DIR). */
  dir: string;
  cert: string;
  key: string;
}

async function openssl(args: string[]): Promise<void> {
  const r = await run('openssl', args, 60_000);
  if (r.code !== 0) throw new Error(`openssl ${args[0]} failed (exit ${r.code}): ${r.output}`);
}

/**
 * A CA and a server certificate it signed (CN=localhost, SAN localhost and
 * 127.0.0.1), P-256 keys. No client credentials: fio's libnbd connects with
 * tls-verify-peer=false and no certificate, so the server cannot ask for one.
 */
export async function makeCertificates(dir: string): Promise<TlsFiles> {
  mkdirSync(dir, { recursive: true });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  await openssl([
    'req',
    '-x509',
    ...ec,
    '-keyout',
    join(dir, 'ca-key.pem'),
    '-out',
    join(dir, 'ca-cert.pem'),
    '-days',
    '2',
    '-subj',
    '/CN=ballast-bench-ca',
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
  const csr = join(dir, 'server.csr');
  const ext = join(dir, 'server.ext');
  await openssl([
    'req',
    '-new',
    ...ec,
    '-keyout',
    join(dir, 'server-key.pem'),
    '-out',
    csr,
    '-subj',
    '/CN=localhost',
  ]);
  writeFileSync(
    ext,
    [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth',
      'subjectAltName=DNS:localhost,IP:127.0.0.1',
      '',
    ].join('\n'),
  );
  await openssl([
    'x509',
    '-req',
    '-in',
    csr,
    '-CA',
    join(dir, 'ca-cert.pem'),
    '-CAkey',
    join(dir, 'ca-key.pem'),
    '-CAcreateserial',
    '-days',
    '2',
    '-extfile',
    ext,
    '-out',
    join(dir, 'server-cert.pem'),
  ]);
  return { dir, cert: join(dir, 'server-cert.pem'), key: join(dir, 'server-key.pem') };
}

/** An agent data directory with the benchmark device in it, ready to be served. */
export interface AgentFixture {
  /** Parent of data/, pool/, the configs and the API socket. */
  dir: string;
  reserved: boolean;
  /** The device's backing file: a hard link to the benchmark image. */
  file: string;
}

export interface AgentNbd {
  /** nbd.socket, or null for TCP only. */
  socket: string | null;
  /** nbd.listen (HOST:PORT), or null for the Unix socket only. */
  listen: string | null;
  tls?: TlsFiles;
  /** Name clients from 127.0.0.1 as the bench identity too (default true). */
  mapTcp?: boolean;
}

/** Writes an agent config for one session; returns its path. */
export function writeAgentConfig(fx: AgentFixture, name: string, nbd: AgentNbd): string {
  const uid = process.getuid?.() ?? 0;
  const cfg = {
    dataDir: join(fx.dir, 'data'),
    nbd: {
      listen: nbd.listen ?? false,
      socket: nbd.socket ?? false,
      // fio presents no certificate, so under TLS too it is named by these.
      identities: [
        `uid:${uid}=${BENCH_IDENTITY}`,
        ...(nbd.mapTcp === false ? [] : [`127.0.0.1=${BENCH_IDENTITY}`]),
      ],
      ...(nbd.tls ? { tls: { mode: 'require', cert: nbd.tls.cert, key: nbd.tls.key } } : {}),
    },
    api: { listen: false, socket: join(fx.dir, `${name}-api.sock`) },
    pools: [{ name: 'bench', path: join(fx.dir, 'pool') }],
  };
  // JSON is YAML.
  const file = join(fx.dir, `${name}.yaml`);
  writeFileSync(file, `${JSON.stringify(cfg, null, 2)}\n`);
  return file;
}

function api(socketPath: string, method: string, path: string, body?: unknown): Promise<ApiReply> {
  return apiRequest(socketPath, method, path, body, 30_000);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** One 4 KiB write with fio's nbd engine; true when it succeeded. */
async function fioWrites(uri: string): Promise<{ ok: boolean; output: string }> {
  const r = await run(
    'fio',
    [
      '--name=probe',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=write',
      '--bs=4k',
      '--size=4k',
      '--output-format=terse',
    ],
    60_000,
  );
  return { ok: r.code === 0, output: r.output };
}

/**
 * Makes an agent data directory whose one device serves `image`: starts the
 * agent once, creates the device (same size as the image), registers the bench
 * identity and takes a Write Exclusive reservation for it when `reserve`, stops
 * the agent, and replaces the device's sparse file with a hard link to the
 * image, so that every server kind reads and writes the same file.
 */
export async function makeAgentFixture(opts: {
  dir: string;
  ballast: { command: string; args: string[] };
  image: string;
  sizeMiB: number;
  reserve: boolean;
}): Promise<AgentFixture> {
  const { dir } = opts;
  mkdirSync(join(dir, 'pool'), { recursive: true });
  const fx: AgentFixture = { dir, reserved: opts.reserve, file: '' };
  // TCP clients stay anonymous here: a write from them shows the reservation is enforced.
  const nbdSock = join(dir, 'setup-nbd.sock');
  const cfg = writeAgentConfig(fx, 'setup', {
    socket: nbdSock,
    listen: opts.reserve ? '127.0.0.1:0' : null,
    mapTcp: false,
  });
  const sock = join(dir, 'setup-api.sock');
  const agent = new Child(opts.ballast.command, [...opts.ballast.args, 'agent', '--config', cfg]);
  const fail = (what: string): never => {
    throw new Error(`agent fixture in ${dir}: ${what}\n${agent.output()}`);
  };
  try {
    const deadline = performance.now() + 30_000;
    for (;;) {
      if (!agent.running) fail(`the agent exited at start (${JSON.stringify(agent.exitStatus)})`);
      const ok = await api(sock, 'GET', '/healthz').then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) break;
      if (performance.now() > deadline) fail('the agent did not come up within 30 s');
      await sleep(100);
    }
    const created = await api(sock, 'POST', '/v1/devices', {
      name: AGENT_DEVICE,
      size: `${opts.sizeMiB}M`,
      pool: 'bench',
      role: 'data',
    });
    if (created.status !== 201) fail(`creating the device: ${created.status} ${created.text}`);
    const shown = await api(sock, 'GET', `/v1/devices/${AGENT_DEVICE}`);
    const extents = (shown.body as { extents?: { file?: unknown }[] }).extents ?? [];
    const file = extents[0]?.file;
    if (extents.length !== 1 || typeof file !== 'string') {
      fail(`expected one extent, got ${shown.text}`);
    }
    fx.file = file as string;
    if (opts.reserve) {
      const pr = (body: Record<string, unknown>) =>
        api(sock, 'POST', `/v1/devices/${AGENT_DEVICE}/pr`, { as: BENCH_IDENTITY, ...body });
      const reg = await pr({ action: 'register', key: '0', saKey: PR_KEY });
      if (reg.status !== 200) fail(`register: ${reg.status} ${reg.text}`);
      const res = await pr({ action: 'reserve', key: PR_KEY, type: 'WE' });
      if (res.status !== 200) fail(`reserve: ${res.status} ${res.text}`);
      const st = await api(sock, 'GET', `/v1/devices/${AGENT_DEVICE}/pr`);
      const held = st.body.reservation as { type?: unknown; holder?: unknown } | null | undefined;
      if (held?.holder !== BENCH_IDENTITY || held.type !== 1) {
        fail(`the Write Exclusive reservation is not in place: ${st.text}`);
      }
      const own = await fioWrites(
        `nbd+unix:///${AGENT_DEVICE}?socket=${encodeURIComponent(nbdSock)}`,
      );
      if (!own.ok) fail(`a write as ${BENCH_IDENTITY} (the holder) failed:\n${own.output}`);
      const status = await api(sock, 'GET', '/v1/status');
      const nbd = (status.body as { nbd?: unknown }).nbd;
      const tcp = Array.isArray(nbd) ? nbd.find((a) => String(a).startsWith('127.0.0.1:')) : null;
      if (typeof tcp !== 'string') fail(`no TCP address in /v1/status: ${status.text}`);
      const other = await fioWrites(`nbd://${tcp as string}/${AGENT_DEVICE}`);
      if (other.ok) fail('a write from another identity (anonymous) was not refused');
      if (!/EPERM|not permitted/i.test(other.output)) {
        fail(`a write from another identity failed, but not with EPERM:\n${other.output}`);
      }
    }
    const st = await agent.stop(20_000);
    if (st.killed || st.code !== 0) fail(`the agent did not exit cleanly: ${JSON.stringify(st)}`);
  } finally {
    if (agent.running) await agent.stop(5_000);
  }
  unlinkSync(fx.file);
  linkSync(opts.image, fx.file);
  return fx;
}
