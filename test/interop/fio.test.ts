// fio's NBD engine (libnbd) judges the server under load with data verification.

import { afterAll, beforeAll, expect, it } from 'vitest';
import { makeTempDir, type ServerHandle, startServer } from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

describeWithTools(['fio'], 'fio --ioengine=nbd against the server', () => {
  let server: ServerHandle;

  beforeAll(async () => {
    server = await startServer({ size: '64M', name: 'disk' });
  });

  afterAll(async () => {
    if (server) expect(await server.stop()).toBe(0);
  });

  const fio = async (...args: string[]): Promise<FioJob[]> => {
    const r = await run(
      'fio',
      [
        '--ioengine=nbd',
        `--uri=${server.uri()}`,
        '--output-format=json',
        '--runtime=5',
        '--verify_state_save=0',
        ...args,
      ],
      // fio may drop files in its working directory: not in the repo.
      { timeoutMs: 50_000, cwd: makeTempDir() },
    );
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout + r.stderr, describeRun(r)).not.toMatch(/verify:|bad magic|crc32c: wanted/);
    // The engine prints "fio: connected to NBD server" before the JSON.
    const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: FioJob[] };
    for (const j of json.jobs) expect(j.error, `${j.jobname}\n${describeRun(r)}`).toBe(0);
    return json.jobs;
  };

  it('randrw 4k at iodepth 32 with crc32c verification', async () => {
    const [job] = await fio(
      '--name=randrw',
      '--rw=randrw',
      '--bs=4k',
      '--iodepth=32',
      '--size=64M',
      '--verify=crc32c',
    );
    expect(job!.write.io_bytes).toBeGreaterThan(0);
    expect(job!.read.io_bytes).toBeGreaterThan(0);
  });

  it('sequential 1 MiB writes then verify', async () => {
    const [job] = await fio(
      '--name=seq1m',
      '--rw=write',
      '--bs=1M',
      '--iodepth=8',
      '--size=64M',
      '--verify=crc32c',
    );
    expect(job!.write.io_bytes).toBe(64 * 1024 * 1024);
    expect(job!.read.io_bytes).toBe(64 * 1024 * 1024); // the verify pass
  });

  it('4 jobs (4 connections) writing and verifying their own slices', async () => {
    const jobs = await fio(
      '--name=slices',
      '--numjobs=4',
      '--rw=randwrite',
      '--bs=16k',
      '--iodepth=8',
      '--size=16M',
      '--offset_increment=16M',
      '--verify=crc32c',
    );
    expect(jobs).toHaveLength(4);
    for (const j of jobs) expect(j.read.io_bytes).toBeGreaterThan(0);
  });
});
