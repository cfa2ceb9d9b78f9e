// Secure defaults keep the first run easy for root: the README's first command,
// `ballast agent --data-dir /var/lib/ballast`, on the real default paths
// (/run/ballast/*.sock, /var/lib/ballast, 127.0.0.1:10810), and root's CLI with
// no --agent, no token and no other flag: create a device, attach it, write and
// read it with qemu-io over the default NBD socket, list, change a reservation.
// Over TCP root's CLI needs no token either (it reads DATA_DIR/api-token).
// All of it in a mount and network namespace of its own, with tmpfs on /run
// and /var/lib (and a PID namespace, so nothing outlives it), so the host's paths and ports are never touched.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { expect, it } from 'vitest';
import { BALLAST_BIN, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';

const SCRIPT = `
set -euo pipefail
mount -t tmpfs -o mode=0755 ballast-run /run
mount -t tmpfs -o mode=0755 ballast-lib /var/lib
ip link set lo up
b() { "$NODE" "$BALLAST" "$@"; }
step() { echo "== $*"; }

"$NODE" "$BALLAST" agent --data-dir /var/lib/ballast > "$OUT/agent.log" 2>&1 &
agent=$!
for _ in $(seq 1 200); do
  b status > /dev/null 2>&1 && break
  kill -0 "$agent" || { echo "the agent exited"; exit 1; }
  sleep 0.1
done

step create
b device create swap-vm1 --size 16M --role paging --guest vm1
step attach
uri=$(b attach swap-vm1 --format uri)
echo "$uri"
step io
qemu-io -f raw "$uri" -c 'write -P 0x5a 0 64k' -c 'read -P 0x5a 0 64k'
step ls
b device ls
step pr
b pr swap-vm1 register --as host-a --sa-key 0xa
b pr swap-vm1 reserve --as host-a --key 0xa --type WE
b pr swap-vm1 show
step tcp
b device ls --agent http://127.0.0.1:10810
step modes
stat -c '%n %a %U %G' /run/ballast/api.sock /run/ballast/nbd.sock /var/lib/ballast/api-token
step stop
kill -TERM "$agent"
wait "$agent"
echo "agent exit $?"
`;

describeWithTools(['unshare', 'ip', 'qemu-io'], "root's first run on the default paths", () => {
  it.runIf(process.getuid?.() === 0)(
    'the README flow works for root with no flags',
    async () => {
      const out = makeTempDir('ballast-root-');
      const r = await run(
        'unshare',
        [
          '--mount',
          '--net',
          '--pid',
          '--fork',
          '--kill-child',
          '--mount-proc',
          '--',
          'bash',
          '-c',
          SCRIPT,
        ],
        {
          env: { NODE: process.execPath, BALLAST: BALLAST_BIN, OUT: out },
          timeoutMs: 90_000,
        },
      );
      let log = '';
      try {
        log = readFileSync(path.join(out, 'agent.log'), 'utf8');
      } catch {}
      expect(r.code, `${describeRun(r)}\nagent log:\n${log}`).toBe(0);
      const section = (name: string) => r.stdout.split(`== ${name}\n`)[1]?.split('\n== ')[0] ?? '';
      expect(section('attach').trim()).toBe('nbd+unix:///swap-vm1?socket=/run/ballast/nbd.sock');
      expect(section('io')).toMatch(/wrote 65536\/65536 bytes/);
      expect(section('io')).toMatch(/read 65536\/65536 bytes/);
      expect(section('ls')).toContain('swap-vm1');
      expect(section('pr')).toMatch(/host-a/);
      expect(section('tcp')).toContain('swap-vm1');
      const modes = section('modes');
      expect(modes).toMatch(/\/run\/ballast\/api\.sock 600 root root/);
      expect(modes).toMatch(/\/run\/ballast\/nbd\.sock (660 root kvm|600 root root)/);
      expect(modes).toMatch(/\/var\/lib\/ballast\/api-token 600 root root/);
      expect(r.stdout).toContain('agent exit 0');
    },
    120_000,
  );
});
