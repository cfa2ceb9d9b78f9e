// `ballast notify add --secret-file` with a file that cannot be read: the message says
// why in words and how to make one, not a raw errno.

import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BALLAST_BIN, makeTempDir } from '../test/helpers/server.js';
import { run } from '../test/helpers/tools.js';

describe('notify add --secret-file', () => {
  it('names a missing secret file and how to create it', async () => {
    const file = path.join(makeTempDir('ballast-secret-'), 'etc', 'hook.secret');
    const r = await run(process.execPath, [
      BALLAST_BIN,
      'notify',
      'add',
      'ops',
      '--url',
      'http://127.0.0.1:9/hook',
      '--secret-file',
      file,
      '--agent',
      'unix:/nonexistent/api.sock',
    ]);
    expect(r.code).toBe(8);
    expect(r.stderr).toContain(
      `NOTIFY_BAD_SECRET: cannot read the secret file ${file}: it does not exist`,
    );
    expect(r.stderr).not.toContain('ENOENT');
    expect(r.stderr).toContain('(umask 077; head -c 32 /dev/urandom | base64 >');
  });
});
