/* What one trapped call costs, by how the supervisor answers it.
 *
 *   wakeup send   N     answer with SECCOMP_IOCTL_NOTIF_SEND (an error)
 *   wakeup addfd  N     put an fd into the app with SECCOMP_IOCTL_NOTIF_ADDFD,
 *                       then answer with its number (how axnet answers accept)
 *
 * A child traps getsockname() N times; the parent answers each one.  The
 * notification fd is in SYNC_WAKE_UP mode, as axnet's engine is: the kernel
 * then wakes the supervisor, and wakes the app on SEND, on the CPU it is
 * already on.  ADDFD wakes the app with a plain wakeup to take the fd; the
 * SEND after it wakes it again, on the supervisor's CPU.  (ADDFD_FLAG_SEND
 * would do both in one step, but a signal to the supervisor during it turns
 * the answer into 0: axnet does not use it.)  Run it pinned to one CPU and
 * unpinned to see what the wakeups cost on this machine.
 *
 * Prints one line of JSON: {"mode": ..., "p50_us": ..., "p90_us": ...}.
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

/* Send or receive one fd over a unix socket. */
static int pass_fd(int sock, int fd) {
    char byte = 'f', control[CMSG_SPACE(sizeof fd)];
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1};
    memset(control, 0, sizeof control);
    m.msg_control = control;
    m.msg_controllen = sizeof control;
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof fd);
    memcpy(CMSG_DATA(h), &fd, sizeof fd);
    return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}

static int take_fd(int sock) {
    char byte, control[CMSG_SPACE(sizeof(int))];
    struct iovec io = {&byte, 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = control,
                       .msg_controllen = sizeof control};
    if (recvmsg(sock, &m, 0) != 1 || CMSG_FIRSTHDR(&m) == NULL) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
    return fd;
}

/* The app: trap getsockname() n times, report the p50 and p90 in µs. */
static int app(int sock, int n, const char *mode) {
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getsockname, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof code / sizeof code[0], code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) return 1;
    int nfd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                           SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (nfd < 0 || pass_fd(sock, nfd) < 0) return 1;
    close(nfd);
    char go;
    if (read(sock, &go, 1) != 1) return 1;
    long long *took = malloc((size_t)n * sizeof *took);
    if (took == NULL) return 1;
    for (int i = 0; i < n; i++) {
        long long t0 = now_ns();
        long fd = syscall(SYS_getsockname, 0, NULL, NULL);
        if (fd >= 0) close((int)fd); /* addfd mode: the fd we were given */
        took[i] = now_ns() - t0;
    }
    qsort(took, (size_t)n, sizeof *took, by_value);
    printf("{\"mode\": \"%s\", \"p50_us\": %.2f, \"p90_us\": %.2f}\n", mode,
           took[n / 2] / 1e3, took[n * 9 / 10] / 1e3);
    fflush(stdout);
    return 0;
}

/* The supervisor: answer every notification until the app is gone. */
static int supervise(int sock, int addfd) {
    int nfd = take_fd(sock);
    if (nfd < 0) return 1;
    if (ioctl(nfd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, 0) < 0)
        fprintf(stderr, "wakeup: no SYNC_WAKE_UP (Linux < 6.6): %s\n", strerror(errno));
    if (write(sock, "g", 1) != 1) return 1;
    for (;;) {
        struct pollfd p = {.fd = nfd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0 && errno != EINTR) return 1;
        if (p.revents & (POLLHUP | POLLERR)) return 0;
        struct seccomp_notif req;
        memset(&req, 0, sizeof req);
        if (ioctl(nfd, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) continue;
        if (addfd) {
            struct seccomp_notif_addfd add = {.id = req.id, .srcfd = (__u32)sock};
            int fd = ioctl(nfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
            struct seccomp_notif_resp resp = {.id = req.id, .val = fd};
            ioctl(nfd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
        } else {
            struct seccomp_notif_resp resp = {.id = req.id, .error = -EBADF};
            ioctl(nfd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
        }
    }
}

int main(int argc, char **argv) {
    int addfd = argc == 3 && !strcmp(argv[1], "addfd");
    int n = argc == 3 ? atoi(argv[2]) : 0;
    if (n < 10 || (!addfd && strcmp(argv[1], "send"))) {
        fprintf(stderr, "usage: wakeup send|addfd N   (N >= 10)\n");
        return 2;
    }
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0) return 1;
    pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) _exit(app(pair[1], n, argv[1]));
    close(pair[1]);
    int failed = supervise(pair[0], addfd);
    int status;
    waitpid(child, &status, 0);
    return failed || !WIFEXITED(status) || WEXITSTATUS(status);
}
