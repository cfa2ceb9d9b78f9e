// A paging device as swap leaves it: a sparse file written in random 4 KiB pages,
// thousands of data runs with holes between them. Real peers judge the replies
// (libnbd through nbdsh, nbdinfo --map, nbdcopy, qemu-img compare): every hole reads
// as zeroes and block status agrees with the file's own SEEK_DATA/SEEK_HOLE map, also
// after writes, trims and write-zeroes made through other connections on other worker
// threads. And small READs do not ask the allocation map at all: on such a file that
// walked sixteen runs (about thirty lseeks) per 4 KiB read.

import { closeSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { loadNative } from '../../agent/native.js';
import { SparseFileBackend } from '../../agent/sparse-file.js';
import type { Extent } from '../../nbd/backend.js';
import { StaticCatalog } from '../../nbd/export.js';
import { NbdServer, READ_MAP_MIN } from '../../nbd/server.js';
import { ExportStats } from '../../nbd/stats.js';
import { dedent, nbdsh } from '../helpers/nbdsh.js';
import { MiB, makeTempDir, type ServerHandle, startServer } from '../helpers/server.js';
import { describeRun, describeWithTools, run, runOk } from '../helpers/tools.js';

const PAGE = 4096;
const SIZE = 64 * MiB;

/**
 * A file of `size` bytes with `fraction` of its 4 KiB pages written, in an order
 * from a fixed seed (the layout is the same every run). Each page's bytes name it.
 */
function pagedFile(file: string, size: number, fraction: number): void {
  writeFileSync(file, '');
  truncateSync(file, size);
  const pages = size / PAGE;
  let seed = 0x9e3779b9;
  const rand = (): number => {
    // xorshift32
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 2 ** 32;
  };
  const fd = openSync(file, 'r+');
  try {
    const page = Buffer.alloc(PAGE);
    for (let p = 0; p < pages; p++) {
      if (rand() >= fraction) continue;
      page.fill((p % 251) + 1);
      page.writeUInt32LE(p, 0);
      writeSync(fd, page, 0, PAGE, p * PAGE);
    }
  } finally {
    closeSync(fd);
  }
}

type Run = { offset: number; length: number; hole: boolean };

/** The file's map by SEEK_DATA/SEEK_HOLE, adjacent runs of one kind merged. */
function fileMap(file: string): Run[] {
  const n = loadNative();
  const c = n.constants;
  const fd = openSync(file, 'r');
  const runs: Run[] = [];
  const push = (offset: number, end: number, hole: boolean): void => {
    const last = runs[runs.length - 1];
    if (last && last.hole === hole) last.length = end - last.offset;
    else runs.push({ offset, length: end - offset, hole });
  };
  try {
    const size = SIZE;
    let pos = 0;
    while (pos < size) {
      const d = n.lseek(fd, pos, c.SEEK_DATA);
      if (d === -c.ENXIO) {
        push(pos, size, true);
        break;
      }
      if (d < 0) throw new Error(`SEEK_DATA: ${d}`);
      if (d > pos) push(pos, d, true);
      const h = n.lseek(fd, d, c.SEEK_HOLE);
      if (h < 0) throw new Error(`SEEK_HOLE: ${h}`);
      push(d, h, false);
      pos = h;
    }
  } finally {
    closeSync(fd);
  }
  return runs;
}

/** The map nbdinfo reports, merged the same way (type 3: hole,zero; 0: data). */
function mergeNbdinfo(entries: { offset: number; length: number; type: number }[]): Run[] {
  const runs: Run[] = [];
  for (const e of entries) {
    expect([0, 3]).toContain(e.type);
    const hole = e.type === 3;
    const last = runs[runs.length - 1];
    if (last && last.hole === hole) last.length += e.length;
    else runs.push({ offset: e.offset, length: e.length, hole });
  }
  return runs;
}

// Python: the file's map, the server's map (block status), and the check that every
// connection's map and every read agree with the file.
const CHECKS = `
import random
FILE = os.environ['FILE']
fd = os.open(FILE, os.O_RDONLY)
PAGE = 4096

def merged(runs):
    out = []
    for off, ln, hole in runs:
        if out and out[-1][2] == hole:
            out[-1] = (out[-1][0], out[-1][1] + ln, hole)
        else:
            out.append((off, ln, hole))
    return out

def file_map(size):
    runs, pos = [], 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            assert e.errno == errno.ENXIO, e
            runs.append((pos, size - pos, True))
            break
        if d > pos:
            runs.append((pos, d - pos, True))
        hh = os.lseek(fd, d, os.SEEK_HOLE)
        runs.append((d, hh - d, False))
        pos = hh
    return merged(runs)

def nbd_map(h):
    size = h.get_size()
    runs, pos = [], 0
    while pos < size:
        got = []
        def cb(meta, off, ents, err):
            got.extend(ents)
            return 0
        h.block_status(min(size - pos, 32 * MiB), pos, cb)
        assert got, pos
        for i in range(0, len(got), 2):
            ln, flags = got[i], got[i + 1]
            hole = bool(flags & nbd.STATE_HOLE)
            assert flags in (0, nbd.STATE_HOLE | nbd.STATE_ZERO), (pos, flags)
            runs.append((pos, ln, hole))
            pos += ln
    return merged(runs)

def same_map(h, what):
    want = file_map(h.get_size())
    got = nbd_map(h)
    if got != want:
        diff = [(a, b) for a, b in zip(got, want) if a != b][:3]
        raise AssertionError('%s: block status differs from SEEK_DATA (%d vs %d runs), first %r'
                             % (what, len(got), len(want), diff))
    return len([r for r in want if not r[2]])

SIZES = (512, 4096, 4096, 4096, 8192, 12288, 32768, 65536 - 4096, 65536, 65536 + 4096, 131072, MiB)

def read_ok(h, n, off, what):
    got = bytes(h.pread(n, off))
    want = os.pread(fd, n, off)
    if got != want:
        bad = next(i for i in range(n) if got[i] != want[i])
        raise AssertionError('%s: read %d at %d differs from the file at +%d (got %d, file %d)'
                             % (what, n, off, bad, got[bad], want[bad]))

def random_reads(h, rng, count, what):
    size = h.get_size()
    for _ in range(count):
        n = rng.choice(SIZES)
        off = rng.randrange(0, (size - n) // 512 + 1) * 512
        read_ok(h, n, off, what)

def holes_are_zero(h, rng, count, what):
    holes = [r for r in file_map(h.get_size()) if r[2]]
    for _ in range(count):
        off, ln, _hole = rng.choice(holes)
        n = min(ln, rng.choice((4096, 8192, 65536, MiB)))
        eq(bytes(h.pread(n, off)), bytes(n), '%s: hole at %d' % (what, off))
`;

describeWithTools(
  ['nbdsh', 'nbdinfo', 'nbdcopy', 'qemu-img'],
  'a paged (fragmented) sparse file',
  () => {
    let dir: string;
    let file: string;
    let server: ServerHandle;

    beforeAll(async () => {
      dir = makeTempDir('ballast-paged-');
      file = path.join(dir, 'swap.img');
      pagedFile(file, SIZE, 0.4);
      // Two worker threads: connections alternate between them.
      server = await startServer({ file, name: 'swap', extraArgs: ['--workers', '2'] });
    });

    afterAll(async () => {
      const code = await server?.stop();
      expect(code).toBe(0);
    });

    const py = async (code: string) => {
      const r = await nbdsh(
        `${CHECKS}\n${dedent(code)}`,
        { URI: server.uri(), FILE: file },
        120_000,
      );
      expect(r.code, describeRun(r)).toBe(0);
      return r.stdout;
    };

    it('is fragmented: thousands of data runs', () => {
      const data = fileMap(file).filter((r) => !r.hole);
      expect(data.length).toBeGreaterThan(2000);
    });

    it('reads of every size agree with the file, holes read as zeroes, block status with SEEK_DATA', async () => {
      const out = await py(`
        rng = random.Random(7)
        h = connect()
        runs = same_map(h, 'fresh')
        random_reads(h, rng, 3000, 'fresh')
        holes_are_zero(h, rng, 500, 'fresh')
        print('data runs', runs)
      `);
      expect(out).toMatch(/data runs \d+/);
    });

    it('after writes, trims and write-zeroes through other connections, every connection reads the file and maps it truthfully', async () => {
      await py(`
        rng = random.Random(11)
        # Four connections over two worker threads (each goes to the one serving
        # fewer): a and c read, b and d change the file.
        a, b, c, d = connect(), connect(), connect(), connect()
        size = a.get_size()
        pages = size // PAGE
        for step in range(600):
            reader = a if step % 2 else c
            writer = b if step % 3 else d
            p = rng.randrange(pages - 256)
            off = p * PAGE
            # The reader has just read around the page (a 1 MiB read remembers
            # the data run it found; a 4 KiB one asks nothing).
            read_ok(reader, MiB, max(0, off - 512 * 1024), 'before %d' % step)
            read_ok(reader, PAGE, off, 'before %d' % step)
            op = rng.randrange(5)
            n = PAGE * rng.choice((1, 1, 2, 16, 64))
            if op == 0:
                writer.pwrite(bytes([rng.randrange(1, 256)]) * n, off)
            elif op == 1:
                writer.trim(n, off)
            elif op == 2:
                writer.zero(n, off)
            elif op == 3:
                writer.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
            else:
                writer.pwrite(bytes(range(256)) * (n // 256), off + 512)
            for h in (a, c):
                read_ok(h, PAGE, off, 'after op %d step %d' % (op, step))
                read_ok(h, n + PAGE, max(0, off - PAGE), 'after op %d step %d' % (op, step))
                read_ok(h, MiB, max(0, off - 512 * 1024), 'after op %d step %d' % (op, step))
        for name, h in (('a', a), ('b', b), ('c', c), ('d', d)):
            same_map(h, 'after changes, connection ' + name)
            random_reads(h, rng, 500, 'after changes, connection ' + name)
            holes_are_zero(h, rng, 200, 'after changes, connection ' + name)
      `);
    });

    it('nbdinfo --map is the file map; nbdcopy and qemu-img compare find the file', async () => {
      const r = await runOk('nbdinfo', ['--map', '--json', server.uri()]);
      expect(mergeNbdinfo(JSON.parse(r.stdout))).toEqual(fileMap(file));

      const copy = path.join(dir, 'copy.img');
      await runOk('nbdcopy', [server.uri(), copy]);
      expect(readFileSync(copy).equals(readFileSync(file))).toBe(true);
      // Small requests too: every READ shorter than READ_MAP_MIN is answered as data.
      const copy4k = path.join(dir, 'copy4k.img');
      await runOk('nbdcopy', ['--request-size', '4096', server.uri(), copy4k]);
      expect(readFileSync(copy4k).equals(readFileSync(file))).toBe(true);

      const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, server.uri()]);
      expect(same.code, describeRun(same)).toBe(0);
      // compare really compares: one changed byte in the copy makes it exit 1.
      const fd = openSync(copy, 'r+');
      writeSync(fd, Buffer.from([0x5a]), 0, 1, 10 * MiB + 17);
      closeSync(fd);
      const differ = await run('qemu-img', [
        'compare',
        '-f',
        'raw',
        '-F',
        'raw',
        copy,
        server.uri(),
      ]);
      expect(differ.code, describeRun(differ)).toBe(1);
    });
  },
);

describeWithTools(['nbdsh'], 'READs on a paged file and the allocation map', () => {
  let server: NbdServer;
  let backend: SparseFileBackend;
  let sock: string;
  let file: string;
  /** What each READ asked the allocation map: runs reported per call. */
  const asked: { length: number; runs: number }[] = [];

  beforeAll(async () => {
    const dir = makeTempDir('ballast-pagedmap-');
    file = path.join(dir, 'swap.img');
    pagedFile(file, SIZE, 0.4);
    backend = await SparseFileBackend.open(file);
    const extents = backend.extents.bind(backend);
    backend.extents = (offset: number, length: number, max: number, out: Extent[]): number => {
      const before = out.length;
      const r = extents(offset, length, max, out);
      asked.push({ length, runs: out.length - before });
      return r;
    };
    server = new NbdServer({
      catalog: new StaticCatalog([
        { name: 'swap', description: '', backend, readOnly: false, stats: new ExportStats() },
      ]),
    });
    sock = path.join(dir, 's');
    await server.listen({ path: sock });
  });

  afterAll(async () => {
    await server?.close(5000);
    await backend?.close();
  });

  it('4 KiB reads read (a hole as its zeroes); large ones ask only about the runs they cover', async () => {
    const r = await nbdsh(
      `
      fd = os.open(os.environ['FILE'], os.O_RDONLY)
      h = connect()
      import random
      rng = random.Random(3)
      size = h.get_size()
      for _ in range(2000):
          off = rng.randrange(size // 4096) * 4096
          eq(bytes(h.pread(4096, off)), os.pread(fd, 4096, off), 'read at %d' % off)
      print('small done')
      for _ in range(50):
          off = rng.randrange((size - MiB) // 4096) * 4096
          eq(bytes(h.pread(MiB, off)), os.pread(fd, MiB, off), 'read at %d' % off)
      `,
      { URI: `nbd+unix:///swap?socket=${sock}`, FILE: file },
      120_000,
    );
    expect(r.code, describeRun(r)).toBe(0);
    // The 2000 small reads asked nothing: only the 50 large ones did, each about
    // the run it starts in, then (data and holes) the runs inside it, at most 16.
    const reads = asked.filter((a) => a.length !== SIZE);
    expect(reads.length).toBeGreaterThan(0);
    expect(reads.length).toBeLessThanOrEqual(100);
    for (const a of reads) expect(a.runs).toBeLessThanOrEqual(16);
    expect(READ_MAP_MIN).toBeGreaterThan(4096);
  });
});
