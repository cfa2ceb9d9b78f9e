// Packs the running Ballast (or another package directory) into a release
// tarball: package.json, bin/, dist/, the native addon and the production
// dependencies from node_modules (the lockfile says which). The targets run
// the same architecture and Node ABI, which the install step checks.
// The tarball is reproducible, so the release id (version + content hash)
// only changes when the content does.

import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DeployError } from './errors.js';

export interface Release {
  /** `<version>-<first 12 hex of the tarball's sha256>`. */
  id: string;
  version: string;
  tarball: string;
  sha256: string;
  size: number;
  /** Removes the tarball's temporary directory. */
  dispose(): void;
}

/** The package directory this code runs from (holds package.json named ballast). */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const p = join(dir, 'package.json');
    if (existsSync(p)) {
      try {
        if ((JSON.parse(readFileSync(p, 'utf8')) as { name?: string }).name === 'ballast')
          return dir;
      } catch {}
    }
    const up = dirname(dir);
    if (up === dir) throw new DeployError('DEPLOY_PACK_FAILED', 'cannot find the ballast package');
    dir = up;
  }
}

interface Lock {
  packages?: Record<string, { dev?: boolean; link?: boolean }>;
}

/** Paths (relative to root) that make up a release. */
export function releaseEntries(root: string): string[] {
  const need = (rel: string) => {
    if (!existsSync(join(root, rel))) {
      throw new DeployError(
        'DEPLOY_PACK_FAILED',
        `${join(root, rel)} is missing; build first (npm run build)`,
      );
    }
    return rel;
  };
  const entries = [need('package.json'), need('bin'), need('dist')];
  if (existsSync(join(root, 'build/Release/ballast_native.node'))) {
    entries.push('build/Release/ballast_native.node');
  }
  let lock: Lock = {};
  try {
    lock = JSON.parse(readFileSync(join(root, 'package-lock.json'), 'utf8')) as Lock;
  } catch (e) {
    throw new DeployError(
      'DEPLOY_PACK_FAILED',
      `cannot read ${join(root, 'package-lock.json')}: ${(e as Error).message}`,
    );
  }
  for (const [path, meta] of Object.entries(lock.packages ?? {})) {
    // Top-level production packages; nested ones come along inside them.
    if (!path.startsWith('node_modules/') || meta.dev || meta.link) continue;
    if (path.split('node_modules/').length !== 2 || path.startsWith('node_modules/@types/')) {
      continue;
    }
    if (existsSync(join(root, path))) entries.push(path);
  }
  return entries;
}

/** Build leftovers and sources that a running agent never loads. */
const EXCLUDES = [
  'node_modules/*/build/Release/obj.target',
  'node_modules/*/build/Release/obj',
  'node_modules/*/build/Release/.deps',
  'node_modules/*/build/Release/*.a',
  'node_modules/better-sqlite3/deps',
  'node_modules/better-sqlite3/src',
];

function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(file)
      .on('data', (b) => h.update(b))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}

export async function packRelease(root: string = packageRoot()): Promise<Release> {
  const entries = releaseEntries(root);
  let version = '0.0.0';
  try {
    version = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string })
      .version;
  } catch {}
  const dir = mkdtempSync(join(tmpdir(), 'ballast-release-'));
  const tarball = join(dir, 'release.tar.gz');
  const args = [
    '--sort=name',
    '--owner=0',
    '--group=0',
    '--numeric-owner',
    '--mtime=@0',
    ...EXCLUDES.map((x) => `--exclude=${x}`),
    '-I',
    'gzip -1 -n',
    '-cf',
    tarball,
    '-C',
    root,
    ...entries,
  ];
  try {
    await new Promise<void>((resolve, reject) => {
      execFile('tar', args, { maxBuffer: 1 << 20 }, (err, _out, stderr) =>
        err ? reject(new Error(stderr.trim() || err.message)) : resolve(),
      );
    });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw new DeployError('DEPLOY_PACK_FAILED', `packing ${root}: ${(e as Error).message}`);
  }
  const sha256 = await sha256File(tarball);
  return {
    id: `${version}-${sha256.slice(0, 12)}`,
    version,
    tarball,
    sha256,
    size: statSync(tarball).size,
    dispose: () => rmSync(dir, { recursive: true, force: true }),
  };
}
