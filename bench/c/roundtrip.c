/* connect + accept + close round trips, for bench/core.py.
 *
 *   roundtrip server PORT            accept and close, forever
 *   roundtrip client HOST PORT N W   N timed round trips after W warm-up ones;
 *                                    prints one latency (ns) per line
 *
 * A C program, so that what is timed is the socket calls (and axnet's
 * handling of them), not an interpreter.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int serve(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) {
        perror("roundtrip server");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int c = accept(s, (struct sockaddr *)&peer, &len);
        if (c >= 0) close(c);
    }
}

static int client(const char *host, int port, int n, int warm) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    char byte;
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "roundtrip client: bad host %s\n", host);
        return 2;
    }
    for (int i = 0; i < n + warm; i++) {
        long long t0 = now_ns();
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&a, sizeof a)) {
            perror("roundtrip client: connect");
            return 1;
        }
        (void)!read(s, &byte, 1); /* EOF once the server has closed */
        close(s);
        long long t1 = now_ns();
        if (i >= warm) printf("%lld\n", t1 - t0);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server")) return serve(atoi(argv[2]));
    if (argc == 6 && !strcmp(argv[1], "client"))
        return client(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: roundtrip server PORT | client HOST PORT N WARMUP\n");
    return 2;
}
