// libnbd (through nbdsh's Python) judges the edge cases: bad requests sent on purpose
// with strict mode relaxed, oversize requests, read-only writes, flags, block status,
// opt mode, and many commands in flight.

import { truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { nbdsh } from '../helpers/nbdsh.js';
import { MiB, makeTempDir, type ServerHandle, startServer } from '../helpers/server.js';
import { describeRun, describeWithTools } from '../helpers/tools.js';

const DESC = 'nbdsh test disk';

describeWithTools(['nbdsh'], 'libnbd (nbdsh) against the server', () => {
  let server: ServerHandle;
  let ro: ServerHandle;

  beforeAll(async () => {
    const roFile = path.join(makeTempDir(), 'ro.img');
    writeFileSync(roFile, 'read-only data\n');
    truncateSync(roFile, 16 * MiB);
    [server, ro] = await Promise.all([
      startServer({ size: 64 * MiB, name: 'disk', description: DESC }),
      startServer({ file: roFile, name: 'ro', readOnly: true }),
    ]);
  });

  afterAll(async () => {
    const codes = await Promise.all([server?.stop(), ro?.stop()]);
    expect(codes.filter((c) => c !== undefined && c !== 0)).toEqual([]);
  });

  /** Runs the script; it must exit 0 (a failed Python assert exits non-zero). */
  const py = async (code: string) => {
    const r = await nbdsh(code, {
      URI: server.uri(),
      URI_EMPTY: server.uri(''),
      URI_NOPE: server.uri('no-such-export'),
      RO_URI: ro.uri(),
      DESC,
    });
    expect(r.code, describeRun(r)).toBe(0);
    return r.stdout;
  };

  it('reads past the end fail with EINVAL, writes/trims/zeroes with ENOSPC', async () => {
    await py(`
      h = connect(strict=0)
      size = h.get_size()
      eq(size, 64 * MiB, 'size')
      for off in (size, size - 2048, size + 4096, 2**64 - 1024):
          fails(lambda: h.pread(4096, off), errno.EINVAL)
          fails(lambda: h.cache(4096, off), errno.EINVAL)
          fails(lambda: h.block_status(4096, off, lambda *a: 0), errno.EINVAL)
          fails(lambda: h.pwrite(b'x' * 4096, off), errno.ENOSPC)
          fails(lambda: h.trim(4096, off), errno.ENOSPC)
          fails(lambda: h.zero(4096, off), errno.ENOSPC)
      # Right up to the end is fine, and the connection survived all of that.
      h.pwrite(b'y' * 4096, size - 4096)
      eq(h.pread(4096, size - 4096), b'y' * 4096, 'tail')
      eq(h.pread(1, size - 1), b'y', 'last byte')
    `);
  });

  it('zero-length requests get a reply and the connection goes on', async () => {
    // The spec leaves their outcome open (success or an error); a reply must come.
    const out = await py(`
      h = connect(strict=0)
      for name, fn in [
          ('pread', lambda: h.pread(0, 0)),
          ('pwrite', lambda: h.pwrite(b'', 4096)),
          ('trim', lambda: h.trim(0, 4096)),
          ('zero', lambda: h.zero(0, 4096)),
          ('cache', lambda: h.cache(0, 4096)),
          ('block_status', lambda: h.block_status(0, 4096, lambda *a: 0)),
          ('pread at end', lambda: h.pread(0, h.get_size())),
      ]:
          try:
              fn()
              print(name, 'ok')
          except nbd.Error as e:
              print(name, errno.errorcode.get(e.errnum, e.errnum))
      h.pwrite(b'z' * 512, 0)
      eq(h.pread(512, 0), b'z' * 512, 'after zero-length requests')
    `);
    expect(out.trim().split('\n')).toHaveLength(7);
  });

  it('a 33 MiB READ fails (EINVAL/EOVERFLOW) and the same handle reads on', async () => {
    await py(`
      for structured in (True, False):
          h = connect(strict=0, structured=structured)
          h.pwrite(b'r' * 4096, 8 * MiB)
          fails(lambda: h.pread(33 * MiB, 0), errno.EINVAL, errno.EOVERFLOW)
          eq(h.pread(4096, 8 * MiB), b'r' * 4096, 'read after oversize read')
          eq(len(h.pread(32 * MiB, 0)), 32 * MiB, 'a 32 MiB read is fine')
          h.shutdown()
    `);
  });

  it('a 33 MiB WRITE fails with EINVAL, is not applied, and the handle goes on', async () => {
    await py(`
      h = connect(strict=0)
      h.pwrite(b'\\x5a' * 4096, 0)
      # The payload is made of request magics: a server that reads it as requests breaks.
      magic = bytes.fromhex('25609513') + bytes(24)
      payload = magic * ((33 * MiB) // len(magic)) + b'\\xee' * ((33 * MiB) % len(magic))
      fails(lambda: h.pwrite(payload, 0), errno.EINVAL)
      eq(h.pread(4096, 0), b'\\x5a' * 4096, 'data after the refused write')
      h.pwrite(b'\\x5b' * (32 * MiB), 0)
      eq(h.pread(16, 32 * MiB - 16), b'\\x5b' * 16, 'a 32 MiB write is fine')
      h.flush()
    `);
  });

  it('writes, trims and zeroes on a read-only export fail with EPERM', async () => {
    await py(`
      h = connect(uri=os.environ['RO_URI'], strict=0)
      assert h.is_read_only()
      fails(lambda: h.pwrite(b'w' * 512, 0), errno.EPERM)
      fails(lambda: h.pwrite(b'w' * 512, 0, nbd.CMD_FLAG_FUA), errno.EPERM)
      fails(lambda: h.trim(4096, 0), errno.EPERM)
      fails(lambda: h.zero(4096, 0), errno.EPERM)
      fails(lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EPERM)
      eq(h.pread(15, 0), b'read-only data\\n', 'reads still work')
    `);
  });

  it('unknown command flags are refused with EINVAL and the connection goes on', async () => {
    await py(`
      h = connect(strict=0)
      fails(lambda: h.pread(512, 0, 1 << 10), errno.EINVAL)
      fails(lambda: h.pwrite(b'u' * 512, 0, 1 << 12), errno.EINVAL)
      h.pwrite(b'u' * 512, 12 * MiB)
      eq(h.pread(512, 12 * MiB), b'u' * 512, 'after unknown flags')
    `);
  });

  it('BLOCK_STATUS with REQ_ONE returns exactly one extent', async () => {
    await py(`
      h = connect()
      assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
      base = 40 * MiB
      h.pwrite(b'\\x01' * 65536, base + MiB)
      seen = []
      def cb(meta, off, entries, err):
          seen.append((meta, off, list(entries)))
          return 0
      h.block_status(8 * MiB, base, cb, nbd.CMD_FLAG_REQ_ONE)
      eq(len(seen), 1, 'callbacks')
      meta, off, ent = seen[0]
      eq(meta, 'base:allocation', 'context')
      eq(len(ent), 2, 'one extent (length, flags)')
      assert 0 < ent[0] <= MiB, ent
      eq(ent[1], nbd.STATE_HOLE | nbd.STATE_ZERO, 'hole flags')

      seen.clear()
      h.block_status(8 * MiB, base + MiB, cb, nbd.CMD_FLAG_REQ_ONE)
      ent = seen[0][2]
      eq(len(ent), 2, 'one extent')
      assert 0 < ent[0] <= 65536, ent
      eq(ent[1] & nbd.STATE_HOLE, 0, 'data is not a hole')

      # Without REQ_ONE: the extents add up and show hole, data, hole.
      seen.clear()
      h.block_status(4 * MiB, base, cb)
      ent = [e for s in seen for e in s[2]]
      pairs = list(zip(ent[0::2], ent[1::2]))
      assert len(pairs) >= 3, pairs
      assert sum(p[0] for p in pairs) > MiB + 65536, pairs
      pos = base
      for length, flags in pairs:
          if pos < base + MiB:
              assert flags & nbd.STATE_HOLE, (pos, pairs)
          elif pos < base + MiB + 65536:
              eq(flags & nbd.STATE_HOLE, 0, 'data at %d' % pos)
          pos += length
    `);
  });

  it('zero with FAST_ZERO punches a hole; with NO_HOLE it zeroes or says ENOTSUP', async () => {
    await py(`
      h = connect()
      assert h.can_fast_zero() and h.can_zero()
      base = 20 * MiB
      h.pwrite(b'\\xaa' * (2 * MiB), base)
      h.zero(MiB, base, nbd.CMD_FLAG_FAST_ZERO)
      eq(h.pread(MiB, base), bytes(MiB), 'zeroed')
      ext = []
      h.block_status(MiB, base, lambda m, o, e, err: ext.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE)
      eq(ext[1], nbd.STATE_HOLE | nbd.STATE_ZERO, 'punched')
      try:
          h.zero(MiB, base + MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
          eq(h.pread(MiB, base + MiB), bytes(MiB), 'zeroed without a hole')
      except nbd.Error as e:
          eq(e.errnum, errno.ENOTSUP, 'fast zero refusal')
          eq(h.pread(MiB, base + MiB), b'\\xaa' * MiB, 'unchanged after ENOTSUP')
    `);
  });

  it('trim then pread returns zeroes, and the range is a hole', async () => {
    await py(`
      h = connect()
      assert h.can_trim()
      base = 28 * MiB
      h.pwrite(b'\\x77' * (3 * MiB), base)
      h.trim(MiB, base + MiB)
      h.flush()
      eq(h.pread(MiB, base + MiB), bytes(MiB), 'trimmed reads zero')
      eq(h.pread(MiB, base), b'\\x77' * MiB, 'before is kept')
      eq(h.pread(MiB, base + 2 * MiB), b'\\x77' * MiB, 'after is kept')
      ext = []
      h.block_status(MiB, base + MiB, lambda m, o, e, err: ext.extend(e) or 0)
      assert all(f & nbd.STATE_HOLE for f in ext[1::2]), ext
    `);
  });

  it('canonical export name and description (NBD_INFO_NAME / DESCRIPTION)', async () => {
    await py(`
      h = connect(full_info=True)
      eq(h.get_canonical_export_name(), 'disk', 'canonical name')
      eq(h.get_export_description(), os.environ['DESC'], 'description')
      h2 = connect(uri=os.environ['URI_EMPTY'], full_info=True)
      assert h2.get_canonical_export_name() in ('', 'disk'), h2.get_canonical_export_name()
      eq(h2.get_size(), 64 * MiB, 'size through the empty name')
    `);
  });

  it('opt mode: LIST, INFO, LIST_META_CONTEXT, unknown export, then GO', async () => {
    await py(`
      h = connect(opt=True, full_info=True)
      assert h.aio_is_negotiating()
      names = []
      h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
      assert 'disk' in [n for n, d in names], names

      h.set_export_name('disk')
      h.opt_info()
      eq(h.get_size(), 64 * MiB, 'info size')
      eq(h.get_export_description(), os.environ['DESC'], 'info description')
      eq(h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MiB, 'info max block size')

      contexts = []
      h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
      assert 'base:allocation' in contexts, contexts

      h.set_export_name('no-such-export')
      fails(h.opt_info, errno.ENOENT)
      fails(h.opt_go, errno.ENOENT)
      assert h.aio_is_negotiating(), 'still negotiating after ERR_UNKNOWN'

      h.set_export_name('disk')
      h.opt_go()
      h.pread(512, 0)
    `);
  });

  it('an unknown export name fails with ENOENT (NBD_REP_ERR_UNKNOWN)', async () => {
    await py(`
      e = fails(lambda: connect(uri=os.environ['URI_NOPE']), errno.ENOENT)
    `);
  });

  it('block sizes: minimum 1, preferred 4096, maximum 32 MiB', async () => {
    await py(`
      h = connect()
      eq(h.get_block_size(nbd.SIZE_MINIMUM), 1, 'minimum')
      eq(h.get_block_size(nbd.SIZE_PREFERRED), 4096, 'preferred')
      eq(h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MiB, 'maximum')
    `);
  });

  it('many aio commands in flight complete (in any order) with the right data', async () => {
    const out = await py(`
      h = connect()
      N, SZ, base = 128, 16384, 44 * MiB
      done = []
      def completion(i):
          def f(err):
              assert err.value == 0, (i, err.value)
              done.append(i)
              return 1
          return f
      for i in range(N):
          data = bytearray([(i % 251) + 1]) * SZ
          h.aio_pwrite(nbd.Buffer.from_bytearray(data), base + i * SZ, completion=completion(i))
      peak = h.aio_in_flight()
      while h.aio_in_flight() > 0:
          h.poll(-1)
      eq(sorted(done), list(range(N)), 'writes completed')
      done.clear()
      bufs = []
      for i in range(N):
          b = nbd.Buffer(SZ)
          bufs.append(b)
          h.aio_pread(b, base + i * SZ, completion=completion(i))
          if i % 16 == 15:
              h.aio_flush(completion=lambda err: 1)
      while h.aio_in_flight() > 0:
          h.poll(-1)
      eq(sorted(done), list(range(N)), 'reads completed')
      for i, b in enumerate(bufs):
          eq(bytes(b.to_bytearray()), bytes([(i % 251) + 1]) * SZ, 'read %d' % i)
      print('peak in flight', peak, 'in order', done == sorted(done))
    `);
    expect(out).toMatch(/peak in flight \d+/);
  });

  it('DF reads come back in one chunk; without DF holes come as OFFSET_HOLE', async () => {
    await py(`
      h = connect()
      assert h.get_structured_replies_negotiated()
      assert h.can_df()
      base = 52 * MiB
      h.pwrite(b'\\x42' * MiB, base + MiB)  # [base, base+1M) hole, then 1M data, then hole
      want = bytes(MiB) + b'\\x42' * MiB + bytes(MiB)
      chunks = []
      def chunk(sub, off, status, err):
          chunks.append((off, len(sub), status))
          return 0
      # (libnbd's pread refuses DF; pread_structured sends it.)
      got = h.pread_structured(3 * MiB, base, chunk, nbd.CMD_FLAG_DF)
      eq(bytes(got), want, 'DF read data')
      eq(len(chunks), 1, 'DF: one content chunk')
      eq(chunks[0][:2], (base, 3 * MiB), 'DF chunk covers the request')
      chunks.clear()
      got = h.pread_structured(3 * MiB, base, chunk)
      eq(bytes(got), want, 'read data')
      eq(sum(c[1] for c in chunks), 3 * MiB, 'chunks cover the request')
      assert any(c[2] == nbd.READ_HOLE for c in chunks), chunks
      assert any(c[2] == nbd.READ_DATA for c in chunks), chunks
    `);
  });

  it('data read by one connection and trimmed by another reads back as zeroes; its own trim as a hole', async () => {
    await py(`
      a = connect()
      b = connect()
      base = 40 * MiB
      a.pwrite(b'\x5a' * (4 * MiB), base)
      eq(bytes(a.pread(MiB, base)), b'\x5a' * MiB, 'first read')
      # b punches a hole in the middle of the run a just read as data.
      b.trim(MiB, base + 2 * MiB)
      eq(bytes(a.pread(MiB, base + 2 * MiB)), bytes(MiB), 'a reads the trim of b as zeroes')
      eq(bytes(a.pread(MiB, base + MiB)), b'\x5a' * MiB, 'the data beside it')
      # a's own trim: the next read of it comes as a hole chunk again.
      a.trim(MiB, base + 3 * MiB)
      chunks = []
      def chunk(sub, off, status, err):
          chunks.append((off, len(sub), status))
          return 0
      got = a.pread_structured(MiB, base + 3 * MiB, chunk)
      eq(bytes(got), bytes(MiB), 'own trim reads as zeroes')
      eq([c[2] for c in chunks], [nbd.READ_HOLE], 'own trim comes back as a hole')
      # And the other way: a hole a has read, written by b, reads as b's data.
      eq(bytes(a.pread(MiB, base + 8 * MiB)), bytes(MiB), 'a hole')
      b.pwrite(b'\x77' * MiB, base + 8 * MiB)
      eq(bytes(a.pread(MiB, base + 8 * MiB)), b'\x77' * MiB, 'a reads what b wrote into the hole')
    `);
  });
});
