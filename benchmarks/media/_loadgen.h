/* Helpers shared by the batched load loops of benchmarks/media (_loadgen.c, _pathgen.c).
 * Header-only (static functions): each loop is compiled on its own by load.native_module().
 */
#ifndef BENCH_MEDIA_LOADGEN_H
#define BENCH_MEDIA_LOADGEN_H

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define MAX_SOCKS 8

/* A growable array of latencies (ns), on the C heap: the loops' threads grow theirs without the
 * GIL (free with lat_free). */
typedef struct {
    int64_t *v;
    size_t n, cap;
} Lat;

static inline int lat_push(Lat *l, int64_t x)
{
    if (l->n == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 65536;
        int64_t *nv = realloc(l->v, ncap * sizeof(int64_t));
        if (nv == NULL)
            return -1;
        l->v = nv;
        l->cap = ncap;
    }
    l->v[l->n++] = x;
    return 0;
}

static inline void lat_free(Lat *l)
{
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

static inline double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CLOCK_REALTIME, the clock of SO_TIMESTAMPNS. */
/* The paced senders: how many packets are due at `now` (pace `rate` from `t0`, the first at
 * once), at most `count`. */
static inline long long paced_due(double now, double t0, double rate, long long count)
{
    long long due = (long long)((now - t0) * rate) + 1;
    return due > count ? count : due;
}

static inline int64_t real_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static inline uint32_t get32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* The kernel receive time of one received message (SO_TIMESTAMPNS), or now when absent. */
static inline int64_t kernel_ns(struct msghdr *h)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof(ts));
            return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        }
    }
    return real_ns();
}

/* Block until one of ``fds`` is readable or ``seconds`` pass (a timeout or EINTR is as good). */
static inline void wait_fds(const int *fds, int n, double seconds)
{
    struct pollfd p[MAX_SOCKS];
    for (int s = 0; s < n; s++) {
        p[s].fd = fds[s];
        p[s].events = POLLIN;
        p[s].revents = 0;
    }
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    ppoll(p, (nfds_t)n, &ts, NULL);
}

/* Sleep until the CLOCK_MONOTONIC time ``until`` (seconds, as mono()). */
static inline void sleep_until(double until)
{
    struct timespec ts;
    ts.tv_sec = (time_t)until;
    ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* A Python sequence of 1..MAX_SOCKS ints (fds) into ``out``. */
static inline int fd_list(PyObject *seq, int *out, int *n)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of fds");
    if (fast == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len < 1 || len > MAX_SOCKS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "1..8 sockets");
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (int)v;
    }
    *n = (int)len;
    Py_DECREF(fast);
    return 0;
}

/* Python's (host, port) into an IPv4 sockaddr; -1 with an exception set otherwise. */
static inline int sockaddr_of(PyObject *item, struct sockaddr_in *out)
{
    const char *host;
    int port;
    if (!PyArg_ParseTuple(item, "si", &host, &port))
        return -1;
    if (port < 1 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "bad port");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", host);
        return -1;
    }
    return 0;
}

#endif
