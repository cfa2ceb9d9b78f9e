import { describe, expect, it } from 'vitest';
import { exposureText, guestViews, nbdExport, overlapping, parseFilename } from './area.js';

const MiB = 1024 * 1024;
const SOCK = '/run/ballast-a/nbd.sock';

/** A query-block entry as QEMU 7.2 answers it (the fields used), for a disk with id `id`. */
function block(id: string, node: string, filename: string, size: number) {
  return {
    device: '',
    qdev: `/machine/peripheral/${id}/virtio-backend`,
    inserted: {
      'node-name': node,
      drv: 'raw',
      file: filename,
      image: { filename, 'virtual-size': size, format: 'raw' },
    },
  };
}

/** The json: filename QEMU gives a node with options over an NBD node of `export`. */
function json(opts: Record<string, unknown>, exp = 'swap-vm1'): string {
  return `json:${JSON.stringify({
    ...opts,
    file: { 'server.path': SOCK, driver: 'nbd', export: exp, 'server.type': 'unix' },
  })}`;
}

describe("what a guest's disks see of a device (query-block)", () => {
  it('a raw node with size= over the NBD node: the part before it', () => {
    const b = [block('swap0-dev', 'swap0r', json({ driver: 'raw', size: 351 * MiB }), 351 * MiB)];
    expect(guestViews(b, 'swap-vm1')).toEqual([
      { qdev: 'swap0-dev', node: 'swap0r', start: 0, end: 351 * MiB },
    ]);
    expect(overlapping(guestViews(b, 'swap-vm1'), 351 * MiB)).toEqual([]);
    expect(overlapping(guestViews(b, 'swap-vm1'), 350 * MiB)).toHaveLength(1);
  });

  it('the whole device (the NBD node itself, or a raw node without size): all of it', () => {
    const uri = `nbd+unix:///swap-vm1?socket=${SOCK}`;
    const b = [block('d1', 'swap0', uri, 512 * MiB), block('d2', 'a1', uri, 512 * MiB)];
    const v = guestViews(b, 'swap-vm1');
    expect(v.map((x) => x.end)).toEqual([512 * MiB, 512 * MiB]);
    expect(overlapping(v, 351 * MiB)).toHaveLength(2);
    expect(exposureText('swap-vm1', 351 * MiB, overlapping(v, 351 * MiB))).toBe(
      "the guest's disk d1 (node swap0) sees swap-vm1 up to byte 536870912 (512 MiB), past the start of the suspend area at 368050176 (351 MiB): the stream would overwrite what the guest wrote there",
    );
  });

  it('over TCP, through libvirt (offset=0 given), through a filter, with an offset', () => {
    const tcp = block('d1', 'a0', 'nbd://127.0.0.1:10809/swap-vm1', 512 * MiB);
    const lv = block(
      'virtio-disk1',
      'libvirt-1-format',
      json({ offset: 0, driver: 'raw', size: 351 * MiB }),
      351 * MiB,
    );
    const thr = block('d4', 'c1', json({ 'throttle-group': 'tg', driver: 'throttle' }), 512 * MiB);
    const off = block('d2', 'b1', json({ offset: MiB, driver: 'raw', size: 4 * MiB }), 4 * MiB);
    expect(guestViews([tcp, lv, thr, off], 'swap-vm1').map((v) => [v.start, v.end])).toEqual([
      [0, 512 * MiB],
      [0, 351 * MiB],
      [0, 512 * MiB],
      [MiB, 5 * MiB],
    ]);
  });

  it('raw nodes nested, and options QEMU flattens ("file.driver")', () => {
    const f = `json:${JSON.stringify({
      driver: 'raw',
      offset: 2 * MiB,
      size: MiB,
      'file.driver': 'raw',
      'file.offset': MiB,
      'file.file.driver': 'nbd',
      'file.file.export': 'swap-vm1',
    })}`;
    expect(guestViews([block('d', 'n', f, MiB)], 'swap-vm1')[0]).toMatchObject({
      start: 3 * MiB,
      end: 4 * MiB,
    });
  });

  it('an image format on the device: the mapping is unknown, so it may reach the area', () => {
    const f = json({ driver: 'qcow2' });
    const v = guestViews([block('d', 'q', f, 64 * MiB)], 'swap-vm1');
    expect(v).toEqual([{ qdev: 'd', node: 'q', start: 0, end: null, format: 'qcow2' }]);
    expect(overlapping(v, 351 * MiB)).toHaveLength(1);
    expect(exposureText('swap-vm1', 351 * MiB, v)).toMatch(/is a qcow2 image on swap-vm1/);
  });

  it('other exports, disks of no device, and answers that are not lists: nothing', () => {
    const other = block('d', 'n', 'nbd+unix:///swap-vm10?socket=/s', 512 * MiB);
    const otherJson = block('d', 'n', json({ driver: 'raw' }, 'dump-vm1'), 512 * MiB);
    const loose = { ...block('d', 'n', 'nbd+unix:///swap-vm1?socket=/s', 512 * MiB), qdev: '' };
    expect(guestViews([other, otherJson, loose, {}, null], 'swap-vm1')).toEqual([]);
    expect(guestViews({ nope: 1 }, 'swap-vm1')).toEqual([]);
  });

  it('reads the export from every NBD filename form', () => {
    expect(nbdExport('nbd+unix:///swap-vm1?socket=/run/x.sock')).toBe('swap-vm1');
    expect(nbdExport('nbd://10.0.0.2:10809/swap-vm1')).toBe('swap-vm1');
    expect(nbdExport('nbds://[::1]:10809/swap-vm1?tls-certificates=/etc/pki/qemu')).toBe(
      'swap-vm1',
    );
    expect(nbdExport('nbd:unix:/run/x.sock:exportname=swap-vm1')).toBe('swap-vm1');
    expect(nbdExport('/var/lib/disk.img')).toBeNull();
    expect(parseFilename('json:{broken')).toBe('json:{broken');
  });
});
