import { describe, expect, it } from 'vitest';
import { libvirtXml, qemuArgs } from '../agent/attach.js';
import { movableLibvirt, movableQemuArgs } from './takeover.js';

describe('attach output for a guest that moves', () => {
  it('QEMU: the NBD client reconnects, a refused write pauses the guest', () => {
    const args = movableQemuArgs(qemuArgs('vm1-swap', { socket: '/run/b/nbd.sock' }));
    expect(args[1]).toMatch(/^driver=nbd,.*export=vm1-swap,reconnect-delay=60$/);
    expect(args[3]).toMatch(/^virtio-blk-pci,.*,werror=stop,rerror=stop$/);
    expect(movableQemuArgs(args)).toEqual(args); // once only
  });

  it('libvirt: one target per device and the stop error policy', () => {
    const x = movableLibvirt(libvirtXml('vm1-dump', { socket: '/run/b/nbd.sock' }), 2);
    expect(x).toContain("<target dev='vdd' bus='virtio'/>");
    expect(x).toContain("error_policy='stop' rerror_policy='stop'/>");
    expect(movableLibvirt(x, 2)).toBe(x);
  });
});
