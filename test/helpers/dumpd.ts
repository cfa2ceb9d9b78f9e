// dumpd in the test process against a ballast serve holding the dump devices:
// the fixture of the dumpd interop tests (QEMUs without a guest OS).

import path from 'node:path';
import { type After, parseConfig } from '../../dumpd/config.js';
import { Dumpd } from '../../dumpd/daemon.js';
import { type ExportSpec, type ServerHandle, startServer } from './server.js';
import { scaled } from './wait.js';

/** Polls `f` every 20 ms until it holds. */
export async function until(f: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + scaled(timeoutMs);
  while (!f()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * A ballast serve with `exports`, and a Dumpd on 127.0.0.1 watching `dir` for
 * GUEST.qmp sockets whose dump device is the export GUEST-dump; dumpd's log
 * lines go to `log`.
 */
export async function startWatchingDumpd(o: {
  dir: string;
  exports: ExportSpec[];
  after: After;
  log: string[];
}): Promise<{ server: ServerHandle; d: Dumpd; addr: string }> {
  const server = await startServer({ exports: o.exports });
  let d: Dumpd | undefined;
  try {
    const cfg = parseConfig(`
listen: 127.0.0.1:0
runDir: ${path.join(o.dir, 'run')}
defaults: { format: elf, after: ${o.after}, keep: 2 }
watch:
  - { dir: ${o.dir}, suffix: .qmp, device: "nbd+unix:///{guest}-dump?socket=${server.socket}" }
`);
    d = new Dumpd(cfg, {
      resolveDevice: async (ref) => {
        if (!('uri' in ref)) throw new Error('no agent here');
        return ref.uri;
      },
      log: (s) => o.log.push(s),
    });
    return { server, d, addr: await d.start() };
  } catch (e) {
    await d?.stop();
    await server.stop();
    throw e;
  }
}
