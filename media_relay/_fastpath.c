/* Native fast path of the media relay (spec §7): established flows leave Python.
 *
 * A Forwarder holds a hash table of flows keyed by (local port, source IPv4 address, source
 * port). A flow is one *ingress endpoint* of the Python RelayTable whose remote address is known
 * (fixed or latched) and whose peer has a route; it carries the egress socket and destination
 * for RTP and for RTCP, the endpoint's counters and its RFC 3550 A.1/A.8 receiver state, which
 * mirrors media_relay.rtp.StreamStats exactly (same integer arithmetic, same order).
 *
 * drain(fd, port) reads one socket with recvmmsg; poll() does the same for every registered
 * socket that an inner epoll set reports ready (its fd is what the asyncio loop watches, so the
 * relay stays loop-driven). Forwarder(uring=True) reads every socket through io_uring instead
 * (_uring.h: multishot RECVMSG into provided buffers, a turn's sends as one submission; the fd
 * the loop watches is then the ring's eventfd); its poll() returns the same items. Packets of installed flows that pass the checks of
 * RelayTable.receive_datagram are forwarded with sendmmsg, grouped per egress socket; every other
 * datagram (strangers, garbage, unknown ports, packets that would latch) is handed back to
 * Python, which counts it exactly as before. Python owns the flows: it installs and removes them
 * and collects counters and receiver state (flush(), remove(), last_seen()) into its own objects.
 *
 * A flow may carry a Transcoder (_srtp.c; C's SRTP B2BUA, built when libsrtp2 is found): its
 * packets are then unprotected/protected in the send slot before they are queued, as
 * RelayTable.receive_and_transcode does; a packet SRTP refuses is dropped and counted here
 * (transcode_drops, and auth_failures in the Transcoder itself).
 *
 * Hostile input never reaches anything but bounds-checked reads of a fixed-size buffer; a
 * datagram longer than BUF_BYTES is truncated to it, which is still "too big" (> 1500) for every
 * path. Send failures (EAGAIN, ENOBUFS, ...) are counted and the datagram dropped.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_srtp.h"
#include "_uring.h"
#include "_helper.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <string.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64                 /* datagrams per recvmmsg */
#define POOL 256                 /* forwarded datagrams wait here for sendmmsg */
#define SLOT_BYTES 2048          /* a pool slot: a datagram and libsrtp's trailer room */
#define BUF_BYTES 2048           /* > MAX_DATAGRAM: a truncated datagram still counts as too big */
#define MAX_DATAGRAM 1500        /* table.MAX_DATAGRAM_BYTES */
#define MIN_DATAGRAM 8           /* an RTCP header */
#define RTP_HEADER 12
#define RTCP_PT_MIN 192          /* RFC 5761 §4 */
#define RTCP_PT_MAX 223
#define MAX_EVENTS 256           /* ready sockets handled per poll() */
#define BATCHES_PER_FD 4         /* per socket per poll(): fairness between sockets */
#define MAX_CAPACITY ((size_t)1 << 24)
#define HB_MAX 256               /* hand-backs one run() turn keeps for Python (more: dropped) */
/* io_uring backend (Forwarder(uring=True)): see _uring.h */
#define UR_SQ 1024               /* >= POOL: a turn's sends fit in one submission */
#define UR_BUFS 1024             /* provided receive buffers (default; Forwarder(buffers=)) */
#define UR_BUF_BYTES (sizeof(struct io_uring_recvmsg_out) + sizeof(struct sockaddr_storage) + BUF_BYTES)
#define UR_FILES 65536           /* registered file table slots (fd numbers), capped by RLIMIT_NOFILE */
#define UR_ROUNDS 8              /* reap/submit rounds per poll(): then back to the event loop */
#define UD_RECV 0ULL             /* user_data: kind in bits 62-63, then gen 48-55, port 32-47, fd 0-31 */
#define UD_SEND 1ULL
#define UD_CANCEL 2ULL

/* RFC 3550 A.1 */
#define SEQ_MOD 65536
#define MAX_DROPOUT 3000
#define MAX_MISORDER 100
#define HALF32 ((int64_t)1 << 31)

typedef struct {
    int64_t packets, bytes;
    double last_seen;
    int has_last_seen, has_ssrc;
    uint32_t ssrc;
    int64_t received, base_seq, max_seq, cycles, bad_seq, transit, jitter16, clock_rate;
} Stats;

typedef struct {
    int fd; /* -1: no route; the datagram goes back to Python */
    struct sockaddr_in dst;
} Egress;

typedef struct {
    uint64_t key; /* 0 = empty slot (a bound local port is never 0) */
    int is_rtcp_port, dirty;
    Egress out[2]; /* [0] RTP towards the peer's RTP endpoint, [1] RTCP */
    PyObject *xcoder; /* a _srtp Transcoder (C's SRTP B2BUA step; strong reference) or NULL */
    int64_t rx_packets, rx_bytes, tx_packets[2], tx_bytes[2], transcode_drops;
    double last_seen;
    Stats st;
} Flow;

typedef struct {
    int fd;
    const struct sockaddr_in *dst;
    uint32_t seq; /* arrival order: the sort by fd is stable */
    uint16_t slot;
    uint16_t len;
} Pending;

/* A datagram for the table, copied by a run() turn (no Python objects without the GIL). */
typedef struct {
    unsigned port;
    unsigned len;
    socklen_t sslen;
    struct sockaddr_storage ss;
    unsigned char data[BUF_BYTES];
} Handback;

typedef struct {
    PyObject_HEAD
    /* Every method and every run() turn holds mu (recursive: a method may re-enter through
     * Python code, which `busy` then refuses), so a thread serving the forwarder with run()
     * and the event loop's thread installing flows never meet mid-table. */
    pthread_mutex_t mu;
    int wakefd;   /* eventfd in the epoll set: interrupt() ends run() */
    int deferred; /* in a run() turn: hand-backs are copied to hb, not built as Python objects */
    int serving;  /* run() is active */
    Handback *hb;
    int nhb;
    Flow *slots;
    size_t cap, count;
    int epfd;
    int busy;           /* inside drain()/poll(): the table must not change */
    int sockets;        /* registered with the epoll set */
    unsigned char *rbuf;  /* BATCH receive buffers of BUF_BYTES (set up once: see init) */
    unsigned char *pool;  /* POOL send slots of SLOT_BYTES */
    int npend;
    Pending pend[POOL];
    struct mmsghdr rmsg[BATCH];
    struct iovec riov[BATCH];
    struct sockaddr_storage src[BATCH];
    struct mmsghdr smsg[POOL];
    struct iovec siov[POOL];
    struct epoll_event events[MAX_EVENTS];
    unsigned long long forwarded, to_python, send_errors, recv_errors, recv_calls, send_calls;
    unsigned long long transcoded, transcode_drops, handback_drops;
    /* io_uring backend: every socket has a multishot RECVMSG armed; user_data carries its fd's
     * generation, so a completion of a removed socket (or of an old socket with a reused fd
     * number) is recognised and dropped */
    int uring;
    int evfd; /* the ring's eventfd: what the event loop watches instead of epfd */
    URing ur;
    unsigned char *gen;
    uint16_t *armed_port; /* per fd (as gen): the port its receive was armed with */
    size_t ngen;
    unsigned char *fixed; /* fixed[fd]: the socket is in the ring's file table (slot fd) */
    unsigned long long nfixed;
    Helper helper;     /* the send helper (_helper.h); mode HELPER_OFF without one */
    unsigned turn_rx;  /* datagrams received in this poll() turn */
    struct msghdr rtmpl; /* the multishot RECVMSG template: room for any source address */
    unsigned long long uring_enters, uring_rearms;
} Forwarder;

/* -- flow table: open addressing, linear probing, backward-shift deletion ------------------- */

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t make_key(unsigned port, uint32_t ip_host_order, unsigned src_port)
{
    return ((uint64_t)port << 48) | ((uint64_t)ip_host_order << 16) | (uint64_t)src_port;
}

static Flow *flow_find(Forwarder *self, uint64_t key)
{
    size_t mask = self->cap - 1, i = (size_t)mix64(key) & mask;
    for (;;) {
        Flow *f = &self->slots[i];
        if (f->key == key)
            return f;
        if (f->key == 0)
            return NULL;
        i = (i + 1) & mask;
    }
}

static Flow *slot_for(Flow *slots, size_t cap, uint64_t key)
{
    size_t mask = cap - 1, i = (size_t)mix64(key) & mask;
    while (slots[i].key != 0)
        i = (i + 1) & mask;
    return &slots[i];
}

/* Make room for one more flow (load factor <= 1/2, so a probe always meets an empty slot). */
static int flow_reserve(Forwarder *self)
{
    if ((self->count + 1) * 2 <= self->cap)
        return 0;
    if (self->cap >= MAX_CAPACITY) {
        PyErr_SetString(PyExc_OverflowError, "too many flows");
        return -1;
    }
    size_t ncap = self->cap * 2;
    Flow *ns = PyMem_Calloc(ncap, sizeof(Flow));
    if (ns == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < self->cap; i++)
        if (self->slots[i].key != 0)
            *slot_for(ns, ncap, self->slots[i].key) = self->slots[i];
    PyMem_Free(self->slots);
    self->slots = ns;
    self->cap = ncap;
    return 0;
}

static void flow_delete(Forwarder *self, Flow *f)
{
    PyObject *xcoder = f->xcoder; /* released last: its dealloc must not see a half-moved table */
    f->xcoder = NULL;
    size_t mask = self->cap - 1, i = (size_t)(f - self->slots), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (self->slots[j].key == 0)
            break;
        size_t k = (size_t)mix64(self->slots[j].key) & mask; /* home slot of the entry at j */
        int stays = (i < j) ? (i < k && k <= j) : (k > i || k <= j);
        if (!stays) {
            self->slots[i] = self->slots[j];
            i = j;
        }
    }
    memset(&self->slots[i], 0, sizeof(Flow));
    self->count--;
    Py_XDECREF(xcoder);
}

/* -- RFC 3550 A.1 / A.8, exactly as media_relay.rtp.StreamStats.update ------------------------ */

static inline int64_t floor_div16(int64_t x)
{
    return x >= 0 ? x / 16 : -((-x + 15) / 16);
}

static void init_seq(Stats *s, int64_t seq)
{
    s->base_seq = seq;
    s->max_seq = seq;
    s->bad_seq = SEQ_MOD + 1;
    s->cycles = 0;
    s->received = 1;
}

static void stats_update(Stats *s, const unsigned char *d, size_t n, double now)
{
    int64_t seq = ((int64_t)d[2] << 8) | d[3];
    uint32_t ts = ((uint32_t)d[4] << 24) | ((uint32_t)d[5] << 16) | ((uint32_t)d[6] << 8) | d[7];
    uint32_t ssrc = ((uint32_t)d[8] << 24) | ((uint32_t)d[9] << 16) | ((uint32_t)d[10] << 8) | d[11];
    s->packets++;
    s->bytes += (int64_t)n;
    s->last_seen = now;
    s->has_last_seen = 1;
    /* Python: int(now * clock_rate) - ts; the product is far below 2**63 (install() bounds
     * clock_rate, now is a monotonic clock in seconds). */
    int64_t transit = (int64_t)(now * (double)s->clock_rate) - (int64_t)ts;
    if (!s->has_ssrc || ssrc != s->ssrc) {
        s->has_ssrc = 1;
        s->ssrc = ssrc;
        init_seq(s, seq);
        s->transit = transit;
        s->jitter16 = 0;
        return;
    }
    int64_t max_seq = s->max_seq;
    int64_t udelta = (seq - max_seq) & 0xFFFF;
    if (udelta < MAX_DROPOUT) {
        if (seq < max_seq)
            s->cycles += SEQ_MOD;
        s->max_seq = seq;
        s->received++;
    } else if (udelta <= SEQ_MOD - MAX_MISORDER) {
        if (seq == s->bad_seq) {
            init_seq(s, seq);
        } else {
            s->bad_seq = (seq + 1) & 0xFFFF;
            return;
        }
    } else {
        s->received++;
    }
    int64_t d32 = (int64_t)((uint64_t)(transit - s->transit + HALF32) & 0xFFFFFFFFULL) - HALF32;
    s->transit = transit;
    if (d32 < 0)
        d32 = -d32;
    s->jitter16 += d32 - floor_div16(s->jitter16 + 8);
}

static PyObject *stats_state(const Stats *s)
{
    PyObject *last = s->has_last_seen ? PyFloat_FromDouble(s->last_seen) : Py_NewRef(Py_None);
    PyObject *ssrc = s->has_ssrc ? PyLong_FromUnsignedLong(s->ssrc) : Py_NewRef(Py_None);
    PyObject *state = NULL;
    if (last != NULL && ssrc != NULL)
        state = Py_BuildValue("(LLOOLLLLLLL)", (long long)s->packets, (long long)s->bytes, last, ssrc,
                              (long long)s->received, (long long)s->base_seq, (long long)s->max_seq,
                              (long long)s->cycles, (long long)s->bad_seq, (long long)s->transit,
                              (long long)s->jitter16);
    Py_XDECREF(last);
    Py_XDECREF(ssrc);
    return state;
}

static int parse_state(PyObject *state, Stats *s)
{
    long long packets, bytes, received, base_seq, max_seq, cycles, bad_seq, transit, jitter16;
    PyObject *last, *ssrc;
    if (!PyTuple_Check(state)) {
        PyErr_SetString(PyExc_TypeError, "state must be a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(state, "LLOOLLLLLLL;state: 11 fields of StreamStats.get_state()", &packets,
                          &bytes, &last, &ssrc, &received, &base_seq, &max_seq, &cycles, &bad_seq,
                          &transit, &jitter16))
        return -1;
    /* Bounds that keep the int64 arithmetic of stats_update exact (Python's ints are unbounded). */
    const long long lim = (long long)1 << 60;
    long long vals[] = {packets, bytes, received, base_seq, max_seq, cycles, bad_seq, transit, jitter16};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++)
        if (vals[i] > lim || vals[i] < -lim) {
            PyErr_SetString(PyExc_OverflowError, "state value out of range");
            return -1;
        }
    s->packets = packets;
    s->bytes = bytes;
    if (last == Py_None) {
        s->has_last_seen = 0;
        s->last_seen = 0.0;
    } else {
        double v = PyFloat_AsDouble(last);
        if (v == -1.0 && PyErr_Occurred())
            return -1;
        s->has_last_seen = 1;
        s->last_seen = v;
    }
    if (ssrc == Py_None) {
        s->has_ssrc = 0;
        s->ssrc = 0;
    } else {
        unsigned long v = PyLong_AsUnsignedLong(ssrc);
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        if (v > 0xFFFFFFFFUL) {
            PyErr_SetString(PyExc_OverflowError, "ssrc out of range");
            return -1;
        }
        s->has_ssrc = 1;
        s->ssrc = (uint32_t)v;
    }
    s->received = received;
    s->base_seq = base_seq;
    s->max_seq = max_seq;
    s->cycles = cycles;
    s->bad_seq = bad_seq;
    s->transit = transit;
    s->jitter16 = jitter16;
    return 0;
}

/* -- helpers ---------------------------------------------------------------------------------- */

static int check_idle(Forwarder *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder is draining");
        return -1;
    }
    if (self->slots == NULL) {
        PyErr_SetString(PyExc_ValueError, "Forwarder is closed");
        return -1;
    }
    return 0;
}

static int parse_ipv4(const char *host, struct in_addr *out)
{
    if (inet_pton(AF_INET, host, out) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", host);
        return -1;
    }
    return 0;
}

/* dst is None (no route) or (host, port) */
static int parse_egress(int fd, PyObject *dst, Egress *e)
{
    memset(e, 0, sizeof(*e));
    e->fd = -1;
    if (dst == Py_None)
        return 0;
    const char *host;
    int port;
    if (!PyArg_ParseTuple(dst, "si;destination: (host, port)", &host, &port))
        return -1;
    if (port < 1 || port > 65535 || fd < 0) {
        PyErr_SetString(PyExc_ValueError, "bad egress fd or port");
        return -1;
    }
    e->dst.sin_family = AF_INET;
    e->dst.sin_port = htons((uint16_t)port);
    if (parse_ipv4(host, &e->dst.sin_addr) < 0)
        return -1;
    e->fd = fd;
    return 0;
}

static long long monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double monotonic_now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0.0; /* cannot fail for CLOCK_MONOTONIC on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *flush_item(Flow *f)
{
    PyObject *state = stats_state(&f->st);
    if (state == NULL)
        return NULL;
    PyObject *item = Py_BuildValue("(KLLLLLLdOL)", (unsigned long long)f->key, (long long)f->rx_packets,
                                   (long long)f->rx_bytes, (long long)f->tx_packets[0],
                                   (long long)f->tx_bytes[0], (long long)f->tx_packets[1],
                                   (long long)f->tx_bytes[1], f->last_seen, state,
                                   (long long)f->transcode_drops);
    Py_DECREF(state);
    if (item == NULL)
        return NULL;
    f->rx_packets = f->rx_bytes = 0;
    f->tx_packets[0] = f->tx_packets[1] = f->tx_bytes[0] = f->tx_bytes[1] = 0;
    f->transcode_drops = 0;
    f->dirty = 0;
    return item;
}

static PyObject *format_addr(const struct sockaddr_storage *ss, socklen_t len)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(sin->sin_port));
    }
    if (ss->ss_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host)) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(sin6->sin6_port));
    }
    PyErr_SetString(PyExc_ValueError, "datagram without an IP source address");
    return NULL;
}

/* -- the datagram path ---------------------------------------------------------------------- */

static int cmp_pending(const void *a, const void *b)
{
    const Pending *x = a, *y = b;
    if (x->fd != y->fd)
        return x->fd < y->fd ? -1 : 1;
    return x->seq < y->seq ? -1 : (x->seq > y->seq);
}

/* -- io_uring backend ----------------------------------------------------------------------- */

/* Completion ring entries: more than the receive buffers plus a full submission ring can
 * complete in one enter (it does not overflow), and small enough to stay in cache (each CQE
 * written lands on the next line of the ring). */
static unsigned ur_cq_size(unsigned buffers)
{
    unsigned want = 4 * (buffers > UR_SQ ? buffers : UR_SQ);
    return want < 4096 ? 4096 : want > 65536 ? 65536 : want;
}

/* Submit the handed-out SQEs and run the ring's deferred work (receives that completed since). */
static void uring_enter(Forwarder *self)
{
    self->uring_enters++;
    if (ur_enter(&self->ur) < 0)
        self->recv_errors++; /* EBUSY/ENOMEM: the SQEs stay queued for the next enter */
}

static struct io_uring_sqe *uring_sqe(Forwarder *self)
{
    struct io_uring_sqe *sqe = ur_sqe(&self->ur);
    if (sqe == NULL) { /* full: submit what is there (never with UR_SQ >= POOL + a few arms) */
        uring_enter(self);
        sqe = ur_sqe(&self->ur);
    }
    return sqe;
}

/* The registered file table: one slot per fd number below RLIMIT_NOFILE (at most UR_FILES).
 * Without one (an older kernel, no memory) requests name plain fds, as before. */
static void uring_files_open(Forwarder *self)
{
    struct rlimit rl;
    unsigned n = UR_FILES;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < n)
        n = (unsigned)rl.rlim_cur;
    self->fixed = PyMem_Calloc(n, 1);
    if (self->fixed == NULL || ur_files_open(&self->ur, n) != 0) {
        PyMem_Free(self->fixed);
        self->fixed = NULL;
        self->ur.nfiles = 0;
    }
}

/* Point sqe at fd: its slot in the registered file table when it has one. */
static inline void uring_set_fd(Forwarder *self, struct io_uring_sqe *sqe, int fd)
{
    sqe->fd = fd;
    if ((unsigned)fd < self->ur.nfiles && self->fixed[fd])
        sqe->flags |= IOSQE_FIXED_FILE;
}

/* Arm a multishot RECVMSG on fd (provided buffers of group 0); 0, or -1 if the ring is full. */
static int uring_arm(Forwarder *self, int fd, unsigned port)
{
    struct io_uring_sqe *sqe = uring_sqe(self);
    if (sqe == NULL)
        return -1;
    sqe->opcode = IORING_OP_RECVMSG;
    sqe->addr = (uint64_t)(uintptr_t)&self->rtmpl;
    sqe->len = 1;
    sqe->ioprio = IORING_RECV_MULTISHOT;
    sqe->flags = IOSQE_BUFFER_SELECT;
    uring_set_fd(self, sqe, fd);
    sqe->buf_group = 0;
    sqe->user_data = (UD_RECV << 62) | ((uint64_t)self->gen[fd] << 48) | ((uint64_t)port << 32) | (uint32_t)fd;
    return 0;
}

/* Every waiting datagram as one SEND SQE with its destination (sendto; Linux 6.0+), all
 * submitted by one io_uring_enter. MSG_DONTWAIT makes a full socket fail the send at once
 * (counted from its CQE) instead of parking it, so every send has run, and its pool slot and
 * destination are free again, when the enter returns. */
static void uring_flush(Forwarder *self)
{
    int n = self->npend, pushed = 0, sends = 0;
    for (int i = 0; i < n; i++) {
        Pending *p = &self->pend[i];
        if (helper_takes(&self->helper, p->fd, p->dst)) {
            if (helper_push(&self->helper, p->fd, p->dst, self->pool + (size_t)p->slot * SLOT_BYTES, p->len) == 0)
                pushed = 1;
            continue;
        }
        struct io_uring_sqe *sqe = uring_sqe(self);
        if (sqe == NULL) {
            self->send_errors += (unsigned long long)(n - i);
            break;
        }
        sqe->opcode = IORING_OP_SEND;
        sqe->addr = (uint64_t)(uintptr_t)(self->pool + (size_t)p->slot * SLOT_BYTES);
        sqe->len = p->len;
        sqe->addr2 = (uint64_t)(uintptr_t)p->dst;
        sqe->addr_len = (uint16_t)sizeof(struct sockaddr_in);
        sqe->msg_flags = MSG_DONTWAIT;
        sqe->flags = IOSQE_CQE_SKIP_SUCCESS;
        uring_set_fd(self, sqe, p->fd);
        sqe->user_data = UD_SEND << 62;
        sends++;
    }
    if (sends > 0)
        self->send_calls++;
    if (pushed)
        helper_wake(&self->helper);
    uring_enter(self);
    /* An enter that failed (EBUSY, ENOMEM) left SQEs queued, the sends last: take those back
     * and count them dropped, since their pool slots serve the next turn (a send queued until
     * the next enter would carry another datagram's bytes). Re-arms before them stay queued. */
    unsigned left = ur_unsubmitted(&self->ur);
    if (left > 0 && sends > 0) {
        unsigned drop = left < (unsigned)sends ? left : (unsigned)sends;
        self->ur.sq_local -= drop;
        __atomic_store_n(self->ur.sq_tail, self->ur.sq_local, __ATOMIC_RELEASE);
        self->send_errors += drop;
    }
    self->npend = 0;
}

/* sendmmsg every waiting datagram, one call per run of the same egress socket. */
static void flush_sends(Forwarder *self)
{
    int n = self->npend;
    if (n == 0)
        return;
    if (self->uring) {
        uring_flush(self);
        return;
    }
    int sorted = 1;
    for (int i = 1; i < n && sorted; i++)
        sorted = self->pend[i - 1].fd <= self->pend[i].fd;
    if (!sorted)
        qsort(self->pend, (size_t)n, sizeof(Pending), cmp_pending);
    for (int i = 0; i < n; i++) {
        Pending *p = &self->pend[i];
        self->siov[i].iov_base = self->pool + (size_t)p->slot * SLOT_BYTES;
        self->siov[i].iov_len = p->len;
        memset(&self->smsg[i], 0, sizeof(struct mmsghdr));
        self->smsg[i].msg_hdr.msg_name = (void *)p->dst;
        self->smsg[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        self->smsg[i].msg_hdr.msg_iov = &self->siov[i];
        self->smsg[i].msg_hdr.msg_iovlen = 1;
    }
    int run = 0;
    while (run < n) {
        int fd = self->pend[run].fd, end = run;
        while (end < n && self->pend[end].fd == fd)
            end++;
        int i = run;
        while (i < end) {
            self->send_calls++;
            int r = sendmmsg(fd, &self->smsg[i], (unsigned)(end - i), MSG_DONTWAIT);
            if (r > 0) {
                i += r;
            } else if (r < 0 && errno == EINTR) {
                continue;
            } else {
                self->send_errors++; /* EAGAIN, ENOBUFS, EPERM ...: drop this datagram */
                i++;
            }
        }
        run = end;
    }
    self->npend = 0;
}

/* Forward (queue) one datagram of an installed flow: 1 queued, 2 dropped here (SRTP refused it:
 * counted as the table's transcode drop), 0 when Python must see it instead. Everything handed
 * back is handed back before any cryptography, so Python's RelayTable.receive_and_transcode does
 * exactly what it would have done (with the same libsrtp sessions, see _srtp.c). */
static inline int forward(Forwarder *self, Flow *f, const unsigned char *d, size_t n, double now)
{
    if (n < MIN_DATAGRAM || n > MAX_DATAGRAM || (d[0] & 0xC0) != 0x80)
        return 0; /* garbage: counted by the table */
    int rtcp = f->is_rtcp_port || (d[1] >= RTCP_PT_MIN && d[1] <= RTCP_PT_MAX);
    if (!rtcp && n < RTP_HEADER)
        return 0;
    Egress *e = &f->out[rtcp];
    if (e->fd < 0)
        return 0; /* no route for this kind (RTCP on a muxed port): the table counts the drop */
    if (self->npend == POOL)
        flush_sends(self);
    unsigned slot = (unsigned)self->npend;
    unsigned char *buf = self->pool + (size_t)slot * SLOT_BYTES;
    memcpy(buf, d, n);
    int len = (int)n;
    if (f->xcoder != NULL) {
        /* RelayTable.receive_and_transcode: SRTP first (a refused packet counts nothing else),
         * then the table's accounting of the *ingress* packet (sizes, RFC 3550 state). */
        int auth;
        if (fp_transcode(f->xcoder, rtcp, buf, &len, &auth) != 0) {
            f->transcode_drops++;
            f->dirty = 1;
            self->transcode_drops++;
            return 2;
        }
        self->transcoded++;
    }
    if (!rtcp)
        stats_update(&f->st, d, n, now);
    f->last_seen = now;
    f->rx_packets++;
    f->rx_bytes += (int64_t)n;
    f->tx_packets[rtcp]++;
    f->tx_bytes[rtcp] += (int64_t)n;
    f->dirty = 1;
    self->npend++;
    Pending *p = &self->pend[slot];
    p->fd = e->fd;
    p->dst = &e->dst;
    p->seq = slot;
    p->slot = (uint16_t)slot;
    p->len = (uint16_t)len;
    return 1;
}

/* Append a datagram for the Python path: (bytes, addr) or (port, bytes, addr). */
static int hand_back(PyObject *out, int with_port, unsigned port, const unsigned char *d, size_t n,
                     const struct sockaddr_storage *ss, socklen_t sslen)
{
    PyObject *data = PyBytes_FromStringAndSize((const char *)d, (Py_ssize_t)n);
    if (data == NULL)
        return -1;
    PyObject *addr = format_addr(ss, sslen);
    if (addr == NULL) {
        Py_DECREF(data);
        return -1;
    }
    PyObject *item;
    if (with_port) {
        PyObject *p = PyLong_FromUnsignedLong(port);
        item = p == NULL ? NULL : PyTuple_Pack(3, p, data, addr);
        Py_XDECREF(p);
    } else {
        item = PyTuple_Pack(2, data, addr);
    }
    Py_DECREF(data);
    Py_DECREF(addr);
    if (item == NULL)
        return -1;
    int r = PyList_Append(out, item);
    Py_DECREF(item);
    return r;
}

/* One received datagram (d, n from sockaddr ss): forward it natively, or keep it for Python (a
 * hand-back item in ``out``, or a copy in hb during a run() turn). -1 with a Python error set. */
static int take_datagram(Forwarder *self, unsigned port, const unsigned char *d, size_t n,
                         const struct sockaddr_storage *ss, socklen_t sslen, double now, PyObject *out, int with_port)
{
    if (ss->ss_family == AF_INET && sslen >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        Flow *f = flow_find(self, make_key(port, ntohl(sin->sin_addr.s_addr), ntohs(sin->sin_port)));
        int done = f == NULL ? 0 : forward(self, f, d, n, now);
        if (done == 1)
            self->forwarded++;
        if (done != 0)
            return 0;
    }
    if (!(ss->ss_family == AF_INET && sslen >= (socklen_t)sizeof(struct sockaddr_in)) &&
        !(ss->ss_family == AF_INET6 && sslen >= (socklen_t)sizeof(struct sockaddr_in6))) {
        self->recv_errors++; /* no source address: nothing the table could account it to */
        return 0;
    }
    self->to_python++;
    if (self->deferred) {
        if (self->nhb == HB_MAX) {
            self->handback_drops++; /* Python is far behind: the table never sees it */
            return 0;
        }
        Handback *h = &self->hb[self->nhb++];
        h->port = port;
        h->len = (unsigned)n;
        h->sslen = sslen;
        memcpy(&h->ss, ss, sslen < (socklen_t)sizeof(*ss) ? sslen : sizeof(*ss));
        memcpy(h->data, d, n);
        return 0;
    }
    return hand_back(out, with_port, port, d, n, ss, sslen);
}

/* Read up to max_batches recvmmsg batches from one socket: 1 when the budget ran out before the
 * socket was empty, 0 when it was emptied (or failed), -1 with a Python error set. */
static int drain_fd(Forwarder *self, int fd, unsigned port, int max_batches, int have_now,
                    double fixed_now, PyObject *out, int with_port)
{
    for (int b = 0; b < max_batches; b++) {
        int r;
        do {
            self->recv_calls++;
            r = recvmmsg(fd, self->rmsg, BATCH, MSG_DONTWAIT, NULL);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                self->recv_errors++;
            return 0;
        }
        double now = have_now ? fixed_now : monotonic_now();
        for (int i = 0; i < r; i++) {
            const unsigned char *d = self->rbuf + (size_t)i * BUF_BYTES;
            size_t n = self->rmsg[i].msg_len;
            if (n > BUF_BYTES)
                n = BUF_BYTES;
            socklen_t sslen = self->rmsg[i].msg_hdr.msg_namelen;
            self->rmsg[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage); /* for the next call */
            if (take_datagram(self, port, d, n, &self->src[i], sslen, now, out, with_port) < 0)
                return -1;
        }
        if (r < BATCH)
            return 0; /* the socket is empty: spare the EAGAIN round trip */
    }
    return 1;
}

/* The completions in the CQ ring: received datagrams go through take_datagram (their buffer
 * straight back to the kernel), failed sends are counted, ended receives re-armed; *failed
 * after a Python error (the rest are only recycled). */
static void uring_reap(Forwarder *self, int have_now, double fixed_now, PyObject *out, int *failed)
{
    URing *r = &self->ur;
    unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    double now = have_now ? fixed_now : monotonic_now();
    for (; head != tail; head++) {
        const struct io_uring_cqe *c = &r->cqes[head & r->cq_mask];
        uint64_t ud = c->user_data;
        int res = c->res;
        unsigned flags = c->flags;
        uint64_t kind = ud >> 62;
        if (kind == UD_SEND) {
            if (res < 0)
                self->send_errors++; /* EAGAIN, ENOBUFS, EPERM ...: that datagram is dropped */
            continue;
        }
        if (kind != UD_RECV)
            continue; /* a cancel's failure: the socket was gone already */
        int fd = (int)(uint32_t)ud;
        unsigned port = (unsigned)((ud >> 32) & 0xFFFF);
        int current = (size_t)fd < self->ngen && self->gen[fd] == (unsigned char)(ud >> 48);
        if (flags & IORING_CQE_F_BUFFER) {
            unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
            if (res >= 0 && current && !*failed && bid < r->br_entries) {
                const unsigned char *buf = r->bufs + (size_t)bid * r->buf_bytes;
                const struct io_uring_recvmsg_out *o = (const struct io_uring_recvmsg_out *)buf;
                const unsigned char *name = buf + sizeof(*o);
                const unsigned char *d = name + sizeof(struct sockaddr_storage);
                size_t n = o->payloadlen < BUF_BYTES ? o->payloadlen : BUF_BYTES; /* longer: truncated */
                socklen_t sslen = o->namelen < sizeof(struct sockaddr_storage) ? o->namelen
                                                                                : (socklen_t)sizeof(struct sockaddr_storage);
                self->turn_rx++;
                if (take_datagram(self, port, d, n, (const struct sockaddr_storage *)name, sslen, now, out, 1) < 0)
                    *failed = 1;
            }
            if (bid < r->br_entries)
                ur_buf_recycle(r, bid);
        } else if (res < 0 && res != -ENOBUFS && res != -ECANCELED) {
            self->recv_errors++;
        }
        /* A multishot receive ends on -ENOBUFS (every buffer was in use) and on errors: re-arm a
         * current socket unless it is gone for good. */
        if (!(flags & IORING_CQE_F_MORE) && current && res != -ECANCELED && res != -EBADF && res != -ENOTSOCK &&
            res != -EINVAL) {
            self->uring_rearms++;
            if (uring_arm(self, fd, port) != 0)
                self->recv_errors++;
        }
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
}

/* One poll() of the io_uring backend: an io_uring_enter runs the deferred receives (a bounded
 * number per enter), their datagrams are forwarded or handed back, and the enter that submits
 * the sends runs the receives completed meanwhile; rounds go on while those bring completions,
 * up to UR_ROUNDS. The eventfd stays signalled while work waits (the loop comes back at once)
 * and is read only when none does, then checked again against a receive queued meanwhile. */
static int uring_turn(Forwarder *self, int have_now, double now, PyObject *out)
{
    int failed = 0;
    self->turn_rx = 0;
    long long entry_ns = self->helper.mode == HELPER_ELASTIC ? monotonic_ns() : 0;
    uring_enter(self);
    for (int round = 0; round < UR_ROUNDS; round++) {
        self->recv_calls++;
        uring_reap(self, have_now, now, out, &failed);
        helper_note(&self->helper, self->turn_rx); /* a backlog: this round's sends share already */
        if (self->npend > 0 || ur_unsubmitted(&self->ur) > 0)
            uring_flush(self); /* one enter: the sends, any re-arms, and more receives */
        if (ur_cq_ready(&self->ur) == 0)
            break;
    }
    if (entry_ns != 0)
        helper_account(&self->helper, entry_ns, monotonic_ns());
    if (ur_cq_ready(&self->ur) == 0 && !ur_work_pending(&self->ur)) {
        uint64_t count;
        if (read(self->evfd, &count, sizeof(count)) < 0 && errno != EAGAIN)
            self->recv_errors++;
        if (ur_cq_ready(&self->ur) > 0 || ur_work_pending(&self->ur)) {
            uint64_t one = 1;
            if (write(self->evfd, &one, sizeof(one)) < 0)
                self->recv_errors++;
        }
    }
    return failed ? -1 : 0;
}

static int parse_now(PyObject *now_obj, int *have_now, double *now)
{
    *have_now = 0;
    *now = 0.0;
    if (now_obj == NULL || now_obj == Py_None)
        return 0;
    *now = PyFloat_AsDouble(now_obj);
    if (*now == -1.0 && PyErr_Occurred())
        return -1;
    *have_now = 1;
    return 0;
}

/* -- methods -------------------------------------------------------------------------------- */

static PyObject *drain_locked(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "local_port", "now", "max_batches", NULL};
    int fd, port, max_batches = BATCHES_PER_FD;
    PyObject *now_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii|$Oi", kwlist, &fd, &port, &now_obj, &max_batches))
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    if (fd < 0 || port < 1 || port > 65535 || max_batches < 1 || max_batches > 1024) {
        PyErr_SetString(PyExc_ValueError, "bad fd, port or max_batches");
        return NULL;
    }
    int have_now;
    double now;
    if (parse_now(now_obj, &have_now, &now) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    self->busy = 1;
    int r = drain_fd(self, fd, (unsigned)port, max_batches, have_now, now, out, 0);
    flush_sends(self);
    r = r < 0 ? -1 : 0;
    self->busy = 0;
    if (r < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Sockets are edge-triggered (EPOLLET: a ready socket costs one readiness check, not two). One
 * whose queue outlasts its per-poll budget is re-armed with EPOLL_CTL_MOD, which puts it back
 * on the ready list at once, so the loop calls poll() again next turn and no socket starves. */
static int watch(Forwarder *self, int op, int fd, unsigned port)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = ((uint64_t)port << 32) | (uint32_t)fd;
    return epoll_ctl(self->epfd, op, fd, &ev);
}

/* Drain the sockets of n ready events and send what was forwarded. The wake eventfd (port 0)
 * is read and reported: returns 1 if it was among them, 0 otherwise, -1 after a Python error
 * (no memory for the hand-back list: the remaining sockets are only re-armed, their datagrams
 * wait for the next turn). */
static int process_ready(Forwarder *self, const struct epoll_event *events, int n, int have_now, double now,
                         PyObject *out)
{
    int failed = 0, woken = 0;
    for (int i = 0; i < n; i++) {
        uint64_t data = events[i].data.u64;
        int fd = (int)(uint32_t)data;
        unsigned port = (unsigned)(data >> 32);
        if (port == 0) {
            uint64_t count;
            if (read(fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
                self->recv_errors++;
            woken = 1;
            continue;
        }
        int r = failed ? 1 : drain_fd(self, fd, port, BATCHES_PER_FD, have_now, now, out, 1);
        if (r != 0 && watch(self, EPOLL_CTL_MOD, fd, port) != 0)
            self->recv_errors++;
        if (r < 0)
            failed = 1;
    }
    flush_sends(self);
    return failed ? -1 : woken;
}

static PyObject *poll_locked(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"now", NULL};
    PyObject *now_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$O", kwlist, &now_obj))
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    if (self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder is served by run()");
        return NULL;
    }
    int have_now;
    double now;
    if (parse_now(now_obj, &have_now, &now) < 0)
        return NULL;
    if (self->uring) {
        PyObject *items = PyList_New(0);
        if (items == NULL)
            return NULL;
        self->busy = 1;
        int ur = uring_turn(self, have_now, now, items);
        self->busy = 0;
        if (ur < 0) {
            Py_DECREF(items);
            return NULL;
        }
        return items;
    }
    int n;
    do {
        n = epoll_wait(self->epfd, self->events, MAX_EVENTS, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    self->busy = 1;
    int r = process_ready(self, self->events, n, have_now, now, out);
    self->busy = 0;
    if (r < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* The copied hand-backs of a run() turn as poll() returns them; empties hb. */
static PyObject *take_handbacks(Forwarder *self)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < self->nhb; i++) {
        Handback *h = &self->hb[i];
        if (hand_back(out, 1, h->port, h->data, h->len, &h->ss, h->sslen) < 0) {
            Py_DECREF(out);
            out = NULL;
            break;
        }
    }
    self->nhb = 0;
    return out;
}

static void fwd_lock(Forwarder *self);

/* run(callback, tick_ms=50): serve this forwarder from the calling thread until interrupt():
 * wait on its epoll set and forward without the GIL (other threads, the event loop's among
 * them, run meanwhile); take the GIL only to call callback(list) with what the table must see,
 * as poll() returns it, after a turn that has some, and at least every tick_ms (an empty list),
 * so that the caller can keep the flows in step. */
static PyObject *Forwarder_run(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"callback", "tick_ms", NULL};
    PyObject *callback;
    int tick_ms = 50;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|i", kwlist, &callback, &tick_ms))
        return NULL;
    if (!PyCallable_Check(callback) || tick_ms < 1 || tick_ms > 60000) {
        PyErr_SetString(PyExc_ValueError, "run(callback, tick_ms): a callable and 1..60000 ms");
        return NULL;
    }
    fwd_lock(self);
    int ok = check_idle(self) == 0;
    if (ok && self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder is already served by run()");
        ok = 0;
    }
    if (ok && self->uring) {
        PyErr_SetString(PyExc_RuntimeError, "an io_uring Forwarder is served by poll() on its own thread");
        ok = 0;
    }
    if (ok && self->hb == NULL) {
        self->hb = PyMem_Malloc((size_t)HB_MAX * sizeof(Handback));
        if (self->hb == NULL) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    if (ok)
        self->serving = 1;
    pthread_mutex_unlock(&self->mu);
    if (!ok)
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    double tick_s = tick_ms / 1000.0, last_call = monotonic_now();
    int stop = 0, err = 0;
    while (!stop) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        do {
            n = epoll_wait(self->epfd, events, MAX_EVENTS, tick_ms);
        } while (n < 0 && errno == EINTR);
        err = n < 0 ? errno : 0;
        if (n > 0) {
            pthread_mutex_lock(&self->mu);
            self->busy = self->deferred = 1;
            stop = process_ready(self, events, n, 0, 0.0, NULL) == 1;
            self->busy = self->deferred = 0;
            pthread_mutex_unlock(&self->mu);
        }
        Py_END_ALLOW_THREADS
        if (err != 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        double t = monotonic_now();
        if (self->nhb > 0 || t - last_call >= tick_s) {
            last_call = t;
            PyObject *items = take_handbacks(self);
            if (items == NULL)
                break;
            PyObject *r = PyObject_CallOneArg(callback, items);
            Py_DECREF(items);
            if (r == NULL)
                break;
            Py_DECREF(r);
        }
    }
    fwd_lock(self);
    self->serving = 0;
    pthread_mutex_unlock(&self->mu);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* interrupt(): end run() (from any thread; the next run() starts afresh). */
static PyObject *Forwarder_interrupt(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t one = 1;
    if (self->wakefd >= 0 && write(self->wakefd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *add_socket_locked(Forwarder *self, PyObject *args)
{
    int fd, port;
    if (!PyArg_ParseTuple(args, "ii", &fd, &port))
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    if (fd < 0 || port < 1 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "bad fd or port");
        return NULL;
    }
    if (self->uring) {
        if ((size_t)fd >= self->ngen) {
            size_t want = (size_t)fd + 1 > self->ngen * 2 ? (size_t)fd + 1 : self->ngen * 2;
            unsigned char *g = PyMem_Realloc(self->gen, want);
            if (g == NULL)
                return PyErr_NoMemory();
            memset(g + self->ngen, 0, want - self->ngen);
            self->gen = g;
            uint16_t *ap = PyMem_Realloc(self->armed_port, want * sizeof(uint16_t));
            if (ap == NULL)
                return PyErr_NoMemory();
            memset(ap + self->ngen, 0, (want - self->ngen) * sizeof(uint16_t));
            self->armed_port = ap;
            self->ngen = want;
        }
        self->gen[fd]++; /* completions of an earlier socket with this fd number are stale now */
        self->armed_port[fd] = (uint16_t)port;
        /* Into the file table when it has room (else plain fd lookups, as before). */
        if ((unsigned)fd < self->ur.nfiles && !self->fixed[fd] && ur_file_set(&self->ur, (unsigned)fd, fd) == 0) {
            self->fixed[fd] = 1;
            self->nfixed++;
        }
        if (uring_arm(self, fd, (unsigned)port) != 0) {
            PyErr_SetString(PyExc_OSError, "io_uring submission ring full");
            return NULL;
        }
        uring_enter(self);
    } else if (watch(self, EPOLL_CTL_ADD, fd, (unsigned)port) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->sockets++;
    Py_RETURN_NONE;
}

/* Unregister a socket before it is closed; purge every flow that reads from its port or sends
 * through it (Python removes them first; this only guards against a reused fd number). */
static PyObject *remove_socket_locked(Forwarder *self, PyObject *args)
{
    int fd, port;
    if (!PyArg_ParseTuple(args, "ii", &fd, &port))
        return NULL;
    if (check_idle(self) < 0)
        return NULL;
    size_t purged = 0;
    for (;;) {
        Flow *victim = NULL;
        for (size_t i = 0; i < self->cap && victim == NULL; i++) {
            Flow *f = &self->slots[i];
            if (f->key != 0 && ((f->key >> 48) == (uint64_t)(unsigned)port || f->out[0].fd == fd || f->out[1].fd == fd))
                victim = f;
        }
        if (victim == NULL)
            break;
        flow_delete(self, victim);
        purged++;
    }
    if (self->uring) {
        /* Sends the helper still holds for it go first: the fd is the caller's to close next. */
        if (!helper_wait_empty(&self->helper, 1000000000LL))
            self->send_errors++;
        /* Cancel its receive now, before the caller closes it: the request holds the socket
         * (and its port) open until then. By the receive's user_data (the ring finds it in its
         * cancel hash at once) when add_socket armed it; by fd otherwise (that scans every
         * request: O(sockets) per removal). */
        struct io_uring_sqe *sqe = uring_sqe(self);
        if (sqe == NULL) {
            PyErr_SetString(PyExc_OSError, "io_uring submission ring full");
            return NULL;
        }
        int fixed = (unsigned)fd < self->ur.nfiles && self->fixed[fd];
        sqe->opcode = IORING_OP_ASYNC_CANCEL;
        if ((size_t)fd < self->ngen) {
            uint64_t armed = self->armed_port[fd];
            sqe->addr = (UD_RECV << 62) | ((uint64_t)self->gen[fd] << 48) | (armed << 32) | (uint32_t)fd;
            sqe->cancel_flags = IORING_ASYNC_CANCEL_ALL;
            self->gen[fd]++;
        } else {
            sqe->fd = fd;
            sqe->cancel_flags = IORING_ASYNC_CANCEL_FD | IORING_ASYNC_CANCEL_ALL | (fixed ? IORING_ASYNC_CANCEL_FD_FIXED : 0);
        }
        sqe->flags = IOSQE_CQE_SKIP_SUCCESS;
        sqe->user_data = UD_CANCEL << 62;
        uring_enter(self);
        /* Out of the file table too: the table's reference would keep the socket open. */
        if (fixed) {
            self->fixed[fd] = 0;
            self->nfixed--;
            if (ur_file_set(&self->ur, (unsigned)fd, -1) != 0)
                self->recv_errors++;
        }
    } else if (epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->sockets--;
    return PyLong_FromSize_t(purged);
}

static PyObject *install_locked(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"local_port", "src_host", "src_port", "is_rtcp_port", "rtp_fd", "rtp_dst",
                             "rtcp_fd", "rtcp_dst", "clock_rate", "state", "transcoder", NULL};
    int port, src_port, is_rtcp, rtp_fd, rtcp_fd;
    const char *src_host;
    PyObject *rtp_dst, *rtcp_dst, *state, *xcoder = Py_None;
    long long clock_rate;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "isipiOiOLO|O", kwlist, &port, &src_host, &src_port, &is_rtcp,
                                     &rtp_fd, &rtp_dst, &rtcp_fd, &rtcp_dst, &clock_rate,
                                     &state, &xcoder))
        return NULL;
    if (xcoder != Py_None && !fp_is_transcoder(xcoder)) {
        PyErr_SetString(PyExc_TypeError, "transcoder must be a _fastpath.Transcoder or None");
        return NULL;
    }
    if (check_idle(self) < 0)
        return NULL;
    if (port < 1 || port > 65535 || src_port < 1 || src_port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return NULL;
    }
    if (clock_rate < 1 || clock_rate > ((long long)1 << 32)) {
        PyErr_SetString(PyExc_ValueError, "clock_rate out of range");
        return NULL;
    }
    struct in_addr src;
    if (parse_ipv4(src_host, &src) < 0)
        return NULL;
    Flow tmp;
    memset(&tmp, 0, sizeof(tmp));
    if (parse_egress(rtp_fd, rtp_dst, &tmp.out[0]) < 0 || parse_egress(rtcp_fd, rtcp_dst, &tmp.out[1]) < 0)
        return NULL;
    if (parse_state(state, &tmp.st) < 0)
        return NULL;
    tmp.st.clock_rate = clock_rate;
    tmp.is_rtcp_port = is_rtcp;
    tmp.key = make_key((unsigned)port, ntohl(src.s_addr), (unsigned)src_port);
    if (flow_find(self, tmp.key) != NULL) {
        PyErr_SetString(PyExc_KeyError, "flow already installed");
        return NULL;
    }
    if (flow_reserve(self) < 0)
        return NULL;
    tmp.xcoder = xcoder == Py_None ? NULL : Py_NewRef(xcoder);
    *slot_for(self->slots, self->cap, tmp.key) = tmp;
    self->count++;
    return PyLong_FromUnsignedLongLong(tmp.key);
}

static int parse_key(PyObject *arg, uint64_t *key)
{
    unsigned long long k = PyLong_AsUnsignedLongLong(arg);
    if (k == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *key = k;
    return 0;
}

/* Remove a flow; return its last flush item (counters since the last flush, final state). */
static PyObject *remove_locked(Forwarder *self, PyObject *arg)
{
    uint64_t key;
    if (parse_key(arg, &key) < 0 || check_idle(self) < 0)
        return NULL;
    Flow *f = key == 0 ? NULL : flow_find(self, key);
    if (f == NULL)
        Py_RETURN_NONE;
    PyObject *item = flush_item(f);
    if (item == NULL)
        return NULL;
    flow_delete(self, f);
    return item;
}

/* When a flow last forwarded (0.0: never): the inactivity check asks only for streams it
 * would otherwise time out, instead of folding every flow back (media_relay/worker.py). */
static PyObject *last_seen_locked(Forwarder *self, PyObject *arg)
{
    uint64_t key;
    if (parse_key(arg, &key) < 0 || check_idle(self) < 0)
        return NULL;
    Flow *f = key == 0 ? NULL : flow_find(self, key);
    if (f == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such flow");
        return NULL;
    }
    return PyFloat_FromDouble(f->last_seen);
}

/* Every flow that forwarded since the last flush: counters (then zeroed) and receiver state. */
static PyObject *flush_locked(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    if (check_idle(self) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < self->cap; i++) {
        Flow *f = &self->slots[i];
        if (f->key == 0 || !f->dirty)
            continue;
        PyObject *item = flush_item(f);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *counters_locked(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    const Helper *h = &self->helper;
    unsigned long long helper_errors = __atomic_load_n(&h->errors, __ATOMIC_RELAXED);
    unsigned long long helper_sent = __atomic_load_n(&h->sent, __ATOMIC_RELAXED);
    PyObject *d = Py_BuildValue("{sKsKsKsKsKsKsKsKsnsisKsisKsKsK}", "forwarded", self->forwarded, "to_python", self->to_python,
                         "send_errors", self->send_errors + helper_errors + h->drops, "recv_errors", self->recv_errors, "recv_calls",
                         self->recv_calls, "send_calls", self->send_calls, "transcoded", self->transcoded,
                         "transcode_drops", self->transcode_drops, "flows", (Py_ssize_t)self->count,
                         "sockets", self->sockets, "handback_drops", self->handback_drops, "uring", self->uring,
                         "uring_enters", self->uring_enters, "uring_rearms", self->uring_rearms, "uring_files",
                         self->nfixed);
    if (d == NULL)
        return NULL;
    /* the send helper: mode, whether it takes sends now, how often it started to, and its
     * datagrams (queued, sent, dropped on a full queue; its failed sends are in send_errors) */
    PyObject *extra = Py_BuildValue("{sisisKsKsKsK}", "helper", h->mode, "helper_active", h->active,
                                    "helper_activations", h->activations, "helper_queued", h->queued, "helper_sent",
                                    helper_sent, "helper_drops", h->drops);
    if (extra == NULL || PyDict_Update(d, extra) < 0) {
        Py_XDECREF(extra);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(extra);
    return d;
}

/* helper_wait(timeout_s=1.0) -> bool: wait until the send helper has sent what it holds (tests,
 * and whoever must know a send left). True if it did (or there is no helper). */
static PyObject *Forwarder_helper_wait(Forwarder *self, PyObject *args)
{
    double timeout_s = 1.0;
    if (!PyArg_ParseTuple(args, "|d", &timeout_s))
        return NULL;
    if (timeout_s < 0 || timeout_s > 60) {
        PyErr_SetString(PyExc_ValueError, "timeout_s: 0..60");
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = helper_wait_empty(&self->helper, (long long)(timeout_s * 1e9));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

static PyObject *Forwarder_fileno(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "Forwarder is closed");
        return NULL;
    }
    return PyLong_FromLong(self->uring ? self->evfd : self->epfd);
}

static void forwarder_release(Forwarder *self)
{
    helper_stop(&self->helper); /* sends what it holds, then joins */
    if (self->epfd >= 0) {
        close(self->epfd);
        self->epfd = -1;
    }
    if (self->wakefd >= 0) {
        close(self->wakefd);
        self->wakefd = -1;
    }
    if (self->uring) {
        if (self->ur.nfiles > 0) /* the table's references go now, not with the ring's teardown */
            syscall(__NR_io_uring_register, self->ur.fd, IORING_UNREGISTER_FILES, NULL, 0);
        ur_close(&self->ur); /* cancels every receive: the sockets are the caller's to close */
        self->uring = 0;
    }
    if (self->evfd >= 0) {
        close(self->evfd);
        self->evfd = -1;
    }
    PyMem_Free(self->gen);
    self->gen = NULL;
    PyMem_Free(self->armed_port);
    self->armed_port = NULL;
    self->ngen = 0;
    PyMem_Free(self->fixed);
    self->fixed = NULL;
    self->nfixed = 0;
    PyMem_Free(self->hb);
    self->hb = NULL;
    self->nhb = 0;
    Flow *slots = self->slots;
    size_t cap = self->cap;
    self->slots = NULL;
    self->cap = self->count = 0;
    for (size_t i = 0; slots != NULL && i < cap; i++)
        Py_XDECREF(slots[i].xcoder);
    PyMem_Free(slots);
    PyMem_Free(self->pool);
    self->pool = NULL;
    PyMem_Free(self->rbuf);
    self->rbuf = NULL;
}

static PyObject *close_locked(Forwarder *self, PyObject *Py_UNUSED(ignored))
{
    if (self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder is served by run(): interrupt() and wait first");
        return NULL;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder is draining");
        return NULL;
    }
    forwarder_release(self);
    Py_RETURN_NONE;
}

static Py_ssize_t Forwarder_len(Forwarder *self)
{
    return (Py_ssize_t)self->count;
}

static int Forwarder_init(Forwarder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"uring", "buffers", "helper", "helper_share", NULL};
    int uring = 0, helper = HELPER_OFF;
    unsigned int buffers = UR_BUFS, share = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$pIiI", kwlist, &uring, &buffers, &helper, &share))
        return -1;
    if (helper < HELPER_OFF || helper > HELPER_ALWAYS || share < 1 || share > 4 || (helper != HELPER_OFF && !uring)) {
        PyErr_SetString(PyExc_ValueError, "helper: 0 (off), 1 (elastic), 2 (always; io_uring only); helper_share: 1..4");
        return -1;
    }
    if (buffers < 8 || buffers > 32768 || (buffers & (buffers - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "buffers: a power of two, 8..32768");
        return -1;
    }
    if (self->epfd >= 0 || self->slots != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Forwarder already initialised");
        return -1;
    }
    self->cap = 64;
    self->count = 0;
    self->slots = PyMem_Calloc(self->cap, sizeof(Flow));
    self->pool = PyMem_Malloc((size_t)POOL * SLOT_BYTES);
    self->rbuf = PyMem_Malloc((size_t)BATCH * BUF_BYTES);
    if (self->slots == NULL || self->pool == NULL || self->rbuf == NULL) {
        forwarder_release(self);
        PyErr_NoMemory();
        return -1;
    }
    /* recvmmsg headers point at fixed buffers: per call only msg_namelen needs resetting. */
    for (int i = 0; i < BATCH; i++) {
        self->riov[i].iov_base = self->rbuf + (size_t)i * BUF_BYTES;
        self->riov[i].iov_len = BUF_BYTES;
        memset(&self->rmsg[i], 0, sizeof(struct mmsghdr));
        self->rmsg[i].msg_hdr.msg_name = &self->src[i];
        self->rmsg[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        self->rmsg[i].msg_hdr.msg_iov = &self->riov[i];
        self->rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (self->epfd < 0 || self->wakefd < 0 || watch(self, EPOLL_CTL_ADD, self->wakefd, 0) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        forwarder_release(self);
        return -1;
    }
    if (uring) {
        memset(&self->rtmpl, 0, sizeof(self->rtmpl));
        self->rtmpl.msg_namelen = sizeof(struct sockaddr_storage);
        self->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (self->evfd < 0 || ur_open(&self->ur, UR_SQ, ur_cq_size(buffers), buffers, (unsigned)UR_BUF_BYTES, self->evfd) != 0) {
            PyErr_SetFromErrno(PyExc_OSError); /* ENOSYS/EPERM (io_uring off), EINVAL (kernel too old) */
            forwarder_release(self);
            return -1;
        }
        self->uring = 1;
        uring_files_open(self);
        if (helper_start(&self->helper, helper, share) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            forwarder_release(self);
            return -1;
        }
    }
    return 0;
}

static PyObject *Forwarder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Forwarder *self = (Forwarder *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->epfd = self->wakefd = self->evfd = -1;
        ur_zero(&self->ur);
        helper_zero(&self->helper);
        pthread_mutexattr_t attr;
        pthread_mutexattr_init(&attr);
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
        pthread_mutex_init(&self->mu, &attr);
        pthread_mutexattr_destroy(&attr);
    }
    return (PyObject *)self;
}

static void Forwarder_dealloc(Forwarder *self)
{
    forwarder_release(self);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* -- the lock around every method -------------------------------------------------------------- */

static void fwd_lock(Forwarder *self)
{
    if (pthread_mutex_trylock(&self->mu) != 0) { /* run() holds it for a turn: wait without the GIL */
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&self->mu);
        Py_END_ALLOW_THREADS
    }
}

#define LOCKED3(name)                                                                                  \
    static PyObject *Forwarder_##name(Forwarder *self, PyObject *args, PyObject *kwds)                 \
    {                                                                                                  \
        fwd_lock(self);                                                                                \
        PyObject *r = name##_locked(self, args, kwds);                                                 \
        pthread_mutex_unlock(&self->mu);                                                               \
        return r;                                                                                      \
    }
#define LOCKED2(name)                                                                                  \
    static PyObject *Forwarder_##name(Forwarder *self, PyObject *arg)                                  \
    {                                                                                                  \
        fwd_lock(self);                                                                                \
        PyObject *r = name##_locked(self, arg);                                                        \
        pthread_mutex_unlock(&self->mu);                                                               \
        return r;                                                                                      \
    }

LOCKED3(drain)
LOCKED3(poll)
LOCKED3(install)
LOCKED2(add_socket)
LOCKED2(remove_socket)
LOCKED2(remove)
LOCKED2(last_seen)
LOCKED2(flush)
LOCKED2(counters)
LOCKED2(close)

static PyMethodDef Forwarder_methods[] = {
    {"drain", (PyCFunction)(void (*)(void))Forwarder_drain, METH_VARARGS | METH_KEYWORDS,
     "drain(fd, local_port, *, now=None, max_batches=4) -> list[(bytes, (host, port))]\n"
     "Read one socket; forward what installed flows match; return the rest for the table."},
    {"poll", (PyCFunction)(void (*)(void))Forwarder_poll, METH_VARARGS | METH_KEYWORDS,
     "poll(*, now=None) -> list[(local_port, bytes, (host, port))]\n"
     "drain() every registered socket the epoll set reports readable."},
    {"add_socket", (PyCFunction)Forwarder_add_socket, METH_VARARGS,
     "add_socket(fd, local_port): watch a bound non-blocking UDP socket in poll()."},
    {"remove_socket", (PyCFunction)Forwarder_remove_socket, METH_VARARGS,
     "remove_socket(fd, local_port) -> int: stop watching; purge flows using it (count)."},
    {"install", (PyCFunction)(void (*)(void))Forwarder_install, METH_VARARGS | METH_KEYWORDS,
     "install(local_port, src_host, src_port, is_rtcp_port, rtp_fd, rtp_dst, rtcp_fd, rtcp_dst,\n"
     "        clock_rate, state, transcoder=None) -> key"},
    {"remove", (PyCFunction)Forwarder_remove, METH_O, "remove(key) -> flush item or None"},
    {"last_seen", (PyCFunction)Forwarder_last_seen, METH_O, "last_seen(key) -> float (0.0: never)"},
    {"flush", (PyCFunction)Forwarder_flush, METH_NOARGS,
     "flush() -> [(key, rx_packets, rx_bytes, tx_rtp_packets, tx_rtp_bytes, tx_rtcp_packets,\n"
     "             tx_rtcp_bytes, last_seen, state, transcode_drops)] of flows changed since the last flush"},
    {"counters", (PyCFunction)Forwarder_counters, METH_NOARGS, "counters() -> dict"},
    {"helper_wait", (PyCFunction)Forwarder_helper_wait, METH_VARARGS,
     "helper_wait(timeout_s=1.0) -> bool: the send helper has sent everything it was given"},
    {"fileno", (PyCFunction)Forwarder_fileno, METH_NOARGS, "the epoll fd (readable: poll() has work)"},
    {"close", (PyCFunction)Forwarder_close, METH_NOARGS, "close the epoll fd, free every flow"},
    {"run", (PyCFunction)(void (*)(void))Forwarder_run, METH_VARARGS | METH_KEYWORDS,
     "run(callback, tick_ms=50): serve the forwarder from this thread until interrupt();\n"
     "callback(list of poll() items) gets what the table must see, with the GIL."},
    {"interrupt", (PyCFunction)Forwarder_interrupt, METH_NOARGS, "end run() (from any thread)"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Forwarder_as_sequence = {
    .sq_length = (lenfunc)Forwarder_len,
};

static PyTypeObject ForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "media_relay._fastpath.Forwarder",
    .tp_doc = PyDoc_STR("Native flow table and recvmmsg/sendmmsg forwarder of the plain relay."),
    .tp_basicsize = sizeof(Forwarder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Forwarder_new,
    .tp_init = (initproc)Forwarder_init,
    .tp_dealloc = (destructor)Forwarder_dealloc,
    .tp_methods = Forwarder_methods,
    .tp_as_sequence = &Forwarder_as_sequence,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "media_relay._fastpath",
    .m_doc = PyDoc_STR("Native fast path of the plain media relay (see media_relay/fastpath.py)."),
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&ForwarderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Forwarder", (PyObject *)&ForwarderType) < 0 ||
        PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 || PyModule_AddIntConstant(m, "BUF_BYTES", BUF_BYTES) < 0 ||
        fp_srtp_add_to_module(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
