/*
 * memwork: a guest's working set for the memory-sharing tests and benchmark.
 *
 *   memwork MIB
 *
 * Allocates MIB MiB of anonymous memory and writes every page with a pattern that
 * depends on the page's number and its generation, then waits. Signals switch it:
 *   SIGUSR1  hot: checked page ops on random pages, as fast as it can: an op reads one
 *            word per 64-byte line of the page and checks it against the page's
 *            generation, then writes the page with the next generation
 *   SIGUSR2  cold: stop touching the pages
 *   SIGHUP   verify every page once (a full pass) and report
 * It reports on stdout (the guest's console), one write per line so that lines do not
 * mix with the shell's:
 *   MEMWORK-STAT mode=hot|cold ops=N bad=N pswpin=N pswpout=N oomkill=N
 * once a guest second while hot and on every switch;
 *   MEMWORK-FILLED pages=N  and  MEMWORK-VERIFIED seq=N pages=N bad=N (then a STAT)
 * A page that does not check out is counted in bad= and rewritten.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS_PER_LINE 8
#define LINES (PAGE / 64)

static volatile sig_atomic_t want_hot, want_verify;
static uint64_t ops, bad;
static unsigned verifies;

static void on_usr1(int s) { (void)s; want_hot = 1; }
static void on_usr2(int s) { (void)s; want_hot = 0; }
static void on_hup(int s) { (void)s; want_verify = 1; }

static inline uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

static inline uint64_t word(uint64_t page, uint32_t gen, unsigned line) {
  return mix((page << 24) ^ ((uint64_t)gen << 8) ^ line);
}

static void write_page(uint64_t *p, uint64_t page, uint32_t gen) {
  for (unsigned l = 0; l < LINES; l++) p[l * WORDS_PER_LINE] = word(page, gen, l);
}

static int check_page(const uint64_t *p, uint64_t page, uint32_t gen) {
  for (unsigned l = 0; l < LINES; l++)
    if (p[l * WORDS_PER_LINE] != word(page, gen, l)) return 0;
  return 1;
}

static unsigned long vmstat(const char *key) {
  FILE *f = fopen("/proc/vmstat", "r");
  if (!f) return 0;
  char k[64];
  unsigned long v, out = 0;
  size_t n = strlen(key);
  while (fscanf(f, "%63s %lu", k, &v) == 2)
    if (strlen(k) == n && memcmp(k, key, n) == 0) { out = v; break; }
  fclose(f);
  return out;
}

static void say(const char *line) {
  /* one write: the line arrives whole on the console */
  if (write(1, line, strlen(line)) < 0) { /* the console is gone: nothing to do */ }
}

static void stat_line(int hot) {
  char b[256];
  snprintf(b, sizeof b,
           "MEMWORK-STAT mode=%s ops=%llu bad=%llu pswpin=%lu pswpout=%lu oomkill=%lu\n",
           hot ? "hot" : "cold", (unsigned long long)ops, (unsigned long long)bad,
           vmstat("pswpin"), vmstat("pswpout"), vmstat("oom_kill"));
  say(b);
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  uint64_t pages = (uint64_t)atol(argv[1]) * 1024 * 1024 / PAGE;
  uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint32_t *gen = calloc(pages, sizeof *gen);
  if (mem == MAP_FAILED || !gen) { say("MEMWORK-FAILED no memory\n"); return 1; }
  /* no transparent huge pages: a page op is a 4 KiB page in and out of swap */
  madvise(mem, pages * PAGE, MADV_NOHUGEPAGE);
  signal(SIGUSR1, on_usr1);
  signal(SIGUSR2, on_usr2);
  signal(SIGHUP, on_hup);
  for (uint64_t i = 0; i < pages; i++) write_page((uint64_t *)(mem + i * PAGE), i, 0);
  char b[128];
  snprintf(b, sizeof b, "MEMWORK-FILLED pages=%llu\n", (unsigned long long)pages);
  say(b);
  uint64_t rng = mix((uint64_t)getpid() ^ (uint64_t)time(NULL));
  int hot = 0;
  double next = 0;
  for (;;) {
    if (want_verify) {
      want_verify = 0;
      uint64_t before = bad;
      for (uint64_t i = 0; i < pages; i++) {
        uint64_t *p = (uint64_t *)(mem + i * PAGE);
        if (!check_page(p, i, gen[i])) { bad++; write_page(p, i, gen[i]); }
      }
      snprintf(b, sizeof b, "MEMWORK-VERIFIED seq=%u pages=%llu bad=%llu\n", ++verifies,
               (unsigned long long)pages, (unsigned long long)(bad - before));
      say(b);
      stat_line(hot);
    }
    if (hot != want_hot) {
      hot = want_hot;
      stat_line(hot);
      next = now() + 1;
    }
    if (!hot) {
      /* a signal cuts the sleep short; the flags are looked at again either way */
      usleep(50000);
      continue;
    }
    for (int k = 0; k < 256; k++) {
      rng = mix(rng);
      uint64_t i = rng % pages;
      uint64_t *p = (uint64_t *)(mem + i * PAGE);
      if (!check_page(p, i, gen[i])) bad++;
      write_page(p, i, ++gen[i]);
      ops++;
    }
    if (now() >= next) {
      stat_line(1);
      next = now() + 1;
    }
  }
}
