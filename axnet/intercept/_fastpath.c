/* The engine's hot path in C: one notification, received and usually answered.
 *
 * Theory of operation
 * -------------------
 * The Python engine (_engine.py) is the whole truth of what axnet does with
 * an app's socket calls.  This module does the same for the calls a busy app
 * makes over and over, without an interpreter in between:
 *
 *   connect      to a virtual address the table serves (the redirect);
 *   accept(4)    on a virtual listener, with the client's virtual address;
 *   getsockname  and getpeername, rewritten or passed on with CONTINUE
 *                (an inert wildcard, bound on loopback, shows as the wildcard).
 *
 * Everything else — binds, listens, refusals, real destinations, parked
 * waits, first contact with a thread, faults — goes back to Python, which
 * handles it from the start.  The rule that keeps the two paths one: this
 * code hands a notification back only *before* it has done anything the app
 * could see (reads, lookups and our own duplicates of its socket do not
 * count), or it hands back exactly the state Python needs to finish (an
 * accepted connection to deliver, a connect to wait for).
 *
 * What it reads, Python owns: the pidfd and /proc/TID/mem and maps caches
 * (opening and validating handles stays in Python, which this code asks to
 * do it for a thread's first call), the engine's bindings, the table's
 * packed indexes.  Keys are
 * "endpoints": a 16-byte IPv6 or v4-mapped address and a 2-byte big-endian
 * port.  The GIL is held throughout: every syscall here is non-blocking and
 * short, and dropping the GIL per call would cost more than the call.
 *
 * What a call costs
 * -----------------
 * With SYNC_WAKE_UP the kernel hands the CPU straight from the app to this
 * loop and back: a call answered with SEND costs about 5 µs end to end, and
 * most of what is left is the syscalls below, each a few hundred ns (a
 * /proc/TID/mem access about 1 µs).  Hence: no syscall that can be skipped.
 * An accept is answered with ADDFD|SEND, for which the kernel wakes the app
 * with a plain wakeup: where a CPU is idle the app moves there, and on a VM
 * that makes the call cost ~45 µs instead of ~6 (bench/c/wakeup.c).
 * Nothing here can change that; the loop only avoids adding wakeups of its
 * own (one poll(), no hand-off to another thread).
 *
 * A blocking accept with nothing queued parks: the loop keeps the
 * notification and puts its listener in that same poll() set, one entry per
 * listener however many accepts wait on it.  The listener's own wakeup then
 * reaches the loop directly, and parking costs an fstat (an epoll set of
 * them took three calls: add, wait, delete).
 *
 * Busy polling
 * ------------
 * The connection a parked accept waits for comes from another process,
 * usually on another CPU, whose wakeup of a sleeping loop costs as much as
 * the rest of the accept (on a VM, waking an idle vCPU takes ~20 µs).  So
 * for a while after an accept parks, the loop polls without sleeping,
 * yielding the CPU between polls to anything else runnable on it, as the
 * kernel's own busy polling of sockets (net.core.busy_poll) does.  The
 * budget is `axnet run --busy-poll` (0: never) and the window adapts to
 * it as the kernel's halt polling does: it doubles, up to the budget, while
 * connections come after it closed but within the budget, and halves, down
 * to nothing, each time one comes later than the budget.  A server waiting
 * for slow clients therefore sleeps at once after its first few; a busy one
 * spends at most the budget per park.
 *
 * What a window is judged by depends on the window: when the loop slept,
 * the wait it measures includes its own wakeup, and while both sides'
 * loops sleep their vCPUs go idle, so the whole exchange slows (this VM
 * runs without guest halt polling).  A Python pair's next connection came
 * 25 to 75 µs after a park, and a Python client's next connect 75 to
 * 100 µs after the last was answered, while the loops polled; 100 to
 * 150 µs and 100 to 175 µs once they slept.  With a 100 µs budget the
 * windows therefore closed and stayed closed for Python apps (a tenth to
 * two thirds of parks caught, a fifth of connects), where C apps' waits
 * fit either way.  So the budget (`axnet run`'s default) covers Python's
 * waits with room to spare.
 *
 * The same holds for the app's next call after an answer: a server's
 * getsockname after its accept (CPython makes one), its next accept after
 * it closed the connection.  So after each answer the loop also polls for
 * the next notification, in a window of its own that adapts in the same
 * way: an app whose next call comes much later (a client between its
 * connects) closes it after a few.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef IP_LOCAL_PORT_RANGE
#define IP_LOCAL_PORT_RANGE 51
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif
/* linux/fs.h of 6.11: the app's mappings, asked of a /proc/TID/maps handle. */
struct axnet_procmap_query {
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size,
        vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define AXNET_PROCMAP_QUERY _IOWR('f', 17, struct axnet_procmap_query)
#define VMA_READABLE 0x1
#define VMA_WRITABLE 0x2

#define ENDPOINT_LEN 18 /* address (16) + port (2, network order) */
#define ME_LEN 40 /* real host (16), vip (16), block lo, hi (2 each), spill lo, hi (2 each) */

/* What step() hands back to Python, besides None (answered). */
enum { SLOW = 0, DELIVER = 1, CONNECTING = 2, PARKED = 3 };

static const unsigned char v4_mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
static const unsigned char loopback4[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
static const unsigned char loopback6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};

/* An accept waiting natively for its listener: a copy of the notification. */
typedef struct {
    struct seccomp_notif n;
    int family;
    unsigned port;
    long long since_ms; /* when it parked: SO_RCVTIMEO counts from here */
    long long limit_ms; /* the listener's SO_RCVTIMEO then (0: none): the kernel reads it
                         * once, when accept starts, so a later change leaves it alone */
    ino_t listener;     /* the listening socket's inode: accepts on one share a watch */
    unsigned long long seq; /* parking order: the oldest on a listener is served first */
} Parked;

enum { FIXED_FDS = 3 }; /* the poll set: the notify fd, wake, waiters, then watches */

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long now_ms(void) { return now_ns() / 1000000; }

typedef struct {
    PyObject_HEAD
    int nfd;
    size_t notif_size, resp_size;
    unsigned char *notif_buf, *resp_buf;
    PyObject *pidfds, *mems, *maps, *names, *inert, *pending; /* dicts owned by Python */
    PyObject *retired; /* socket inode -> name of the closed listener that accepted it */
    PyObject *serving; /* real port -> name, of the app's listening bindings */
    PyObject *adopt; /* Python's opener of a new thread's handles, or NULL */
    PyObject *sources; /* (node address, destination) -> whether to bind the source */
    PyObject *identity, *me;                   /* the engine's identity, packed */
    Parked **parked;                           /* indexed by listener fd (ours) */
    int parked_cap, parked_count;
    unsigned long long parked_seq;
    struct pollfd *fds; /* FIXED_FDS, then one parked fd per listener (its oldest) */
    int fds_cap, watches;
    int watches_stale;  /* parked accepts changed since the watches were chosen */
    /* Busy polling (see above), in ns: the budget; for parked accepts and for
     * the call after an answer, the window each adapts to, when the wait
     * began (an accept parked, a call was answered), and until when the
     * loop polls for it. */
    long long poll_budget, poll_window, parked_at, poll_until;
    long long follow_window, answered_at, follow_until;
    unsigned long long notifications, answered, redirected, deferred, caught_polling,
        caught_following, missed_polling, missed_following, adopted;
} Fast;

/* What a hand-back carries besides the notification. */
typedef struct {
    int fd;        /* DELIVER: the accepted connection; CONNECTING, PARKED: our duplicate */
    int family;    /* DELIVER, PARKED: the listener's family */
    unsigned port; /* DELIVER, PARKED: the listener's real port */
    int32_t room;  /* DELIVER: the app's *addrlen, read once (when room_read) */
    int room_read;
    int started;   /* CONNECTING: what connect() said (EINPROGRESS, or EALREADY) */
    struct sockaddr_storage peer; /* DELIVER: the peer; CONNECTING: the destination */
    socklen_t peer_len;
} Handback;

/* Everything one notification needs while it is handled. */
typedef struct {
    Fast *self;
    struct seccomp_notif *n;
    PyObject *engine;                  /* borrowed */
    PyObject *live, *by_real, *blocks; /* the table's packed indexes */
    const unsigned char *me;           /* the packed identity (ME_LEN bytes) */
    uint64_t vma_start, vma_end, vma_flags; /* the mapping last asked about (see allowed) */
} Call;

/* Attribute names, interned once (PyInit__fastpath). */
static PyObject *s_table, *s_identity, *s_live, *s_real, *s_blocks, *s_packed_me, *s_retired,
    *s_retired_blocks;

/* -- small helpers ------------------------------------------------------------ */

/* dict[key] for an int key: 0 with *value borrowed (NULL when absent), or -1
 * when Python could not look (the error is cleared: callers go the slow way). */
static int dict_int(PyObject *dict, unsigned long key, PyObject **value) {
    PyObject *k = PyLong_FromUnsignedLong(key);
    *value = k ? PyDict_GetItemWithError(dict, k) : NULL;
    Py_XDECREF(k);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

static int dict_fd(PyObject *dict, uint32_t tid) {
    PyObject *value;
    if (dict_int(dict, tid, &value) < 0 || value == NULL) return -1;
    long fd = PyLong_AsLong(value);
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_Clear();
        return -1;
    }
    return (int)fd;
}

/* Borrowed value of dict[bytes(key)] or NULL. */
static PyObject *dict_bytes(PyObject *dict, const unsigned char *key, Py_ssize_t len) {
    PyObject *k = PyBytes_FromStringAndSize((const char *)key, len);
    if (k == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (v == NULL) PyErr_Clear();
    return v;
}

/* Whether Python keeps connections for the listener at real port `port`
 * (or cannot say): then an accept on it is Python's to answer. */
static int kept_for(Fast *self, unsigned port) {
    PyObject *queued;
    if (dict_int(self->pending, port, &queued) < 0) return 1;
    if (queued == NULL) return 0;
    int kept = PyObject_IsTrue(queued);
    if (kept < 0) PyErr_Clear();
    return kept != 0;
}

static int respond(Fast *self, uint64_t id, int64_t val, int error, uint32_t flags) {
    struct seccomp_notif_resp *resp = (struct seccomp_notif_resp *)self->resp_buf;
    memset(self->resp_buf, 0, self->resp_size);
    resp->id = id;
    resp->val = val;
    resp->error = -error;
    resp->flags = flags;
    int rc;
    do /* the notify lock is taken interruptibly */
        rc = ioctl(self->nfd, SECCOMP_IOCTL_NOTIF_SEND, resp);
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != ENOENT) return -1;
    self->answered++;
    self->answered_at = now_ns();
    self->follow_until = self->answered_at + self->follow_window;
    return 0;
}

static int id_valid(Fast *self, uint64_t id) {
    int rc;
    do
        rc = ioctl(self->nfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &id);
    while (rc < 0 && errno == EINTR);
    return rc == 0;
}

/* Our duplicate of the app's fd args[0] through a cached pidfd; -1 if none. */
static int dup_target(Call *c) {
    int64_t target = (int32_t)c->n->data.args[0];
    if (target < 0) return -1;
    int pidfd = dict_fd(c->self->pidfds, c->n->pid);
    if (pidfd < 0) return -1;
    long fd = syscall(SYS_pidfd_getfd, pidfd, (int)target, 0);
    return fd < 0 ? -1 : (int)fd;
}

/* Cleared once the kernel says it has no PROCMAP_QUERY (before 6.11): then
 * page protections cannot be honoured, here as in Python (_tasks). */
static int procmap_known = 1;

/* 0 when the app may access len bytes at address with the rights need (its
 * mem handle reaches pages the app may not: a write into its code would
 * succeed); -1 when it may not, or we cannot tell: Python then answers
 * (EFAULT where the kernel would).  The mapping found is remembered for the
 * rest of the call: a result and its length are mostly on one stack. */
static int allowed(Call *c, uint64_t address, size_t len, uint64_t need) {
    uint64_t end = address + len;
    if (end < address) return -1;
    while (procmap_known && address < end) {
        if (!(c->vma_start <= address && address < c->vma_end)) {
            int maps = dict_fd(c->self->maps, c->n->pid);
            if (maps < 0) return -1;
            struct axnet_procmap_query q = {.size = sizeof q, .query_addr = address};
            if (ioctl(maps, AXNET_PROCMAP_QUERY, &q) < 0) {
                if (errno != ENOTTY && errno != EINVAL) return -1;
                procmap_known = 0;
                break;
            }
            c->vma_start = q.vma_start;
            c->vma_end = q.vma_end;
            c->vma_flags = q.vma_flags;
        }
        if ((c->vma_flags & need) != need) return -1;
        address = c->vma_end;
    }
    return 0;
}

/* Exactly len bytes of the app's memory through a cached mem handle. */
static int read_app(Call *c, uint64_t address, void *out, size_t len) {
    int mem = dict_fd(c->self->mems, c->n->pid);
    if (mem < 0 || allowed(c, address, len, VMA_READABLE) < 0) return -1;
    return pread(mem, out, len, (off_t)address) == (ssize_t)len ? 0 : -1;
}

static int write_app(Call *c, uint64_t address, const void *data, size_t len) {
    int mem = dict_fd(c->self->mems, c->n->pid);
    if (mem < 0 || allowed(c, address, len, VMA_WRITABLE) < 0) return -1;
    return pwrite(mem, data, len, (off_t)address) == (ssize_t)len ? 0 : -1;
}

/* Whether fd is a stream socket.  Where its address is read anyway, that
 * gives the family: one getsockopt fewer than inet_stream_family(). */
static int is_stream(int fd) {
    int type = 0;
    socklen_t len = sizeof type;
    return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

/* Family of an inet stream socket, or 0 for anything else. */
static int inet_stream_family(int fd) {
    int family = 0, type = 0;
    socklen_t len = sizeof family;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &len) < 0) return 0;
    len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) return 0;
    if (type != SOCK_STREAM || (family != AF_INET && family != AF_INET6)) return 0;
    return family;
}

/* sockaddr -> endpoint; 0, or -1 when it is not a plain inet address. */
static int endpoint_of(const struct sockaddr_storage *sa, socklen_t len, unsigned char *out) {
    if (sa->ss_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        memcpy(out, v4_mapped_prefix, 12);
        memcpy(out + 12, &in->sin_addr, 4);
        memcpy(out + 16, &in->sin_port, 2);
        return 0;
    }
    if (sa->ss_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        memcpy(out, &in6->sin6_addr, 16);
        memcpy(out + 16, &in6->sin6_port, 2);
        return 0;
    }
    return -1;
}

/* endpoint -> sockaddr of the socket's family, as pack_inet(); its length, or 0. */
static socklen_t sockaddr_of(int family, const unsigned char *endpoint,
                             struct sockaddr_storage *out) {
    memset(out, 0, sizeof *out);
    if (family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_addr, endpoint, 16);
        memcpy(&in6->sin6_port, endpoint + 16, 2);
        return sizeof *in6;
    }
    if (memcmp(endpoint, v4_mapped_prefix, 12) != 0) return 0; /* IPv6 in AF_INET */
    struct sockaddr_in *in = (struct sockaddr_in *)out;
    in->sin_family = AF_INET;
    memcpy(&in->sin_addr, endpoint + 12, 4);
    memcpy(&in->sin_port, endpoint + 16, 2);
    return sizeof *in;
}

static unsigned port_of(const unsigned char *endpoint) {
    return (unsigned)endpoint[16] << 8 | endpoint[17];
}

static unsigned be16(const unsigned char *p) { return (unsigned)p[0] << 8 | p[1]; }

/* The virtual IP of the block of *index* (host address -> packed blocks, see
 * ServiceTable.block_keys) that holds endpoint's port, into vip: 0, or -1. */
static int block_vip(PyObject *index, const unsigned char *endpoint, unsigned char *vip) {
    PyObject *blocks = dict_bytes(index, endpoint, 16);
    if (blocks == NULL || !PyTuple_Check(blocks)) return -1;
    unsigned port = port_of(endpoint);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(blocks); i++) {
        PyObject *block = PyTuple_GET_ITEM(blocks, i);
        if (!PyBytes_Check(block) || PyBytes_GET_SIZE(block) != 20) continue;
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(block);
        if (be16(b) <= port && port <= be16(b + 2)) {
            memcpy(vip, b + 4, 16);
            return 0;
        }
    }
    return -1;
}

/* The virtual IP of the app whose connections leave from endpoint, into vip. */
static int client_vip(Call *c, const unsigned char *endpoint, unsigned char *vip) {
    return block_vip(c->blocks, endpoint, vip);
}

/* The virtual IP of the app, withdrawn since, whose connections left from
 * endpoint, into vip (the table's retired_block_keys, read only when no live
 * block holds the port): 1 if found, 0 if not, -1 if the table is not as
 * expected (Python answers). */
static int retired_client(Call *c, const unsigned char *endpoint, unsigned char *vip) {
    PyObject *table = PyObject_GetAttr(c->engine, s_table);
    PyObject *retired = table == NULL ? NULL : PyObject_GetAttr(table, s_retired_blocks);
    Py_XDECREF(table);
    if (retired == NULL || !PyDict_Check(retired)) {
        Py_XDECREF(retired);
        PyErr_Clear();
        return -1;
    }
    int found = block_vip(retired, endpoint, vip) == 0;
    Py_DECREF(retired);
    return found;
}

/* Whether endpoint's port lies in a client block of the app: its current
 * one, or one it used up before (still its own: the table's, under its vip). */
static int own_block_port(Call *c, const unsigned char *endpoint) {
    unsigned lo = be16(c->me + 32), hi = be16(c->me + 34), p = port_of(endpoint);
    if (lo && lo <= p && p <= hi) return 1;
    unsigned char vip[16];
    return client_vip(c, endpoint, vip) == 0 && memcmp(vip, c->me + 16, 16) == 0;
}

/* Whether fd's source port was kept in a client block (IP_LOCAL_PORT_RANGE,
 * set by a redirected connect).  A connect to a real address takes its port
 * from the kernel's whole range, where the blocks lie too: such a port is
 * the node's, whatever block it falls in. */
static int pinned(int fd) {
    uint32_t range = 0;
    socklen_t len = sizeof range;
    return getsockopt(fd, IPPROTO_IP, IP_LOCAL_PORT_RANGE, &range, &len) == 0 && range != 0;
}

/* Whether the kernel would send a connection to dest from an address other
 * than the node's (me): a second loopback address (127.0.0.2 sends from
 * 127.0.0.1), another interface's.  1, 0, or 1 when the route cannot be
 * asked (the connect will say why). */
static int source_differs(const unsigned char *me, const unsigned char *dest) {
    int family = memcmp(dest, v4_mapped_prefix, 12) == 0 ? AF_INET : AF_INET6;
    unsigned char end[ENDPOINT_LEN];
    memcpy(end, dest, 16);
    end[16] = 0;
    end[17] = 9; /* any port: a datagram socket's connect sends nothing */
    struct sockaddr_storage sa, local;
    socklen_t len = sockaddr_of(family, end, &sa), local_len = sizeof local;
    int s = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return 1;
    int differs = 1;
    unsigned char source[ENDPOINT_LEN];
    if (connect(s, (struct sockaddr *)&sa, len) == 0 &&
        getsockname(s, (struct sockaddr *)&local, &local_len) == 0 &&
        endpoint_of(&local, local_len, source) == 0)
        differs = memcmp(source, me, 16) != 0;
    close(s);
    return differs;
}

/* Make a connection to a virtual service leave from the node's address,
 * where servers look its client block up, when the kernel would pick
 * another (see source_differs; cached per node address and destination).
 * Bound without a port: the connect still picks one in the block.  A socket
 * the app bound already keeps its address (bind fails with EINVAL).  0, or
 * -1 when it could not (Python does it again). */
static int bind_source(Call *c, int fd, int family, const unsigned char *dest) {
    int v4_me = memcmp(c->me, v4_mapped_prefix, 12) == 0;
    if (v4_me != (memcmp(dest, v4_mapped_prefix, 12) == 0)) return 0; /* other family */
    unsigned char key[32];
    memcpy(key, c->me, 16);
    memcpy(key + 16, dest, 16);
    PyObject *known = dict_bytes(c->self->sources, key, sizeof key);
    int differs;
    if (known != NULL) {
        differs = PyObject_IsTrue(known);
        if (differs < 0) {
            PyErr_Clear();
            return -1;
        }
    } else {
        differs = source_differs(c->me, dest);
        PyObject *k = PyBytes_FromStringAndSize((const char *)key, sizeof key);
        if (k == NULL || PyDict_SetItem(c->self->sources, k, differs ? Py_True : Py_False) < 0) {
            Py_XDECREF(k);
            PyErr_Clear();
            return -1;
        }
        Py_DECREF(k);
    }
    if (!differs) return 0;
    unsigned char end[ENDPOINT_LEN] = {0};
    memcpy(end, c->me, 16);
    struct sockaddr_storage sa;
    socklen_t len = sockaddr_of(family, end, &sa);
    if (!len) return 0; /* an IPv4 socket on an IPv6 node: the route decides */
    int one = 1;
    if (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0) return -1;
    if (bind(fd, (struct sockaddr *)&sa, len) < 0 && errno != EINVAL) return -1;
    return 0;
}

/* Store a result address as the kernel does: truncated to the room the app
 * gave (read by the caller, >= 0), full length reported, and reported first
 * (move_addr_to_user(), Linux 6.18): an address that faults leaves *addrlen
 * set all the same.  0, or -1 on a fault (which Python retries). */
static int store_sockaddr(Call *c, uint64_t addr_ptr, uint64_t len_ptr, int32_t room,
                          const struct sockaddr_storage *sa, socklen_t len) {
    int32_t full = (int32_t)len;
    size_t stored = (size_t)room < len ? (size_t)room : len;
    /* Both checked before either is written: a fault is Python's to answer
     * from the start, with the length the app passed. */
    if (allowed(c, len_ptr, sizeof full, VMA_WRITABLE) < 0 ||
        (room && allowed(c, addr_ptr, stored, VMA_WRITABLE) < 0))
        return -1;
    /* The kernel writes *addrlen back even when it holds that value already
     * (the usual case: room for exactly this family); writing the same value
     * again changes nothing the app can see, and costs a /proc access. */
    if (full != room && write_app(c, len_ptr, &full, sizeof full) < 0) return -1;
    if (room && write_app(c, addr_ptr, sa, stored) < 0) return -1;
    return 0;
}

/* -- connect -------------------------------------------------------------------- */

/* Each handler returns -1 when the notification is answered (or gone), else
 * the kind of hand-back, with out->fd set where the kind carries a socket. */
static int on_connect(Call *c, Handback *out) {
    struct seccomp_notif *n = c->n;
    uint32_t addrlen = (uint32_t)n->data.args[2];
    int fd = dup_target(c);
    if (fd < 0) return SLOW;
    int family = inet_stream_family(fd);
    if (!family || addrlen != (family == AF_INET ? sizeof(struct sockaddr_in)
                                                 : sizeof(struct sockaddr_in6)))
        goto slow;
    struct sockaddr_storage sa;
    if (read_app(c, n->data.args[1], &sa, addrlen) < 0) goto slow;
    if (!id_valid(c->self, n->id)) {
        close(fd);
        return -1; /* gone: nobody to answer */
    }
    unsigned char endpoint[ENDPOINT_LEN];
    if (sa.ss_family != family || endpoint_of(&sa, addrlen, endpoint) < 0) goto slow;
    if (family == AF_INET6 && ((struct sockaddr_in6 *)&sa)->sin6_scope_id) goto slow;
    /* An app whose virtual address is IPv6 has none to reach IPv4 from:
     * Python refuses it (ENETUNREACH, as a host without IPv4). */
    if (memcmp(endpoint, v4_mapped_prefix, 12) == 0 && memcmp(c->me + 16, v4_mapped_prefix, 12) != 0)
        goto slow;
    PyObject *real = dict_bytes(c->live, endpoint, ENDPOINT_LEN);
    if (real == NULL || !PyBytes_Check(real) || PyBytes_GET_SIZE(real) != ENDPOINT_LEN) goto slow;
    unsigned char real_end[ENDPOINT_LEN]; /* ours: bind_source() allocates Python objects */
    memcpy(real_end, PyBytes_AS_STRING(real), ENDPOINT_LEN);
    struct sockaddr_storage target;
    socklen_t target_len = sockaddr_of(family, real_end, &target);
    if (!target_len) goto slow;
    if (bind_source(c, fd, family, real_end) < 0) goto slow;

    /* The app's block; without one (the node had none for it), the node's
     * spill ports, in no app's block (0: any port). */
    unsigned lo = be16(c->me + 32), hi = be16(c->me + 34);
    uint32_t range = lo ? lo | hi << 16 : be16(c->me + 36) | be16(c->me + 38) << 16;
    if (range && setsockopt(fd, IPPROTO_IP, IP_LOCAL_PORT_RANGE, &range, sizeof range) < 0)
        goto slow;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) goto slow;
    int blocking = !(flags & O_NONBLOCK);
    if (blocking) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int err = connect(fd, (struct sockaddr *)&target, target_len) == 0 ? 0 : errno;
    if ((err == EADDRNOTAVAIL && range) /* ports used up: Python logs and retries */
        || (err == ENETUNREACH && family == AF_INET6)) { /* IPv6-only, v4-mapped: Python */
        if (blocking) fcntl(fd, F_SETFL, flags);
        goto slow;
    }
    c->self->redirected++;
    int pending = blocking && (err == EINPROGRESS || err == EALREADY);
    if (pending) {
        /* A handshake over already (loopback's usual case) ends as the
         * kernel's own blocking connect does after its wait: connect() once
         * more, still without blocking.  That moves the socket from
         * "connecting" to "connected" (a later connect() fails with EISCONN,
         * not 0), or reports the handshake's error and leaves it unconnected
         * (a later connect() tries afresh); SO_ERROR would leave it
         * "connecting" for good. */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        if (poll(&p, 1, 0) == 1) {
            err = connect(fd, (struct sockaddr *)&target, target_len) == 0 ? 0 : errno;
            pending = 0;
        }
    }
    if (blocking) fcntl(fd, F_SETFL, flags);
    if (pending) { /* Python waits, then finishes it the same way */
        out->fd = fd;
        out->started = err;
        memcpy(&out->peer, &target, target_len);
        out->peer_len = target_len;
        return CONNECTING;
    }
    close(fd);
    respond(c->self, n->id, 0, err, 0);
    return -1;
slow:
    close(fd);
    return SLOW;
}

/* -- accept ---------------------------------------------------------------------- */

/* Accept one connection on our duplicate fd of the virtual listener at real
 * port `port` (family `family`) and hand it to the app.  `ready`
 * says poll() has just seen a connection queued.  Does not close fd.
 * -1: answered; PARKED: nothing queued on a blocking listener; SLOW: not
 * started; DELIVER: accepted, Python finishes. */
static int accept_on(Call *c, int fd, int family, unsigned port, int ready,
                     Handback *out) {
    struct seccomp_notif *n = c->n;
    int flags = n->data.nr == __NR_accept4 ? (int32_t)n->data.args[3] : 0;
    uint64_t addr_ptr = n->data.args[1], len_ptr = n->data.args[2];
    int want_peer = addr_ptr && len_ptr;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return SLOW;
    /* Never block here, even on a blocking listener (the app's thread is
     * parked in this very accept; every accept on it comes through here).
     * A blocking listener with nothing queued parks at once: one poll()
     * instead of switching O_NONBLOCK on and off around a failing accept. */
    int blocking = !(fl & O_NONBLOCK);
    if (blocking) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (!ready && poll(&p, 1, 0) == 0) return PARKED;
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    }
    out->peer_len = sizeof out->peer;
    int conn = accept4(fd, (struct sockaddr *)&out->peer, &out->peer_len, SOCK_CLOEXEC);
    int err = conn < 0 ? errno : 0;
    if (blocking) fcntl(fd, F_SETFL, fl);
    if (conn < 0 && blocking && (err == EAGAIN || err == EWOULDBLOCK)) return PARKED;
    /* Our fd table is full, not the app's: Python makes room and tries again. */
    if (conn < 0 && (err == EMFILE || err == ENFILE)) return SLOW;
    if (conn < 0) {
        respond(c->self, n->id, 0, err, 0);
        return -1;
    }
    out->fd = conn;
    out->family = family;
    out->port = port;
    if (want_peer) {
        /* *addrlen is read once a connection is accepted, as the kernel
         * reads it (after any wait), and handed back with it: Python stores
         * with this value, not with the full length written below.  A fault
         * or room < 0: Python answers EFAULT or EINVAL and drops the
         * connection, as the kernel does. */
        int32_t room;
        unsigned char peer_end[ENDPOINT_LEN], vip[16];
        if (read_app(c, len_ptr, &room, sizeof room) < 0) return DELIVER;
        out->room = room;
        out->room_read = 1;
        if (room < 0 || endpoint_of(&out->peer, out->peer_len, peer_end) < 0) return DELIVER;
        if (client_vip(c, peer_end, vip) == 0) {
            memcpy(peer_end, vip, 16);
        } else {
            /* A client gone since it connected: named as it was. */
            int found = retired_client(c, peer_end, vip);
            if (found < 0) return DELIVER;
            if (found) memcpy(peer_end, vip, 16);
        }
        struct sockaddr_storage shown;
        socklen_t shown_len = sockaddr_of(family, peer_end, &shown);
        if (!shown_len || store_sockaddr(c, addr_ptr, len_ptr, room, &shown, shown_len) < 0)
            return DELIVER;
    }
    if (flags & SOCK_NONBLOCK) fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) | O_NONBLOCK);
    /* Install, then answer with the number: not ADDFD_FLAG_SEND, which marks
     * the call answered (with 0) before the app has taken the fd, so a stop
     * or signal interrupting our wait for it (Ctrl-Z) makes accept return 0.
     * Without the flag an interrupted ADDFD is withdrawn or done, and safe to
     * redo.  The answer's SYNC_WAKE_UP keeps the app on this CPU, too. */
    struct seccomp_notif_addfd addfd = {
        .id = n->id,
        .flags = 0,
        .srcfd = (uint32_t)conn,
        .newfd = 0,
        .newfd_flags = flags & SOCK_CLOEXEC ? O_CLOEXEC : 0,
    };
    int newfd;
    do
        newfd = ioctl(c->self->nfd, SECCOMP_IOCTL_NOTIF_ADDFD, &addfd);
    while (newfd < 0 && errno == EINTR);
    if (newfd < 0) return DELIVER; /* the thread stopped waiting, or no fd free: Python */
    /* Drop our reference before the answer, not after: an app that closes the
     * connection at once must hold the last one, or its FIN waits until this
     * loop runs again (on one CPU that added ~20 µs a round trip). */
    close(conn);
    out->fd = -1;
    respond(c->self, n->id, newfd, 0, 0);
    return -1;
}

static int on_accept(Call *c, Handback *out) {
    struct seccomp_notif *n = c->n;
    int flags = n->data.nr == __NR_accept4 ? (int32_t)n->data.args[3] : 0;
    int fd = dup_target(c);
    if (fd < 0) return SLOW;
    struct sockaddr_storage local;
    socklen_t local_len = sizeof local;
    unsigned char endpoint[ENDPOINT_LEN];
    if (!is_stream(fd) || getsockname(fd, (struct sockaddr *)&local, &local_len) < 0 ||
        endpoint_of(&local, local_len, endpoint) < 0)
        goto slow;
    if (memcmp(endpoint, c->me, 16) != 0) goto pass; /* not on the node address */
    PyObject *name;
    if (dict_int(c->self->names, port_of(endpoint), &name) < 0) goto slow;
    if (name == NULL) goto pass;
    if (kept_for(c->self, port_of(endpoint))) goto slow; /* connections kept for it */
    if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)) {
        close(fd);
        respond(c->self, n->id, 0, EINVAL, 0);
        return -1;
    }
    if (n->data.args[1] && !n->data.args[2]) goto slow; /* EFAULT, after the accept: Python */
    int kind = accept_on(c, fd, local.ss_family, port_of(endpoint), 0, out);
    if (kind == PARKED) {
        out->fd = fd; /* the loop waits on it, and owns it */
        out->family = local.ss_family;
        out->port = port_of(endpoint);
        return PARKED;
    }
    close(fd);
    return kind;
pass:
    close(fd);
    respond(c->self, n->id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
    return -1;
slow:
    close(fd);
    return SLOW;
}

/* -- getsockname / getpeername --------------------------------------------------- */

/* The name of the service withdrawn from real endpoint, into shown (the
 * table's retired_keys, read only when nothing live names it): 1 if found,
 * 0 if not, -1 if the table is not as expected (Python answers). */
static int retired_server(Call *c, const unsigned char *endpoint, unsigned char *shown) {
    PyObject *table = PyObject_GetAttr(c->engine, s_table);
    PyObject *retired = table == NULL ? NULL : PyObject_GetAttr(table, s_retired);
    Py_XDECREF(table);
    if (retired == NULL || !PyDict_Check(retired)) {
        Py_XDECREF(retired);
        PyErr_Clear();
        return -1;
    }
    PyObject *server = dict_bytes(retired, endpoint, ENDPOINT_LEN); /* borrowed */
    int found = server == NULL ? 0 : -1;
    if (server != NULL && PyBytes_Check(server) && PyBytes_GET_SIZE(server) == ENDPOINT_LEN) {
        memcpy(shown, PyBytes_AS_STRING(server), ENDPOINT_LEN);
        found = 1;
    }
    Py_DECREF(retired);
    return found;
}

/* The name of the closed listener that accepted the connection fd, into
 * shown: 1 if found, 0 if not, -1 if the index is not as expected. */
static int retired_listener(Call *c, int fd, unsigned char *shown) {
    PyObject *retired = c->self->retired, *was = NULL;
    struct stat st;
    if (retired == NULL || !PyDict_GET_SIZE(retired) || fstat(fd, &st) < 0) return 0;
    if (dict_int(retired, (unsigned long)st.st_ino, &was) < 0) return -1;
    if (was == NULL) return 0;
    if (!PyBytes_Check(was) || PyBytes_GET_SIZE(was) != ENDPOINT_LEN) return -1;
    memcpy(shown, PyBytes_AS_STRING(was), ENDPOINT_LEN);
    return 1;
}

/* Whether fd is a connection accepted on a listener of the app (one that
 * listens at its local port of the node's address, or one closed since):
 * only there is a peer named as a client, as accept named it.  1, 0, or -1
 * if it cannot be told here (Python answers). */
static int accepted_here(Call *c, int fd) {
    struct sockaddr_storage sa;
    socklen_t len = sizeof sa;
    unsigned char local[ENDPOINT_LEN], shown[ENDPOINT_LEN];
    if (c->self->serving == NULL) return -1;
    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0 || endpoint_of(&sa, len, local) < 0)
        return -1;
    if (memcmp(local, c->me, 16) != 0) return 0;
    PyObject *serving = NULL;
    if (dict_int(c->self->serving, port_of(local), &serving) < 0) return -1;
    if (serving != NULL) return 1;
    return retired_listener(c, fd, shown);
}

static int on_getname(Call *c) {
    struct seccomp_notif *n = c->n;
    int fd = dup_target(c);
    if (fd < 0) return SLOW;
    if (!is_stream(fd)) goto pass;
    struct sockaddr_storage sa;
    socklen_t len = sizeof sa;
    unsigned char endpoint[ENDPOINT_LEN], shown_end[ENDPOINT_LEN];
    int local = n->data.nr == __NR_getsockname;
    if ((local ? getsockname(fd, (struct sockaddr *)&sa, &len)
               : getpeername(fd, (struct sockaddr *)&sa, &len)) < 0)
        goto slow; /* ENOTCONN and friends: Python answers */
    int family = sa.ss_family;
    if (family != AF_INET && family != AF_INET6) goto pass;
    if (endpoint_of(&sa, len, endpoint) < 0) goto slow;
    PyObject *inert = NULL;
    if (PyDict_GET_SIZE(c->self->inert) &&
        memcmp(endpoint, family == AF_INET6 ? loopback6 : loopback4, 16) == 0 &&
        dict_int(c->self->inert, port_of(endpoint), &inert) < 0)
        goto slow;
    if (inert != NULL) { /* a wildcard of the family the app has no address in */
        if (!PyBytes_Check(inert) || PyBytes_GET_SIZE(inert) != ENDPOINT_LEN) goto slow;
        memcpy(shown_end, PyBytes_AS_STRING(inert), ENDPOINT_LEN);
        /* The listener shows its wildcard; either end of a connection to it
         * (the app's own, on loopback) shows loopback, at the port asked for. */
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        if (!local || getpeername(fd, (struct sockaddr *)&peer, &peer_len) == 0)
            memcpy(shown_end, endpoint, 16);
    } else if (local) {
        if (memcmp(endpoint, c->me, 16) != 0) goto pass;
        PyObject *name;
        if (dict_int(c->self->names, port_of(endpoint), &name) < 0) goto slow;
        if (name != NULL && PyBytes_Check(name) && PyBytes_GET_SIZE(name) == ENDPOINT_LEN) {
            memcpy(shown_end, PyBytes_AS_STRING(name), ENDPOINT_LEN);
        } else if (name == NULL && own_block_port(c, endpoint) && pinned(fd)) {
            memcpy(shown_end, c->me + 16, 16);
            memcpy(shown_end + 16, endpoint + 16, 2);
        } else if (name == NULL) {
            /* A connection accepted on a listener the app has closed since. */
            int found = retired_listener(c, fd, shown_end);
            if (found < 0) goto slow;
            if (!found) goto pass;
        } else {
            goto slow;
        }
    } else {
        PyObject *server = dict_bytes(c->by_real, endpoint, ENDPOINT_LEN);
        if (server != NULL) {
            if (!PyBytes_Check(server) || PyBytes_GET_SIZE(server) != ENDPOINT_LEN) goto slow;
            memcpy(shown_end, PyBytes_AS_STRING(server), ENDPOINT_LEN);
        } else {
            /* A client is named only on a connection the app accepted (see
             * Engine._virtual_remote). */
            int accepted = accepted_here(c, fd);
            if (accepted < 0) goto slow;
            int found = accepted && client_vip(c, endpoint, shown_end) == 0;
            if (found) memcpy(shown_end + 16, endpoint + 16, 2);
            /* A connection made to a service withdrawn since: by a redirect,
             * whose source port was kept in the app's ports, as no connect
             * to a real address is (see Engine._virtual_remote).  Else one
             * from a client gone since, named as it was. */
            if (found == 0 && pinned(fd)) found = retired_server(c, endpoint, shown_end);
            if (found == 0 && accepted) {
                found = retired_client(c, endpoint, shown_end);
                if (found > 0) memcpy(shown_end + 16, endpoint + 16, 2);
            }
            if (found < 0) goto slow;
            if (!found) goto pass;
        }
    }
    struct sockaddr_storage shown;
    socklen_t shown_len = sockaddr_of(family, shown_end, &shown);
    if (!shown_len) goto slow;
    uint64_t addr_ptr = n->data.args[1], len_ptr = n->data.args[2];
    int err = 0;
    if (!addr_ptr || !len_ptr) goto slow; /* EFAULT or a bare length: Python */
    int32_t room;
    if (read_app(c, len_ptr, &room, sizeof room) < 0) goto slow;
    if (room < 0)
        err = EINVAL;
    else if (store_sockaddr(c, addr_ptr, len_ptr, room, &shown, shown_len) < 0)
        goto slow;
    close(fd);
    respond(c->self, n->id, 0, err, 0);
    return -1;
pass:
    close(fd);
    respond(c->self, n->id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
    return -1;
slow:
    close(fd);
    return SLOW;
}

/* -- the type -------------------------------------------------------------------- */

static PyObject *hand_back(const struct seccomp_notif *n, int kind, int fd, PyObject *extra) {
    const __u64 *a = n->data.args;
    return Py_BuildValue("(iiOKkkiIK(KKKKKK))", kind, fd, extra, (unsigned long long)n->id,
                         (unsigned long)n->pid, (unsigned long)n->flags, n->data.nr,
                         n->data.arch, (unsigned long long)n->data.instruction_pointer,
                         (unsigned long long)a[0], (unsigned long long)a[1],
                         (unsigned long long)a[2], (unsigned long long)a[3],
                         (unsigned long long)a[4], (unsigned long long)a[5]);
}

/* The hand-back tuple of kind (a new reference); closes out->fd if it fails. */
static PyObject *hand_back_with(const struct seccomp_notif *n, int kind, Handback *out) {
    PyObject *extra;
    if (kind == DELIVER)
        extra = Py_BuildValue("(iIy#N)", out->family, out->port, (const char *)&out->peer,
                              (Py_ssize_t)out->peer_len,
                              out->room_read ? PyLong_FromLong(out->room) : Py_NewRef(Py_None));
    else if (kind == CONNECTING)
        extra = Py_BuildValue("(y#i)", (const char *)&out->peer, (Py_ssize_t)out->peer_len,
                              out->started);
    else
        extra = Py_NewRef(Py_None);
    PyObject *handed = extra ? hand_back(n, kind, out->fd, extra) : NULL;
    Py_XDECREF(extra);
    if (handed == NULL && out->fd >= 0) close(out->fd);
    return handed;
}

/* -- the engine's state, read afresh for every notification ------------------------ */

/* Fill c's table and identity from the engine: strong references, released by
 * call_done().  The supervisor replaces the engine's table and identity as
 * whole objects; the table's dicts change in place. */
static int call_load(Call *c, PyObject *engine) {
    Fast *self = c->self;
    PyObject *table = PyObject_GetAttr(engine, s_table);
    if (table == NULL) return -1;
    c->live = PyObject_GetAttr(table, s_live);
    c->by_real = PyObject_GetAttr(table, s_real);
    c->blocks = PyObject_GetAttr(table, s_blocks);
    Py_DECREF(table);
    PyObject *identity = PyObject_GetAttr(engine, s_identity);
    if (c->live == NULL || c->by_real == NULL || c->blocks == NULL || identity == NULL) {
        Py_XDECREF(identity);
        return -1;
    }
    if (identity != self->identity) {
        PyObject *me = PyObject_CallMethodNoArgs(engine, s_packed_me);
        if (me == NULL || !PyBytes_Check(me) || PyBytes_GET_SIZE(me) != ME_LEN) {
            Py_XDECREF(me);
            Py_DECREF(identity);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_packed_me(): 40 bytes");
            return -1;
        }
        Py_XSETREF(self->me, me);
        Py_XSETREF(self->identity, identity);
    } else {
        Py_DECREF(identity);
    }
    if (!PyDict_Check(c->live) || !PyDict_Check(c->by_real) || !PyDict_Check(c->blocks)) {
        PyErr_SetString(PyExc_TypeError, "table indexes must be dicts");
        return -1;
    }
    c->me = (const unsigned char *)PyBytes_AS_STRING(self->me);
    return 0;
}

static void call_done(Call *c) {
    Py_CLEAR(c->live);
    Py_CLEAR(c->by_real);
    Py_CLEAR(c->blocks);
}

/* -- parked accepts ------------------------------------------------------------------ */

/* Wait natively for the listener fd (ours) of an accept; 0, or -1 if it cannot. */
static int park(Fast *self, const struct seccomp_notif *n, const Handback *out) {
    int fd = out->fd;
    struct stat st;
    if (fstat(fd, &st) < 0) return -1;
    if (fd >= self->parked_cap) {
        int cap = fd + 64;
        Parked **grown = PyMem_Realloc(self->parked, (size_t)cap * sizeof *grown);
        if (grown == NULL) return -1;
        memset(grown + self->parked_cap, 0, (size_t)(cap - self->parked_cap) * sizeof *grown);
        self->parked = grown;
        self->parked_cap = cap;
    }
    Parked *p = PyMem_Malloc(sizeof *p);
    if (p == NULL) return -1;
    p->n = *n;
    p->family = out->family;
    p->port = out->port;
    long long now = now_ns();
    p->since_ms = now / 1000000;
    struct timeval tv;
    socklen_t len = sizeof tv;
    p->limit_ms = 0;
    if (getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, &len) == 0)
        p->limit_ms = tv.tv_sec * 1000LL + (tv.tv_usec + 999) / 1000;
    p->listener = st.st_ino;
    p->seq = self->parked_seq++;
    self->parked[fd] = p;
    self->parked_count++;
    self->deferred++;
    self->watches_stale = 1;
    self->parked_at = now;
    self->poll_until = now + self->poll_window;
    return 0;
}

/* What the loop waited for (since `since`, polling until `until`) has come.
 * Caught while polling: the window stays.  Came after the window but within
 * the budget: a longer one would have caught it, so it doubles (from an
 * eighth of the budget).  Came later than the budget: polling cannot pay,
 * so it halves, and below an eighth of the budget it closes.  A window that
 * was open and caught nothing is counted as missed: its whole length was
 * spent polling. */
static void adapt(long long *window, long long budget, long long since, long long until,
                  unsigned long long *caught, unsigned long long *missed) {
    long long now = now_ns(), floor = budget / 8;
    if (now < until) {
        (*caught)++;
        return;
    }
    if (until > since) (*missed)++;
    if (now - since <= budget) {
        *window = *window < floor ? floor : *window * 2;
        if (*window > budget) *window = budget;
    } else if ((*window /= 2) < floor) {
        *window = 0;
    }
}

/* Until when the loop polls: for the connection of a parked accept, and for
 * the app's next call after an answer, whichever window ends later. */
static long long poll_end(const Fast *self) {
    long long end = self->follow_until;
    if (self->parked_count > 0 && self->poll_until > end) end = self->poll_until;
    return end;
}

/* poll() without sleeping until `end`, yielding the CPU between polls; what
 * poll() said (0: nothing came).  Called without the GIL. */
static int busy_poll(long long end, struct pollfd *fds, nfds_t nfds) {
    int ready = 0;
    while (now_ns() < end && (ready = poll(fds, nfds, 0)) == 0) sched_yield();
    return ready;
}

/* Stop waiting on fd: forget it and close it. */
static void unpark(Fast *self, int fd) {
    PyMem_Free(self->parked[fd]);
    self->parked[fd] = NULL;
    self->parked_count--;
    self->watches_stale = 1;
    close(fd);
}

/* Choose the watches: for each listener with accepts parked on it, the fd of
 * its oldest.  0, or -1 without memory (the watches stay as they were). */
static int choose_watches(Fast *self) {
    int need = FIXED_FDS + self->parked_count;
    if (need > self->fds_cap) {
        struct pollfd *grown = PyMem_Realloc(self->fds, (size_t)need * sizeof *grown);
        if (grown == NULL) return -1;
        self->fds = grown;
        self->fds_cap = need;
    }
    struct pollfd *watch = self->fds + FIXED_FDS;
    int watches = 0;
    for (int fd = 0; fd < self->parked_cap; fd++) {
        Parked *p = self->parked[fd];
        if (p == NULL) continue;
        int w = 0;
        while (w < watches && self->parked[watch[w].fd]->listener != p->listener) w++;
        if (w == watches)
            watch[watches++] = (struct pollfd){.fd = fd, .events = POLLIN};
        else if (p->seq < self->parked[watch[w].fd]->seq)
            watch[w].fd = fd;
    }
    self->watches = watches;
    self->watches_stale = 0;
    return 0;
}

/* The parked accept on fd, whose listener is ready: None, or a hand-back. */
static PyObject *serve_parked(Fast *self, PyObject *engine, int fd) {
    if (fd < 0 || fd >= self->parked_cap || self->parked[fd] == NULL) Py_RETURN_NONE;
    Parked *p = self->parked[fd];
    struct seccomp_notif n = p->n;
    adapt(&self->poll_window, self->poll_budget, self->parked_at, self->poll_until,
          &self->caught_polling, &self->missed_polling);
    if (!id_valid(self, n.id)) {
        /* Its thread was killed (parked accepts are checked only every
         * slice): the connection stays queued for a live accept. */
        unpark(self, fd);
        Py_RETURN_NONE;
    }
    Call c = {self, &n, engine, NULL, NULL, NULL, NULL, 0, 0, 0};
    Handback out = {.fd = -1};
    int kind = SLOW; /* connections kept for this listener go first: Python */
    if (!kept_for(self, p->port)) {
        if (call_load(&c, engine) == 0)
            kind = accept_on(&c, fd, p->family, p->port, 1, &out);
        else
            PyErr_Clear(); /* Python answers it (and meets the same error there) */
    }
    call_done(&c);
    /* PARKED: somebody else took it; unless Python keeps a connection for
     * this listener (its accept failed after taking it), wait again. */
    if (kind == PARKED && !kept_for(self, p->port)) Py_RETURN_NONE;
    if (kind == PARKED) kind = SLOW;
    unpark(self, fd);
    if (kind < 0) Py_RETURN_NONE;
    /* DELIVER: Python finishes; SLOW: Python answers the accept from the start. */
    return hand_back_with(&n, kind, &out);
}

/* -- notifications ------------------------------------------------------------------- */

/* The calls this code answers need the thread's pidfd, mem and maps
 * handles.  A thread's first such call finds none: Python opens and
 * validates them (the rule above: handles are only ever opened there), and
 * the call goes on here like any other.  Without that, a thread per
 * connection (Go's locked threads, a thread pool that grows) had every
 * connect answered by the Python engine. */
static int trapped_here(int nr) {
    return nr == __NR_connect || nr == __NR_accept || nr == __NR_accept4 ||
           nr == __NR_getsockname || nr == __NR_getpeername;
}

/* Whether the thread tid has all three handles (one key for the three). */
static int has_handles(Fast *self, uint32_t tid) {
    PyObject *key = PyLong_FromUnsignedLong(tid);
    int found = key != NULL && PyDict_GetItemWithError(self->pidfds, key) != NULL &&
                PyDict_GetItemWithError(self->mems, key) != NULL &&
                PyDict_GetItemWithError(self->maps, key) != NULL;
    Py_XDECREF(key);
    PyErr_Clear(); /* a failed look: adopt, and Python meets the same trouble */
    return found;
}

static void adopt(Fast *self, const struct seccomp_notif *n) {
    if (self->adopt == NULL || !trapped_here(n->data.nr) || has_handles(self, n->pid)) return;
    PyObject *done = PyObject_CallFunction(self->adopt, "kK", (unsigned long)n->pid,
                                           (unsigned long long)n->id);
    if (done == NULL) {
        PyErr_Clear(); /* the handlers find no handle, and hand the call back */
        return;
    }
    if (PyObject_IsTrue(done) == 1) self->adopted++;
    PyErr_Clear();
    Py_DECREF(done);
}

static PyObject *serve_notification(Fast *self, PyObject *engine) {
    struct seccomp_notif *n = (struct seccomp_notif *)self->notif_buf;
    memset(self->notif_buf, 0, self->notif_size);
    if (ioctl(self->nfd, SECCOMP_IOCTL_NOTIF_RECV, n) < 0) {
        if (errno == ENOENT || errno == EINTR) Py_RETURN_NONE; /* the task died meanwhile */
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->notifications++;
    /* The call after an answer came: polling for it ends.  (After a call
     * Python answered there is no answer of ours to time it from.) */
    if (self->answered_at > 0)
        adapt(&self->follow_window, self->poll_budget, self->answered_at, self->follow_until,
              &self->caught_following, &self->missed_following);
    self->answered_at = self->follow_until = 0;
    adopt(self, n);
    Call c = {self, n, engine, NULL, NULL, NULL, NULL, 0, 0, 0};
    if (call_load(&c, engine) < 0) {
        call_done(&c);
        PyErr_Clear(); /* Python answers it (and meets the same error there) */
        Handback none = {.fd = -1};
        return hand_back_with(n, SLOW, &none);
    }
    Handback out = {.fd = -1};
    int kind;
    switch (n->data.nr) {
    case __NR_connect:
        kind = on_connect(&c, &out);
        break;
    case __NR_accept:
    case __NR_accept4:
        kind = on_accept(&c, &out);
        break;
    case __NR_getsockname:
    case __NR_getpeername:
        kind = on_getname(&c);
        break;
    default:
        kind = SLOW;
    }
    call_done(&c);
    if (kind == PARKED) {
        if (park(self, n, &out) == 0) Py_RETURN_NONE;
        close(out.fd); /* nothing done yet that Python cannot redo */
        out.fd = -1;
        kind = SLOW;
    }
    if (kind < 0) Py_RETURN_NONE;
    return hand_back_with(n, kind, &out);
}

/* -- the loop --------------------------------------------------------------------------- */

enum { TIMEOUT = 0, WAKE = 1, WAITERS = 2, HUP = 3 };

static PyObject *Fast_serve(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "serve(engine, wake_fd, waiters_fd, timeout_ms, parked_timeout_ms)");
        return NULL;
    }
    PyObject *engine = args[0];
    long wake_fd = PyLong_AsLong(args[1]), waiters_fd = PyLong_AsLong(args[2]);
    long timeout = PyLong_AsLong(args[3]), parked_timeout = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    long long deadline = now_ms() + timeout;
    /* poll(), not epoll_wait(): with SYNC_WAKE_UP the kernel wakes a poll()
     * sleeper on the app's own CPU. */
    struct pollfd fixed[FIXED_FDS] = {
        {.fd = self->nfd, .events = POLLIN},
        {.fd = (int)wake_fd, .events = POLLIN},
        {.fd = (int)waiters_fd, .events = POLLIN},
    };
    for (;;) {
        if (self->watches_stale && choose_watches(self) < 0) return PyErr_NoMemory();
        struct pollfd *fds = self->fds;
        memcpy(fds, fixed, sizeof fixed);
        long long left = deadline - now_ms();
        if (left < 0) left = 0;
        nfds_t nfds = (nfds_t)(FIXED_FDS + self->watches);
        int ready = 0;
        Py_BEGIN_ALLOW_THREADS
        ready = busy_poll(poll_end(self), fds, nfds);
        if (ready == 0) ready = poll(fds, nfds, (int)left);
        Py_END_ALLOW_THREADS
        if (ready < 0) {
            if (errno != EINTR) return PyErr_SetFromErrno(PyExc_OSError);
            if (PyErr_CheckSignals() < 0) return NULL;
            continue;
        }
        if (ready == 0) return PyLong_FromLong(TIMEOUT);
        if (fds[1].revents) return PyLong_FromLong(WAKE);
        if (fds[2].revents) return PyLong_FromLong(WAITERS);
        /* One parked accept a turn: serving it may change the watches. */
        for (int w = FIXED_FDS; w < FIXED_FDS + self->watches; w++) {
            if (!fds[w].revents) continue;
            PyObject *handed = serve_parked(self, engine, fds[w].fd);
            if (handed != Py_None) return handed;
            Py_DECREF(handed);
            break;
        }
        if (fds[0].revents & POLLIN) {
            PyObject *handed = serve_notification(self, engine);
            if (handed != Py_None) return handed;
            Py_DECREF(handed);
        } else if (fds[0].revents & (POLLHUP | POLLERR)) {
            return PyLong_FromLong(HUP); /* every filtered task is gone */
        }
        long long now = now_ms();
        /* An accept parked in this turn has its timeout and signals checked
         * by Python, between turns: come back as soon as a parked call would. */
        if (self->parked_count > 0 && deadline > now + parked_timeout)
            deadline = now + parked_timeout;
        if (deadline - now < 0) return PyLong_FromLong(TIMEOUT);
    }
}

static PyObject *Fast_drop_abandoned(Fast *self, PyObject *unused) {
    (void)unused;
    for (int fd = 0; fd < self->parked_cap; fd++)
        if (self->parked[fd] != NULL && !id_valid(self, self->parked[fd]->n.id)) unpark(self, fd);
    return PyLong_FromLong(self->parked_count);
}

/* Answer EAGAIN to parked accepts whose listener's SO_RCVTIMEO has run out,
 * as the kernel's own blocking accept does; how many. */
static PyObject *Fast_expire(Fast *self, PyObject *unused) {
    (void)unused;
    long long now = now_ms();
    int expired = 0;
    for (int fd = 0; fd < self->parked_cap; fd++) {
        Parked *p = self->parked[fd];
        if (p == NULL || p->limit_ms <= 0 || now - p->since_ms < p->limit_ms) continue;
        if (respond(self, p->n.id, 0, EAGAIN, 0) < 0) return PyErr_SetFromErrno(PyExc_OSError);
        unpark(self, fd);
        expired++;
    }
    return PyLong_FromLong(expired);
}

static PyObject *Fast_parked_tids(Fast *self, PyObject *unused) {
    (void)unused;
    PyObject *tids = PyList_New(0);
    for (int fd = 0; tids != NULL && fd < self->parked_cap; fd++) {
        if (self->parked[fd] == NULL) continue;
        PyObject *tid = PyLong_FromUnsignedLong(self->parked[fd]->n.pid);
        if (tid == NULL || PyList_Append(tids, tid) < 0) Py_CLEAR(tids);
        Py_XDECREF(tid);
    }
    return tids;
}

static PyObject *Fast_interrupt(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    unsigned long tid;
    long error;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "interrupt(tid, error)");
        return NULL;
    }
    tid = PyLong_AsUnsignedLong(args[0]);
    error = PyLong_AsLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    for (int fd = 0; fd < self->parked_cap; fd++) {
        if (self->parked[fd] == NULL || self->parked[fd]->n.pid != tid) continue;
        /* The kernel never restarts an accept that has a timeout (signal(7)). */
        if (self->parked[fd]->limit_ms > 0) error = EINTR;
        if (respond(self, self->parked[fd]->n.id, 0, (int)error, 0) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        unpark(self, fd);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static void close_parked(Fast *self) {
    for (int fd = 0; fd < self->parked_cap; fd++)
        if (self->parked[fd] != NULL) unpark(self, fd);
}

static PyObject *Fast_close(Fast *self, PyObject *unused) {
    (void)unused;
    close_parked(self);
    Py_RETURN_NONE;
}

/* -- the type ---------------------------------------------------------------------------- */

static int Fast_init(Fast *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd",      "notif_size", "resp_size",    "pidfds",
                             "mems",    "maps",       "names",        "inert",
                             "pending", "sources",    "busy_poll_us", "adopt",
                             "retired", "serving", NULL};
    int fd, busy_poll_us = 0;
    Py_ssize_t notif_size, resp_size;
    PyObject *pidfds, *mems, *maps, *names, *inert, *pending, *sources, *adopt = Py_None;
    PyObject *retired = NULL, *serving = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "innO!O!O!O!O!O!O!|$iOO!O!", kwlist, &fd,
                                     &notif_size, &resp_size, &PyDict_Type, &pidfds,
                                     &PyDict_Type, &mems, &PyDict_Type, &maps, &PyDict_Type,
                                     &names, &PyDict_Type, &inert, &PyDict_Type, &pending,
                                     &PyDict_Type, &sources, &busy_poll_us, &adopt,
                                     &PyDict_Type, &retired, &PyDict_Type, &serving))
        return -1;
    if (adopt != Py_None && !PyCallable_Check(adopt)) {
        PyErr_SetString(PyExc_TypeError, "adopt must be callable or None");
        return -1;
    }
    if (busy_poll_us < 0 || busy_poll_us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "busy_poll_us must be 0 to 1000000");
        return -1;
    }
    if (self->notif_buf != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Fast is initialised once");
        return -1;
    }
    if (notif_size < (Py_ssize_t)sizeof(struct seccomp_notif) ||
        resp_size < (Py_ssize_t)sizeof(struct seccomp_notif_resp) || notif_size > 65536 ||
        resp_size > 65536) {
        PyErr_SetString(PyExc_ValueError, "seccomp structure sizes out of range");
        return -1;
    }
    self->notif_buf = PyMem_Calloc(1, (size_t)notif_size);
    self->resp_buf = PyMem_Calloc(1, (size_t)resp_size);
    if (self->notif_buf == NULL || self->resp_buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->fds = PyMem_Calloc(FIXED_FDS, sizeof *self->fds);
    if (self->fds == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->fds_cap = FIXED_FDS;
    self->nfd = fd;
    self->notif_size = (size_t)notif_size;
    self->resp_size = (size_t)resp_size;
    self->pidfds = Py_NewRef(pidfds);
    self->mems = Py_NewRef(mems);
    self->maps = Py_NewRef(maps);
    self->names = Py_NewRef(names);
    self->inert = Py_NewRef(inert);
    self->pending = Py_NewRef(pending);
    self->sources = Py_NewRef(sources);
    self->adopt = adopt == Py_None ? NULL : Py_NewRef(adopt);
    self->retired = Py_XNewRef(retired);
    self->serving = Py_XNewRef(serving);
    self->poll_budget = self->poll_window = self->follow_window = busy_poll_us * 1000LL;
    return 0;
}

static PyObject *Fast_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    Fast *self = (Fast *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->nfd = -1;
    }
    return (PyObject *)self;
}

static void Fast_dealloc(Fast *self) {
    if (self->parked != NULL) close_parked(self);
    PyMem_Free(self->parked);
    PyMem_Free(self->fds);
    Py_XDECREF(self->pidfds);
    Py_XDECREF(self->mems);
    Py_XDECREF(self->maps);
    Py_XDECREF(self->names);
    Py_XDECREF(self->inert);
    Py_XDECREF(self->pending);
    Py_XDECREF(self->sources);
    Py_XDECREF(self->adopt);
    Py_XDECREF(self->retired);
    Py_XDECREF(self->serving);
    Py_XDECREF(self->identity);
    Py_XDECREF(self->me);
    PyMem_Free(self->notif_buf);
    PyMem_Free(self->resp_buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Fast_counters(Fast *self, void *closure) {
    (void)closure;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsi}", "notifications", self->notifications,
                         "answered", self->answered, "redirected", self->redirected,
                         "deferred", self->deferred, "caught_polling", self->caught_polling,
                         "caught_following", self->caught_following, "missed_polling",
                         self->missed_polling, "missed_following", self->missed_following,
                         "adopted", self->adopted, "parked", self->parked_count);
}

static PyObject *Fast_parked(Fast *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->parked_count);
}

static PyMethodDef Fast_methods[] = {
    {"serve", (PyCFunction)(void (*)(void))Fast_serve, METH_FASTCALL,
     "serve(engine, wake_fd, waiters_fd, timeout_ms, parked_timeout_ms) -> int | hand-back\n\n"
     "Answer notifications and parked accepts until Python is needed: a hand-back\n"
     "(kind, fd, extra, id, pid, flags, nr, arch, ip, args), or TIMEOUT (after\n"
     "timeout_ms, or parked_timeout_ms once an accept is parked), WAKE, WAITERS\n"
     "(an fd of Python's own waits is ready) or HUP (no task left)."},
    {"drop_abandoned", (PyCFunction)Fast_drop_abandoned, METH_NOARGS,
     "Forget parked accepts whose thread went away; returns how many are left."},
    {"expire", (PyCFunction)Fast_expire, METH_NOARGS,
     "Answer EAGAIN to parked accepts past their SO_RCVTIMEO; returns how many."},
    {"parked_tids", (PyCFunction)Fast_parked_tids, METH_NOARGS,
     "The thread ids of the parked accepts."},
    {"interrupt", (PyCFunction)(void (*)(void))Fast_interrupt, METH_FASTCALL,
     "interrupt(tid, error) -> bool\n\n"
     "Answer the accept parked for thread tid with error (EINTR when its listener\n"
     "has SO_RCVTIMEO, as the kernel never restarts it) and forget it."},
    {"close", (PyCFunction)Fast_close, METH_NOARGS, "Forget every parked accept."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Fast_getset[] = {
    {"counters", (getter)Fast_counters, NULL, "what the native path did", NULL},
    {"parked", (getter)Fast_parked, NULL, "accepts waiting natively", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "axnet.intercept._fastpath.Fast",
    .tp_basicsize = sizeof(Fast),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The engine's hot path for one seccomp listener fd.",
    .tp_new = Fast_new,
    .tp_init = (initproc)Fast_init,
    .tp_dealloc = (destructor)Fast_dealloc,
    .tp_methods = Fast_methods,
    .tp_getset = Fast_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "axnet.intercept._fastpath",
    .m_doc = "The interception engine's hot path (see _fastpath.c).", .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&FastType) < 0) return NULL;
    s_table = PyUnicode_InternFromString("table");
    s_identity = PyUnicode_InternFromString("identity");
    s_live = PyUnicode_InternFromString("live_keys");
    s_real = PyUnicode_InternFromString("real_keys");
    s_blocks = PyUnicode_InternFromString("block_keys");
    s_packed_me = PyUnicode_InternFromString("_packed_me");
    s_retired = PyUnicode_InternFromString("retired_keys");
    s_retired_blocks = PyUnicode_InternFromString("retired_block_keys");
    if (!s_table || !s_identity || !s_live || !s_real || !s_blocks || !s_packed_me || !s_retired ||
        !s_retired_blocks)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    static const struct {
        const char *name;
        int value;
    } constants[] = {
        {"SLOW", SLOW},       {"DELIVER", DELIVER}, {"CONNECTING", CONNECTING},
        {"TIMEOUT", TIMEOUT}, {"WAKE", WAKE},       {"WAITERS", WAITERS},
        {"HUP", HUP},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "Fast", (PyObject *)&FastType) < 0) goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
