// Where a device's extents live: sparse files in the pools' directories (every
// agent that serves data), or nowhere (a hollow agent, `ballast agent --hollow`:
// the cluster's work — membership, watches, acks, fencing, the device and
// reservation managers — without a data path, so that a benchmark can run a
// thousand of them on one machine). The device manager reaches storage only
// through these calls.

import { closeSync, fsyncSync, openSync, readdirSync, rmSync, statSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import type { Backend, BackendCaps, Extent, IoRequest } from '../nbd/backend.js';
import { SparseFileBackend, type SparseFileOptions } from './sparse-file.js';

const { EIO } = osConstants.errno;

/** An extent's open file, as the device manager keeps it. */
export interface ExtentFile extends Backend {
  /** The size the device sees (growTo and resize change it). */
  readonly size: number;
  /** Grows the device's view to `size`; the file only when it is smaller. */
  growTo(size: number): Promise<void>;
  /** Grows or shrinks the file to `size` (a shrink discards what lies past it). */
  resize(size: number): Promise<void>;
}

export interface ExtentFiles {
  /** False for a hollow agent: no file behind any extent, nothing to stream. */
  readonly dataPath: boolean;
  /** Opens an extent's file; with `opts.size`, makes it if it is missing. */
  open(path: string, opts: SparseFileOptions): Promise<ExtentFile>;
  /** Makes the entries of a directory durable (after a file was made or removed). */
  syncDir(dir: string): void;
  /** Removes a file; a missing one is no error. */
  remove(path: string): void;
  /** The names in a pool's directory (files no device refers to are reported). */
  list(dir: string): string[];
  /** The bytes the file holds on disk (0 when it is missing). */
  allocated(path: string): number;
}

/** Sparse files on disk: what every agent with a data path uses. */
export const DISK_FILES: ExtentFiles = {
  dataPath: true,
  open: (path, opts) => SparseFileBackend.open(path, opts),
  syncDir(dir) {
    const fd = openSync(dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  },
  remove(path) {
    rmSync(path, { force: true });
  },
  list: (dir) => readdirSync(dir),
  allocated(path) {
    try {
      return statSync(path).blocks * 512;
    } catch {
      return 0;
    }
  },
};

const NO_CAPS: BackendCaps = {
  write: true,
  flush: false,
  fua: false,
  trim: false,
  zero: false,
  fastZero: false,
  cache: false,
  extents: false,
  multiConn: false,
  rotational: false,
};

/**
 * An extent with no file: it has a size and nothing else. A hollow agent serves no
 * NBD, so no request reaches it; one that did would get EIO.
 */
class HollowFile implements ExtentFile {
  readonly caps = NO_CAPS;

  constructor(public size: number) {}

  read(req: IoRequest): void {
    req.done(EIO);
  }
  write(req: IoRequest): void {
    req.done(EIO);
  }
  flush(req: IoRequest): void {
    req.done(EIO);
  }
  trim(req: IoRequest): void {
    req.done(EIO);
  }
  zero(req: IoRequest): void {
    req.done(EIO);
  }
  cache(req: IoRequest): void {
    req.done(EIO);
  }
  extents(_offset: number, _length: number, _max: number, _out: Extent[]): number {
    return EIO;
  }
  async growTo(size: number): Promise<void> {
    this.size = Math.max(this.size, size);
  }
  async resize(size: number): Promise<void> {
    this.size = size;
  }
  async close(): Promise<void> {}
}

/**
 * No files at all (a hollow agent): nothing is made, opened, synced or removed. An
 * extent opened to be made has the size asked for; one opened as existing is taken
 * to be as large as its record says (the opener checks the file against the record).
 */
export const HOLLOW_FILES: ExtentFiles = {
  dataPath: false,
  open: async (_path, opts) => new HollowFile(opts.size ?? Number.MAX_SAFE_INTEGER),
  syncDir() {},
  remove() {},
  list: () => [],
  allocated: () => 0,
};
