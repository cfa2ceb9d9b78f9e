import { describe, expect, it } from 'vitest';
import { retarget } from './libvirt.js';

describe('the destination XML of a libvirt move', () => {
  it("points Ballast's NBD disks at the destination agent and leaves the others alone", () => {
    const xml = `<domain>
  <devices>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='vm1-swap'>
        <host transport='unix' socket='/run/ballast-a/nbd.sock'/>
      </source>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='other'>
        <host name='10.0.0.9' port='10809'/>
      </source>
    </disk>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/root.img'/></disk>
  </devices>
</domain>`;
    const out = retarget(
      xml,
      new Map([['vm1-swap', "<host transport='unix' socket='/run/ballast-b/nbd.sock'/>"]]),
    );
    expect(out).toContain("<host transport='unix' socket='/run/ballast-b/nbd.sock'/>");
    expect(out).not.toContain('/run/ballast-a/nbd.sock');
    expect(out).toContain("<host name='10.0.0.9' port='10809'/>");
    expect(out).toContain("<source file='/var/lib/libvirt/images/root.img'/>");
  });
});
