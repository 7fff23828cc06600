/* What a system call that no filter traps costs, in ns: run it bare, under
 * seccomp_only and under `axnet run` to see what having a filter costs every
 * call an app makes, apart from the calls axnet answers.
 *
 *   syscall_price N
 *
 * Times N getppid() calls and N/4 one-byte write()+read() pairs on a pipe
 * (the shape of a request served: read, write), five rounds each, and
 * prints one line of JSON with the fastest round of each, per call:
 * {"getppid_ns": ..., "pipe_write_read_ns": ...}.  The fastest round is the
 * one the scheduler disturbed least; the price of the filter is in all of
 * them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 5

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc == 2 ? atol(argv[1]) : 0;
    if (n < 4) {
        fprintf(stderr, "usage: syscall_price N (N >= 4 calls per round)\n");
        return 2;
    }
    int fds[2];
    if (pipe(fds) < 0) {
        perror("syscall_price: pipe");
        return 1;
    }
    double getppid_ns = 1e18, pipe_ns = 1e18;
    for (int round = 0; round < ROUNDS; round++) {
        long long t0 = now_ns();
        for (long i = 0; i < n; i++) syscall(SYS_getppid); /* not cached by libc */
        long long t1 = now_ns();
        char byte = 'x';
        for (long i = 0; i < n / 4; i++) {
            if (write(fds[1], &byte, 1) != 1 || read(fds[0], &byte, 1) != 1) {
                perror("syscall_price: pipe");
                return 1;
            }
        }
        long long t2 = now_ns();
        double g = (double)(t1 - t0) / n, p = (double)(t2 - t1) / (n / 4);
        if (g < getppid_ns) getppid_ns = g;
        if (p < pipe_ns) pipe_ns = p;
    }
    printf("{\"getppid_ns\": %.1f, \"pipe_write_read_ns\": %.1f}\n", getppid_ns, pipe_ns);
    return 0;
}
