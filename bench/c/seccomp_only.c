/* Run a program under a seccomp filter that traps nothing.
 *
 *   seccomp_only PROGRAM [ARGS...]
 *
 * The filter has the shape of axnet's (a few compares on the call number,
 * then ALLOW) but sends nothing to a supervisor.  What a program loses under
 * it, against running bare, is what the kernel charges for having a filter at
 * all; bench/core.py puts it beside axnet's figure so the two can be told
 * apart.  SPEC_ALLOW as axnet's: the app's speculation state stays its own.
 */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: seccomp_only PROGRAM [ARGS...]\n");
        return 2;
    }
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 38 /* ENOSYS */),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof code / sizeof code[0], code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, &prog) < 0) {
        perror("seccomp_only: installing the filter");
        return 1;
    }
    execvp(argv[1], argv + 1);
    perror("seccomp_only: exec");
    return 127;
}
