// qemu-img judges the server: info, convert in and out, compare, map.

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type QemuMapEntry, qemuMapAt, writeSparseImage } from '../helpers/images.js';
import { MiB, makeTempDir, type ServerHandle, startServer } from '../helpers/server.js';
import { describeRun, describeWithTools, run, runOk } from '../helpers/tools.js';

const SIZE = 64 * MiB;
const REGIONS = [
  { offset: 0, length: 1 * MiB },
  { offset: 8 * MiB, length: 1 * MiB },
  { offset: 32 * MiB + 4096, length: 3 * MiB },
  { offset: SIZE - 64 * 1024, length: 64 * 1024 },
];

describeWithTools(['qemu-img', 'qemu-io'], 'qemu-img against the server', () => {
  let server: ServerHandle;
  let dir: string;

  beforeAll(async () => {
    server = await startServer({ size: '64M', name: 'disk', tcp: true });
    dir = makeTempDir();
  });

  afterAll(async () => {
    if (server) expect(await server.stop()).toBe(0);
  });

  const transports = [
    ['nbd+unix', () => server.uri()],
    ['nbd:// tcp', () => server.tcpUri()],
  ] as const;

  for (const [transport, uriOf] of transports) {
    it(`info reports the virtual size (${transport})`, async () => {
      const r = await runOk('qemu-img', ['info', '--output=json', uriOf()]);
      const info = JSON.parse(r.stdout) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(SIZE);
    });

    it(`convert in, compare, convert out (${transport})`, async () => {
      const local = path.join(dir, `in-${transport.length}.img`);
      const back = path.join(dir, `out-${transport.length}.img`);
      const content = await writeSparseImage(local, SIZE, REGIONS);

      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', local, uriOf()]);
      const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', local, uriOf()]);
      expect(same.code, describeRun(same)).toBe(0);

      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uriOf(), back]);
      const got = await readFile(back);
      expect(got.length).toBe(SIZE);
      expect(got.equals(content)).toBe(true);

      // compare really compares: one changed byte makes it exit 1.
      await runOk('qemu-io', ['-f', 'raw', uriOf(), '-c', `write -P 0x5a ${9 * MiB + 7} 1`]);
      const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', local, uriOf()]);
      expect(differ.code, describeRun(differ)).toBe(1);
    });

    it(`map shows data and holes after writes and discards (${transport})`, async () => {
      const local = path.join(dir, `map-${transport.length}.img`);
      await writeSparseImage(local, SIZE, REGIONS);
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', local, uriOf()]);

      const map = async () => {
        const r = await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uriOf()]);
        return JSON.parse(r.stdout) as QemuMapEntry[];
      };
      let m = await map();
      expect(m.reduce((n, e) => n + e.length, 0)).toBe(SIZE);
      for (const r of REGIONS) {
        expect(qemuMapAt(m, r.offset).data, `data at ${r.offset}`).toBe(true);
        expect(qemuMapAt(m, r.offset + r.length - 1).data).toBe(true);
      }
      for (const hole of [2 * MiB, 16 * MiB, 48 * MiB]) {
        expect(qemuMapAt(m, hole), `hole at ${hole}`).toMatchObject({ data: false, zero: true });
      }

      await runOk('qemu-io', [
        '-f',
        'raw',
        uriOf(),
        '-c',
        `discard ${8 * MiB} ${1 * MiB}`,
        '-c',
        `write -P 0x11 ${40 * MiB} ${1 * MiB}`,
        '-c',
        `write -z -u ${32 * MiB} ${2 * MiB}`,
      ]);
      m = await map();
      expect(qemuMapAt(m, 8 * MiB)).toMatchObject({ data: false, zero: true });
      expect(qemuMapAt(m, 9 * MiB - 1)).toMatchObject({ data: false, zero: true });
      expect(qemuMapAt(m, 40 * MiB).data).toBe(true);
      expect(qemuMapAt(m, 41 * MiB - 1).data).toBe(true);
      expect(qemuMapAt(m, 41 * MiB)).toMatchObject({ data: false, zero: true });
      // 32M+4K .. 34M was zeroed with unmap allowed: reads as zero (hole or zeroed data).
      expect(qemuMapAt(m, 33 * MiB).zero).toBe(true);
      expect(qemuMapAt(m, 34 * MiB + 4096).data).toBe(true);
      expect(qemuMapAt(m, 0).data).toBe(true);
    });
  }
});
