// Syscalls Node lacks, for the sparse-file backend: fallocate (punch/zero),
// lseek with SEEK_DATA/SEEK_HOLE, flock, and preadv2/pwritev2 with RWF_NOWAIT
// so page-cached I/O can complete on the event loop without a thread-pool
// round trip; SO_PEERCRED, to name Unix socket clients; and for dumpd, mkfifo
// and F_SETPIPE_SZ. Hot-path calls return a negative errno instead of throwing.
// Writes to a cluster's shared files ask the fence (cluster/fence.ts) in the
// thread that makes the syscall, immediately before it (see "Fences" below).
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <time.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define CHECK(call)                                                   \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      napi_throw_error(env, "BALLAST_NATIVE_ARG", "bad argument");   \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

static napi_value make_int64(napi_env env, int64_t v) {
  napi_value out;
  napi_create_int64(env, v, &out);
  return out;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, "BALLAST_NATIVE_ARG", "missing arguments");
    return -1;
  }
  return 0;
}

/*
 * Fences. A cluster agent's right to write its shared files ends at a deadline
 * on CLOCK_MONOTONIC (the clock of performance.now() and process.hrtime), and
 * ends early when the agent fences itself. cluster/fence.ts publishes it here,
 * in memory of the addon that every thread of the process sees (the library is
 * loaded once per process, whatever thread loads it). Each write names the
 * fence it is under as a token, slot << 32 | epoch, taken when the request was
 * admitted: it is refused with FENCE_ERRNO when, immediately before the
 * syscall and in the thread that makes it, the clock is at or past the
 * deadline, or the fence has been closed and opened again since (epoch
 * changed: a write admitted before a lapse never goes out after a renewal).
 * What remains is a thread stopped between this check and the syscall's entry,
 * and a write already in the kernel (docs/cluster.md: cluster.watchdog).
 */
#define FENCE_SLOTS 256
#define FENCE_BUCKETS 40
// "Owner died": no file system returns it from a write or a fallocate.
#define FENCE_ERRNO EOWNERDEAD

typedef struct {
  _Atomic int64_t deadline;
  _Atomic uint32_t epoch;
  _Atomic bool timing;
  _Atomic uint64_t refused;
  // With timing on, in log2(ns) buckets: from the check to the syscall's return
  // (window), and to the last instruction before the syscall (entry).
  _Atomic uint64_t window[FENCE_BUCKETS];
  _Atomic uint64_t window_ns;
  _Atomic uint64_t window_max;
  _Atomic uint64_t entry[FENCE_BUCKETS];
  _Atomic uint64_t entry_ns;
  _Atomic uint64_t entry_max;
} fence_slot;

static fence_slot fences[FENCE_SLOTS];
static _Atomic int fence_count;
// Failpoint slow-writes (tests only): fenced thread-pool writes sleep this long before
// their check, so that writes are certainly queued when a test freezes the agent.
static int slow_writes_ms;

static int64_t monotonic_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// 0 when a write under `token` may go now (always for token < 0: not fenced), with
// the time of the check in *checked; -FENCE_ERRNO (counted) when it may not. A token
// naming no slot is refused.
static inline int fence_check(int64_t token, int64_t *checked) {
  if (token < 0) return 0;
  uint64_t slot = (uint64_t)token >> 32;
  if (slot >= (uint64_t)atomic_load(&fence_count)) return -FENCE_ERRNO;
  fence_slot *f = &fences[slot];
  // The deadline before the epoch: fenceSet changes the epoch only with a zero deadline,
  // so a token of an old epoch cannot pass on the deadline of a later opening.
  int64_t deadline = atomic_load(&f->deadline);
  uint32_t epoch = atomic_load(&f->epoch);
  int64_t now = monotonic_ns();
  if (epoch != (uint32_t)token || now >= deadline) {
    atomic_fetch_add_explicit(&f->refused, 1, memory_order_relaxed);
    return -FENCE_ERRNO;
  }
  *checked = now;
  return 0;
}

static void fence_record(_Atomic uint64_t *hist, _Atomic uint64_t *sum, _Atomic uint64_t *max,
                         uint64_t d) {
  int b = 0;
  while (b < FENCE_BUCKETS - 1 && (d >> (b + 1)) != 0) b++;
  atomic_fetch_add_explicit(&hist[b], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(sum, d, memory_order_relaxed);
  uint64_t m = atomic_load_explicit(max, memory_order_relaxed);
  while (d > m && !atomic_compare_exchange_weak(max, &m, d)) {
  }
}

static inline bool fence_timing(int64_t token) {
  return token >= 0 &&
         atomic_load_explicit(&fences[(uint64_t)token >> 32].timing, memory_order_relaxed);
}

// Just before the syscall of a checked write, if the slot measures: how long since the check.
static inline void fence_entry(int64_t token, int64_t checked) {
  if (!fence_timing(token)) return;
  fence_slot *f = &fences[(uint64_t)token >> 32];
  fence_record(f->entry, &f->entry_ns, &f->entry_max, (uint64_t)(monotonic_ns() - checked));
}

// After the syscall of a checked write, if the slot measures: the window it had.
static inline void fence_after(int64_t token, int64_t checked) {
  if (!fence_timing(token)) return;
  fence_slot *f = &fences[(uint64_t)token >> 32];
  fence_record(f->window, &f->window_ns, &f->window_max, (uint64_t)(monotonic_ns() - checked));
}

/*
 * Buffered writes go to the kernel in pieces of at most WRITE_CHUNK. The page cache
 * sizes the folios it allocates for a write by the write's length, and allocating
 * large folios into memory that is fragmented, or that a hypervisor took back (free
 * page reporting), costs far more than the copy: measured on a 2-CPU KVM guest,
 * writing 512 MiB into a new file ran at 330-400 MB/s with 256 KiB-16 MiB writes and
 * at 1.9-2.5 GB/s with 16-64 KiB writes. A 1 MiB request costs 16 syscalls instead
 * of one, a few microseconds.
 */
#define WRITE_CHUNK (64 * 1024)

#define DIRECT_CHUNK (4 * 1024 * 1024)
static __thread char *direct_buffer;

// pwritev2 of [data, data+len) at pos in pieces of WRITE_CHUNK, or with direct (fd
// is O_DIRECT, pos and len block-aligned) DIRECT_CHUNK at a time through the calling
// thread's page-aligned buffer (a JavaScript buffer has no alignment to offer): bytes
// written (short if a piece was short, or after the first if a later one failed: with
// RWF_NOWAIT, EAGAIN after some progress; fenced), or -errno. Each piece asks the
// fence of `fence` (a token, or -1) just before its syscall.
static ssize_t write_pieces(int fd, const char *data, size_t len, int64_t pos, int flags,
                            bool direct, int64_t fence) {
  if (direct && !direct_buffer && posix_memalign((void **)&direct_buffer, 4096, DIRECT_CHUNK) != 0) {
    direct_buffer = NULL;
    return -ENOMEM;
  }
  size_t piece = direct ? DIRECT_CHUNK : WRITE_CHUNK;
  size_t done = 0;
  while (done < len) {
    size_t n = len - done < piece ? len - done : piece;
    const char *src = data + done;
    if (direct) src = memcpy(direct_buffer, src, n);
    struct iovec iov = {.iov_base = (char *)src, .iov_len = n};
    ssize_t r;
    int64_t checked = 0;
    int err = 0;
    do {
      int refused = fence_check(fence, &checked);
      if (refused) return done > 0 ? (ssize_t)done : refused;
      fence_entry(fence, checked);
      r = pwritev2(fd, &iov, 1, pos + (int64_t)done, flags);
      err = errno;
      fence_after(fence, checked);
    } while (r < 0 && err == EINTR);
    if (r < 0) return done > 0 ? (ssize_t)done : -err;
    done += (size_t)r;
    if ((size_t)r < n) break;
  }
  return (ssize_t)done;
}

// The arguments (fd, buffer, bufOffset, length, position) of a read or write: 0,
// -EINVAL for a range outside the buffer, or -1 with a JavaScript exception pending.
typedef struct {
  int32_t fd;
  char *data;
  size_t length;
  int64_t position;
} io_args;

static int get_io_args(napi_env env, napi_value *argv, io_args *io) {
  void *data;
  size_t buflen;
  int64_t boff, len, pos;
  if (napi_get_value_int32(env, argv[0], &io->fd) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &data, &buflen) != napi_ok ||
      napi_get_value_int64(env, argv[2], &boff) != napi_ok ||
      napi_get_value_int64(env, argv[3], &len) != napi_ok ||
      napi_get_value_int64(env, argv[4], &pos) != napi_ok) {
    napi_throw_error(env, "BALLAST_NATIVE_ARG", "bad argument");
    return -1;
  }
  if (boff < 0 || len < 0 || pos < 0 || (uint64_t)boff > buflen ||
      (uint64_t)len > buflen - (uint64_t)boff)
    return -EINVAL;
  io->data = (char *)data + boff;
  io->length = (size_t)len;
  io->position = pos;
  return 0;
}

// An optional fence token (see "Fences") at argv[i]: -1 when absent.
static int get_fence(napi_env env, size_t argc, napi_value *argv, size_t i, int64_t *fence) {
  *fence = -1;
  if (argc <= i) return 0;
  napi_valuetype t;
  if (napi_typeof(env, argv[i], &t) != napi_ok) return -1;
  if (t == napi_undefined) return 0;
  if (napi_get_value_int64(env, argv[i], fence) != napi_ok) {
    napi_throw_type_error(env, "BALLAST_NATIVE_ARG", "bad fence token");
    return -1;
  }
  return 0;
}

// rw(fd, buffer, bufOffset, length, position[, fence]) -> bytes or -errno
// write: 0 read (NOWAIT), 1 write (NOWAIT), 2 write (may block)
static napi_value do_rw(napi_env env, napi_callback_info info, int write) {
  size_t argc = 6;
  napi_value argv[6];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) {
    napi_throw_type_error(env, "BALLAST_NATIVE_ARG", "missing arguments");
    return NULL;
  }
  io_args io;
  int bad = get_io_args(env, argv, &io);
  if (bad == -1) return NULL;
  if (bad) return make_int64(env, bad);
  if (write) {
    int64_t fence;
    if (get_fence(env, argc, argv, 5, &fence) < 0) return NULL;
    return make_int64(env, write_pieces(io.fd, io.data, io.length, io.position,
                                        write == 2 ? 0 : RWF_NOWAIT, false, fence));
  }
  struct iovec iov = {.iov_base = io.data, .iov_len = io.length};
  ssize_t r;
  do {
    r = preadv2(io.fd, &iov, 1, io.position, RWF_NOWAIT);
  } while (r < 0 && errno == EINTR);
  return make_int64(env, r < 0 ? -errno : r);
}

static napi_value pread_nowait(napi_env env, napi_callback_info info) { return do_rw(env, info, 0); }
static napi_value pwrite_nowait(napi_env env, napi_callback_info info) { return do_rw(env, info, 1); }
// A plain pwrite on the calling thread: for filesystems without buffered
// RWF_NOWAIT writes, where the caller guards the event loop by timing it.
static napi_value pwrite_inline(napi_env env, napi_callback_info info) { return do_rw(env, info, 2); }

// lseek(fd, offset, whence) -> offset or -errno
static napi_value do_lseek(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, 3, argv) < 0) return NULL;
  int32_t fd, whence;
  int64_t off;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int64(env, argv[1], &off));
  CHECK(napi_get_value_int32(env, argv[2], &whence));
  off_t r = lseek(fd, (off_t)off, whence);
  return make_int64(env, r < 0 ? -errno : (int64_t)r);
}

// flock(fd, operation) -> 0 or -errno
static napi_value do_flock(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv) < 0) return NULL;
  int32_t fd, op;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int32(env, argv[1], &op));
  int r;
  do {
    r = flock(fd, op);
  } while (r < 0 && errno == EINTR);
  return make_int64(env, r < 0 ? -errno : 0);
}

// fadvise(fd, offset, length, advice) -> 0 or -errno. Synchronous: WILLNEED
// only queues readahead, it does not wait for the I/O.
static napi_value do_fadvise(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (get_args(env, info, 4, argv) < 0) return NULL;
  int32_t fd, advice;
  int64_t off, len;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int64(env, argv[1], &off));
  CHECK(napi_get_value_int64(env, argv[2], &len));
  CHECK(napi_get_value_int32(env, argv[3], &advice));
  int r = posix_fadvise(fd, (off_t)off, (off_t)len, advice);  // returns the error, no errno
  return make_int64(env, -r);
}

// pwrite(fd, buffer, bufOffset, length, position[, direct[, fence]]) on the thread
// pool, as write_pieces does it: Promise<bytes | -errno>. The buffer is referenced
// until the write is done.
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buffer;
  io_args io;
  bool direct;
  int64_t fence;
  ssize_t result;
} pwrite_job;

static void pwrite_execute(napi_env env, void *data) {
  (void)env;
  pwrite_job *job = data;
  if (slow_writes_ms > 0 && job->fence >= 0) {
    struct timespec ts = {.tv_sec = slow_writes_ms / 1000,
                          .tv_nsec = (long)(slow_writes_ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
  }
  job->result = write_pieces(job->io.fd, job->io.data, job->io.length, job->io.position, 0,
                             job->direct, job->fence);
}

static void pwrite_complete(napi_env env, napi_status status, void *data) {
  pwrite_job *job = data;
  int64_t v = status == napi_ok ? (int64_t)job->result : -ECANCELED;
  napi_resolve_deferred(env, job->deferred, make_int64(env, v));
  napi_delete_reference(env, job->buffer);
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value do_pwrite_async(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) {
    napi_throw_type_error(env, "BALLAST_NATIVE_ARG", "missing arguments");
    return NULL;
  }
  bool direct = false;
  if (argc > 5) CHECK(napi_get_value_bool(env, argv[5], &direct));
  int64_t fence;
  if (get_fence(env, argc, argv, 6, &fence) < 0) return NULL;
  io_args io;
  int bad = get_io_args(env, argv, &io);
  if (bad == -1) return NULL;
  napi_value promise, name;
  napi_deferred deferred;
  CHECK(napi_create_promise(env, &deferred, &promise));
  pwrite_job *job = bad ? NULL : calloc(1, sizeof(*job));
  if (!job) {
    napi_resolve_deferred(env, deferred, make_int64(env, bad ? bad : -ENOMEM));
    return promise;
  }
  job->deferred = deferred;
  job->io = io;
  job->direct = direct;
  job->fence = fence;
  napi_create_reference(env, argv[1], 1, &job->buffer);
  napi_create_string_utf8(env, "ballast.pwrite", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, pwrite_execute, pwrite_complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

// fallocate runs on the thread pool: punching a large, fragmented range can
// take long enough to matter on the event loop.
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  int mode;
  int64_t offset;
  int64_t length;
  int64_t fence;
  int err;
} falloc_job;

static void falloc_execute(napi_env env, void *data) {
  (void)env;
  falloc_job *job = data;
  int r, err;
  do {
    int64_t checked = 0;
    int refused = fence_check(job->fence, &checked);
    if (refused) {
      job->err = -refused;
      return;
    }
    fence_entry(job->fence, checked);
    r = fallocate(job->fd, job->mode, (off_t)job->offset, (off_t)job->length);
    err = errno;
    fence_after(job->fence, checked);
  } while (r < 0 && err == EINTR);
  job->err = r < 0 ? err : 0;
}

static void falloc_complete(napi_env env, napi_status status, void *data) {
  falloc_job *job = data;
  int err = status == napi_ok ? job->err : ECANCELED;
  napi_resolve_deferred(env, job->deferred, make_int64(env, err ? -err : 0));
  napi_delete_async_work(env, job->work);
  free(job);
}

// fallocate(fd, mode, offset, length[, fence]) -> Promise<0 | -errno>
static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) {
    napi_throw_type_error(env, "BALLAST_NATIVE_ARG", "missing arguments");
    return NULL;
  }
  int64_t fence;
  if (get_fence(env, argc, argv, 4, &fence) < 0) return NULL;
  falloc_job *job = calloc(1, sizeof(*job));
  if (!job) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  int32_t fd, mode;
  if (napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &mode) != napi_ok ||
      napi_get_value_int64(env, argv[2], &job->offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &job->length) != napi_ok) {
    free(job);
    napi_throw_type_error(env, "BALLAST_NATIVE_ARG", "bad argument");
    return NULL;
  }
  job->fd = fd;
  job->mode = mode;
  job->fence = fence;
  napi_value promise, name;
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, "ballast.fallocate", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, falloc_execute, falloc_complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

// peerUid(fd) -> the uid of the process at the other end of a Unix socket
// (SO_PEERCRED, as it was at connect time), or -errno.
static napi_value do_peer_uid(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv) < 0) return NULL;
  int32_t fd;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  struct ucred cred;
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return make_int64(env, -errno);
  return make_int64(env, (int64_t)cred.uid);
}

// dup(fd) -> a new descriptor (close-on-exec) for the same open file, or -errno.
// How a socket or a file moves to another thread of the process: the receiver
// owns the copy, so the sender may close its own at any time.
static napi_value do_dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv) < 0) return NULL;
  int32_t fd;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return make_int64(env, r < 0 ? -errno : r);
}

// close(fd) -> 0 or -errno. For descriptors another thread opened (Node's fs
// warns when a worker closes one it did not open itself).
static napi_value do_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv) < 0) return NULL;
  int32_t fd;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  return make_int64(env, close(fd) < 0 ? -errno : 0);
}

// mkfifo(path, mode) -> 0 or -errno
static napi_value do_mkfifo(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv) < 0) return NULL;
  char path[4096];
  size_t len;
  int32_t mode;
  CHECK(napi_get_value_string_utf8(env, argv[0], path, sizeof(path), &len));
  CHECK(napi_get_value_int32(env, argv[1], &mode));
  if (len >= sizeof(path) - 1) return make_int64(env, -ENAMETOOLONG);
  return make_int64(env, mkfifo(path, (mode_t)mode) < 0 ? -errno : 0);
}

// setPipeSize(fd, bytes) -> the pipe's capacity now (F_SETPIPE_SZ), or -errno.
// Without CAP_SYS_RESOURCE the kernel caps it at /proc/sys/fs/pipe-max-size.
static napi_value do_set_pipe_size(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv) < 0) return NULL;
  int32_t fd, size;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int32(env, argv[1], &size));
  int r = fcntl(fd, F_SETPIPE_SZ, size);
  return make_int64(env, r < 0 ? -errno : r);
}

// fenceCreate() -> a new fence slot, closed (deadline 0, epoch 0), or -ENOSPC.
static napi_value do_fence_create(napi_env env, napi_callback_info info) {
  (void)info;
  int slot = atomic_fetch_add(&fence_count, 1);
  if (slot >= FENCE_SLOTS) {
    atomic_fetch_sub(&fence_count, 1);
    return make_int64(env, -ENOSPC);
  }
  return make_int64(env, slot);
}

static fence_slot *get_slot(napi_env env, napi_value v) {
  int32_t slot;
  if (napi_get_value_int32(env, v, &slot) != napi_ok || slot < 0 ||
      slot >= atomic_load(&fence_count)) {
    napi_throw_range_error(env, "BALLAST_NATIVE_ARG", "no such fence slot");
    return NULL;
  }
  return &fences[slot];
}

// fenceSet(slot, epoch, deadlineNs: bigint): from now on, writes under this slot
// pass only with this epoch and before this CLOCK_MONOTONIC deadline. The deadline
// is 0 while the epoch changes, so no write passes on a mix of old and new.
static napi_value do_fence_set(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (get_args(env, info, 3, argv) < 0) return NULL;
  fence_slot *f = get_slot(env, argv[0]);
  if (!f) return NULL;
  uint32_t epoch;
  int64_t deadline;
  bool lossless;
  CHECK(napi_get_value_uint32(env, argv[1], &epoch));
  CHECK(napi_get_value_bigint_int64(env, argv[2], &deadline, &lossless));
  if (atomic_load(&f->epoch) != epoch) {
    atomic_store(&f->deadline, 0);
    atomic_store(&f->epoch, epoch);
  }
  atomic_store(&f->deadline, deadline);
  return NULL;
}

// fenceTiming(slot, on): measure each checked write's window (fenceStats).
static napi_value do_fence_timing(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (get_args(env, info, 2, argv) < 0) return NULL;
  fence_slot *f = get_slot(env, argv[0]);
  if (!f) return NULL;
  bool on;
  CHECK(napi_get_value_bool(env, argv[1], &on));
  atomic_store(&f->timing, on);
  return NULL;
}

// fenceStats(slot) -> { refused, windowNs, windowMaxNs, window: [count per log2(ns) bucket],
// entryNs, entryMaxNs, entry: [...] }
static napi_value do_fence_stats(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv) < 0) return NULL;
  fence_slot *f = get_slot(env, argv[0]);
  if (!f) return NULL;
  napi_value out, arr, entry;
  CHECK(napi_create_object(env, &out));
  CHECK(napi_create_array_with_length(env, FENCE_BUCKETS, &arr));
  CHECK(napi_create_array_with_length(env, FENCE_BUCKETS, &entry));
  for (uint32_t b = 0; b < FENCE_BUCKETS; b++) {
    napi_set_element(env, arr, b, make_int64(env, (int64_t)atomic_load(&f->window[b])));
    napi_set_element(env, entry, b, make_int64(env, (int64_t)atomic_load(&f->entry[b])));
  }
  napi_set_named_property(env, out, "entryNs", make_int64(env, (int64_t)atomic_load(&f->entry_ns)));
  napi_set_named_property(env, out, "entryMaxNs",
                          make_int64(env, (int64_t)atomic_load(&f->entry_max)));
  napi_set_named_property(env, out, "entry", entry);
  napi_set_named_property(env, out, "refused", make_int64(env, (int64_t)atomic_load(&f->refused)));
  napi_set_named_property(env, out, "windowNs", make_int64(env, (int64_t)atomic_load(&f->window_ns)));
  napi_set_named_property(env, out, "windowMaxNs",
                          make_int64(env, (int64_t)atomic_load(&f->window_max)));
  napi_set_named_property(env, out, "window", arr);
  return out;
}

// monotonicNs() -> CLOCK_MONOTONIC now, as a bigint (the fence's clock).
static napi_value do_monotonic_ns(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value out;
  napi_create_bigint_int64(env, monotonic_ns(), &out);
  return out;
}

static void set_int(napi_env env, napi_value obj, const char *name, int64_t v) {
  napi_set_named_property(env, obj, name, make_int64(env, v));
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_default, NULL},
      {"pwriteNowait", NULL, pwrite_nowait, NULL, NULL, NULL, napi_default, NULL},
      {"pwriteInline", NULL, pwrite_inline, NULL, NULL, NULL, napi_default, NULL},
      {"lseek", NULL, do_lseek, NULL, NULL, NULL, napi_default, NULL},
      {"flock", NULL, do_flock, NULL, NULL, NULL, napi_default, NULL},
      {"fallocate", NULL, do_fallocate, NULL, NULL, NULL, napi_default, NULL},
      {"fadvise", NULL, do_fadvise, NULL, NULL, NULL, napi_default, NULL},
      {"peerUid", NULL, do_peer_uid, NULL, NULL, NULL, napi_default, NULL},
      {"pwriteAsync", NULL, do_pwrite_async, NULL, NULL, NULL, napi_default, NULL},
      {"dup", NULL, do_dup, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, do_close, NULL, NULL, NULL, napi_default, NULL},
      {"mkfifo", NULL, do_mkfifo, NULL, NULL, NULL, napi_default, NULL},
      {"setPipeSize", NULL, do_set_pipe_size, NULL, NULL, NULL, napi_default, NULL},
      {"fenceCreate", NULL, do_fence_create, NULL, NULL, NULL, napi_default, NULL},
      {"fenceSet", NULL, do_fence_set, NULL, NULL, NULL, napi_default, NULL},
      {"fenceTiming", NULL, do_fence_timing, NULL, NULL, NULL, napi_default, NULL},
      {"fenceStats", NULL, do_fence_stats, NULL, NULL, NULL, napi_default, NULL},
      {"monotonicNs", NULL, do_monotonic_ns, NULL, NULL, NULL, napi_default, NULL},
  };
  const char *fp = getenv("BALLAST_FAILPOINTS");
  if (fp && strstr(fp, "slow-writes")) slow_writes_ms = 1000;
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  napi_value c;
  napi_create_object(env, &c);
  set_int(env, c, "SEEK_DATA", SEEK_DATA);
  set_int(env, c, "SEEK_HOLE", SEEK_HOLE);
  set_int(env, c, "LOCK_SH", LOCK_SH);
  set_int(env, c, "LOCK_EX", LOCK_EX);
  set_int(env, c, "LOCK_NB", LOCK_NB);
  set_int(env, c, "LOCK_UN", LOCK_UN);
  set_int(env, c, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  set_int(env, c, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  set_int(env, c, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE);
  set_int(env, c, "POSIX_FADV_WILLNEED", POSIX_FADV_WILLNEED);
  set_int(env, c, "EAGAIN", EAGAIN);
  set_int(env, c, "EOPNOTSUPP", EOPNOTSUPP);
  set_int(env, c, "ENXIO", ENXIO);
  set_int(env, c, "EWOULDBLOCK", EWOULDBLOCK);
  set_int(env, c, "FENCED", FENCE_ERRNO);
  napi_set_named_property(env, exports, "constants", c);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
