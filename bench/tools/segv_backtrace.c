/* LD_PRELOAD helper for a GPU machine that has no gdb: on SIGSEGV / SIGABRT / SIGBUS, print the
 * native backtrace (with each frame's library and offset, for addr2line) to stderr, then die by
 * the same signal.
 *   gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so bench/tools/segv_backtrace.c
 *   LD_PRELOAD=/tmp/segv_backtrace.so python3 crash.py */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_fatal(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  char line[512];
  int len = snprintf(line, sizeof line, "\n=== native backtrace (signal %d, %d frames) ===\n", sig, n);
  write(2, line, (size_t)len);
  for (int i = 0; i < n; ++i) {
    Dl_info info;
    memset(&info, 0, sizeof info);
    if (dladdr(frames[i], &info) && info.dli_fname) {
      len = snprintf(line, sizeof line, "#%-2d %s +0x%lx (%s)\n", i, info.dli_fname,
                     (unsigned long)((char*)frames[i] - (char*)info.dli_fbase),
                     info.dli_sname ? info.dli_sname : "?");
    } else {
      len = snprintf(line, sizeof line, "#%-2d %p\n", i, frames[i]);
    }
    write(2, line, (size_t)len);
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  signal(SIGSEGV, on_fatal);
  signal(SIGBUS, on_fatal);
  signal(SIGABRT, on_fatal);
}
