/* The full-path client and echo of benchmarks/media part 2 (load.run_echo_path) in C, batched.
 *
 * One client socket plays every caller: it sends precomputed SRTP packets (``packets``, fixed
 * size, round k of call i at index k * n + i, SSRC ssrc_base + i + 1, seq k) to each call's
 * address on E, paced round-robin at ``rate`` pps (so 50 pps per call), with sendmmsg; the send
 * time of each packet is kept in a table indexed like ``packets`` (the payload is encrypted, so it
 * cannot carry the stamp). One echo socket reflects whatever plain RTP C sends it back to its
 * source (recvmmsg, then sendmmsg of the same buffers). The client matches what comes back by
 * SSRC and seq of the clear RTP header; latency = SO_TIMESTAMPNS kernel receive time - send time,
 * both CLOCK_REALTIME; ``latencies_net`` is the same less the time the packet waited on the echo
 * socket (kernel receive time to echo: the harness's own share, large when the loop waits for a
 * CPU). Every ``sample_every``-th packet received is copied out for the caller to authenticate
 * with C's key after the window. Built by load.native_module() on first use; benchmark tooling.
 *
 * ``tick_s`` > 0 coalesces turns: at most one turn per tick while traffic flows (the loop sleeps
 * to the next tick instead of waking per packet), so one sendmmsg/recvmmsg moves a tick's worth
 * of packets. The echo then holds a packet up to one tick, as a far end's jitter would; the direct
 * client -> echo -> client baseline runs with the same tick, so it is not in the added latency.
 *
 * ``echo_thread`` runs the echo in a thread of its own (its own buffers, its own counters and hold
 * record), so client and echo each have a core: on loopback the sender of a packet pays for its
 * whole delivery, and with the relays' work in the kernel (E's and C's programs on lo) that is
 * most of the path's CPU, which one thread could not carry at 1,000 calls.
 */
#include "_loadgen.h"

#include <pthread.h>

#define MAX_BURST 1024
#define RX_BATCH 64
#define RX_BATCHES 8 /* per socket per turn */
#define BUF_BYTES 2048

typedef struct {
    unsigned char buf[RX_BATCH][BUF_BYTES];
    char ctl[RX_BATCH][CMSG_SPACE(sizeof(struct timespec))];
    struct sockaddr_in src[RX_BATCH];
    struct mmsghdr rmsg[RX_BATCH];
    struct iovec riov[RX_BATCH];
} Rx;

typedef struct {
    int client, echo;
    Py_ssize_t ncalls;
    struct sockaddr_in *dst;
    const unsigned char *packets;
    Py_ssize_t packet_bytes, total, start;
    uint32_t ssrc_base;
    int64_t *sent_ns;
    int64_t *hold_ns; /* per packet: how long it waited on the echo socket */
    unsigned char *seen;
    int sample_every;
    PyObject *samples; /* list of bytes */
    /* send side */
    struct mmsghdr smsg[MAX_BURST];
    struct iovec siov[MAX_BURST];
    Rx rx, erx;         /* the client's receive buffers, the echo's */
    Lat lat, net, hold; /* client latencies, the same less the echo's hold, every echo hold */
    long long received, errors, echoed, echo_errors, unmatched, turns;
    /* the echo thread (echo_thread): runs until stop; echo_failed if it ran out of memory */
    volatile int stop, echo_failed;
    double tick_s;
} Path;

static void rx_setup(Rx *g, int with_ctl)
{
    for (int i = 0; i < RX_BATCH; i++) {
        g->riov[i].iov_base = g->buf[i];
        g->riov[i].iov_len = BUF_BYTES;
        memset(&g->rmsg[i], 0, sizeof(struct mmsghdr));
        g->rmsg[i].msg_hdr.msg_iov = &g->riov[i];
        g->rmsg[i].msg_hdr.msg_iovlen = 1;
        g->rmsg[i].msg_hdr.msg_name = &g->src[i];
        g->rmsg[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        if (with_ctl) {
            g->rmsg[i].msg_hdr.msg_control = g->ctl[i];
            g->rmsg[i].msg_hdr.msg_controllen = sizeof(g->ctl[i]);
        }
    }
}

/* sendmmsg all of ``msgs``; a message the kernel refuses is counted and skipped. */
static void send_all(int fd, struct mmsghdr *msgs, int n, long long *errors)
{
    int i = 0;
    while (i < n) {
        int r = sendmmsg(fd, &msgs[i], (unsigned)(n - i), MSG_DONTWAIT);
        if (r > 0) {
            i += r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else {
            (*errors)++;
            i++;
        }
    }
}

/* Index into ``packets`` of a (clear) RTP header of this run, or -1. */
static long long packet_index(const Path *g, const unsigned char *d, unsigned len)
{
    if (len < 12)
        return -1;
    long long seq = ((long long)d[2] << 8) | d[3];
    long long call = (long long)(uint32_t)(get32(d + 8) - g->ssrc_base) - 1;
    long long idx = seq * g->ncalls + call;
    if (call < 0 || call >= g->ncalls || idx < g->start || idx >= g->total)
        return -1;
    return idx;
}

/* The echo: everything waiting (at most RX_BATCHES batches) goes back to where it came from.
 * The time each packet waited on the echo socket is recorded: the harness's own share of the
 * path's latency, which the direct baseline only approximates when the loop is busier here. */
static long long echo_drain(Path *g, int *failed)
{
    Rx *x = &g->erx;
    long long moved = 0;
    for (int b = 0; b < RX_BATCHES; b++) {
        rx_setup(x, 1);
        int r = recvmmsg(g->echo, x->rmsg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (r <= 0)
            break;
        int64_t now = real_ns();
        for (int i = 0; i < r; i++) {
            int64_t held = now - kernel_ns(&x->rmsg[i].msg_hdr);
            if (lat_push(&g->hold, held) < 0) {
                *failed = 1;
                return moved;
            }
            long long idx = packet_index(g, x->buf[i], x->rmsg[i].msg_len);
            if (idx >= 0)
                g->hold_ns[idx] = held;
            x->riov[i].iov_len = x->rmsg[i].msg_len;
            x->rmsg[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
            x->rmsg[i].msg_hdr.msg_control = NULL; /* no SCM_TIMESTAMPNS on the way out */
            x->rmsg[i].msg_hdr.msg_controllen = 0;
        }
        send_all(g->echo, x->rmsg, r, &g->echo_errors);
        moved += r;
        if (r < RX_BATCH)
            break;
    }
    g->echoed += moved;
    return moved;
}

/* The client's receive side: match by (SSRC, seq), keep the latency, copy a sample. */
static long long client_drain(Path *g, int *failed)
{
    Rx *x = &g->rx;
    long long got = 0;
    for (int b = 0; b < RX_BATCHES; b++) {
        rx_setup(x, 1);
        int r = recvmmsg(g->client, x->rmsg, RX_BATCH, MSG_DONTWAIT, NULL);
        if (r <= 0)
            break;
        for (int i = 0; i < r; i++) {
            const unsigned char *d = x->buf[i];
            unsigned len = x->rmsg[i].msg_len;
            long long idx = packet_index(g, d, len);
            /* a warm-up echo, a duplicate, not sent (yet) by this run, or a stranger */
            if (idx < 0 || g->seen[idx] || g->sent_ns[idx] == 0) {
                g->unmatched++;
                continue;
            }
            g->seen[idx] = 1;
            int64_t lat = kernel_ns(&x->rmsg[i].msg_hdr) - g->sent_ns[idx];
            if (lat_push(&g->lat, lat) < 0 || lat_push(&g->net, lat - g->hold_ns[idx]) < 0) {
                *failed = 1;
                return got;
            }
            got++;
            if (++g->received % g->sample_every == 0) {
                PyObject *copy = PyBytes_FromStringAndSize((const char *)d, (Py_ssize_t)len);
                if (copy == NULL || PyList_Append(g->samples, copy) < 0) {
                    Py_XDECREF(copy);
                    *failed = 1;
                    return got;
                }
                Py_DECREF(copy);
            }
        }
        if (r < RX_BATCH)
            break;
    }
    return got;
}

/* Packets [first, first + n) of the window (indexes from g->start), one sendmmsg. */
static void send_burst(Path *g, Py_ssize_t first, int n)
{
    int64_t now = real_ns();
    for (int m = 0; m < n; m++) {
        Py_ssize_t idx = g->start + first + m;
        g->sent_ns[idx] = now;
        g->siov[m].iov_base = (void *)(g->packets + idx * g->packet_bytes);
        g->siov[m].iov_len = (size_t)g->packet_bytes;
        memset(&g->smsg[m], 0, sizeof(struct mmsghdr));
        g->smsg[m].msg_hdr.msg_name = &g->dst[idx % g->ncalls];
        g->smsg[m].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        g->smsg[m].msg_hdr.msg_iov = &g->siov[m];
        g->smsg[m].msg_hdr.msg_iovlen = 1;
    }
    send_all(g->client, g->smsg, n, &g->errors);
}

static int parse_dests(Path *g, PyObject *dests)
{
    PyObject *fast = PySequence_Fast(dests, "dests: a sequence of (host, port)");
    if (fast == NULL)
        return -1;
    g->ncalls = PySequence_Fast_GET_SIZE(fast);
    g->dst = PyMem_Calloc((size_t)g->ncalls + 1, sizeof(struct sockaddr_in));
    if (g->dst == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < g->ncalls; i++) {
        if (sockaddr_of(PySequence_Fast_GET_ITEM(fast, i), &g->dst[i]) < 0) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* echo_thread: the echo's own loop, one turn per tick while traffic flows, until g->stop. */
static void *echo_main(void *arg)
{
    Path *g = arg;
    int failed = 0;
    while (!g->stop && !failed) {
        double turn = mono();
        long long moved = echo_drain(g, &failed);
        if (moved == 0)
            wait_fds(&g->echo, 1, 0.01);
        else if (g->tick_s > 0 && mono() < turn + g->tick_s)
            sleep_until(turn + g->tick_s);
    }
    g->echo_failed = failed;
    return NULL;
}

/* The paced send loop; returns -1 on a Python error (signal, no memory). */
static int run_loop(Path *g, double rate, int burst, double tick_s, int threaded, double *send_s,
                    double *behind_s, long long *sent_out)
{
    int fds[2] = {g->client, g->echo}, nfds = threaded ? 1 : 2;
    Py_ssize_t count = g->total - g->start;
    long long sent = 0;
    int failed = 0;
    double t0 = mono(), hard_end = t0 + (double)count / rate + 2.0, last = t0;
    while (sent < count && !failed) {
        double turn = mono();
        if (turn >= hard_end)
            break;
        long long due = paced_due(turn, t0, rate, count);
        long long stop = due < sent + burst ? due : sent + burst;
        if (stop > sent) {
            send_burst(g, (Py_ssize_t)sent, (int)(stop - sent));
            sent = stop;
        }
        last = mono();
        /* the echo first: its queueing is in the path */
        long long moved = threaded ? 0 : echo_drain(g, &failed);
        moved += client_drain(g, &failed);
        if (sent >= due && moved == 0) {
            double wait = t0 + (double)sent / rate - mono();
            if (wait > 0)
                wait_fds(fds, nfds, wait);
        }
        if (tick_s > 0 && mono() < turn + tick_s)
            sleep_until(turn + tick_s);
        if ((++g->turns & 1023) == 0 && PyErr_CheckSignals() < 0)
            return -1;
    }
    if (failed) {
        PyErr_NoMemory();
        return -1;
    }
    *send_s = last - t0;
    *behind_s = last - (t0 + (double)(sent - 1) / rate);
    *sent_out = sent;
    return 0;
}

static PyObject *run_echo_path(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"client",   "echo",    "dests",  "packets", "packet_bytes", "first_round", "rate",
                             "on_sent",  "ssrc_base", "tick_s", "burst", "sample_every", "drain_s", "echo_thread", NULL};
    int client, echo, burst = MAX_BURST, sample_every = 64, threaded = 0;
    PyObject *dests, *on_sent;
    Py_buffer packets;
    Py_ssize_t packet_bytes, first_round;
    unsigned int ssrc_base = 0;
    double rate, tick_s = 0.0, drain_s = 0.5;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOy*nndO|Idiidp", kwlist, &client, &echo, &dests, &packets,
                                     &packet_bytes, &first_round, &rate, &on_sent, &ssrc_base, &tick_s, &burst, &sample_every,
                                     &drain_s, &threaded))
        return NULL;
    Path *g = PyMem_Calloc(1, sizeof(Path));
    PyObject *result = NULL;
    if (g == NULL) {
        PyBuffer_Release(&packets);
        return PyErr_NoMemory();
    }
    g->client = client;
    g->echo = echo;
    g->sample_every = sample_every;
    g->ssrc_base = ssrc_base;
    if (parse_dests(g, dests) < 0)
        goto done;
    if (g->ncalls < 1 || packet_bytes < 12 || packet_bytes > BUF_BYTES || packets.len % packet_bytes != 0 ||
        first_round < 0 || rate <= 0 || burst < 1 || burst > MAX_BURST || sample_every < 1 || tick_s < 0 ||
        tick_s > 0.02 || drain_s < 0 || drain_s > 60) {
        PyErr_SetString(PyExc_ValueError, "bad dests, packets, first_round, rate, tick_s, burst or drain_s");
        goto done;
    }
    g->packets = packets.buf;
    g->packet_bytes = packet_bytes;
    g->total = packets.len / packet_bytes;
    g->start = first_round * g->ncalls;
    if (g->total % g->ncalls != 0 || g->start >= g->total || g->total / g->ncalls > 65536) {
        PyErr_SetString(PyExc_ValueError, "packets: whole rounds of every call, at most 65536, past first_round");
        goto done;
    }
    g->sent_ns = PyMem_Calloc((size_t)g->total, sizeof(int64_t));
    g->hold_ns = PyMem_Calloc((size_t)g->total, sizeof(int64_t));
    g->seen = PyMem_Calloc((size_t)g->total, 1);
    g->samples = PyList_New(0);
    if (g->sent_ns == NULL || g->hold_ns == NULL || g->seen == NULL || g->samples == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    double send_s = 0, behind_s = 0;
    long long sent = 0;
    pthread_t echo_tid;
    int echo_running = 0;
    g->tick_s = tick_s;
    if (threaded) {
        int err = pthread_create(&echo_tid, NULL, echo_main, g);
        if (err != 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        echo_running = 1;
    }
    int loop_rc = run_loop(g, rate, burst, tick_s, threaded, &send_s, &behind_s, &sent);
    if (loop_rc == 0 && on_sent != Py_None) {
        PyObject *r = PyObject_CallNoArgs(on_sent);
        if (r == NULL)
            loop_rc = -1;
        else
            Py_DECREF(r);
    }
    int fds[2] = {g->client, g->echo}, failed = 0;
    double end = mono() + drain_s;
    while (loop_rc == 0 && mono() < end && !failed) {
        long long moved = threaded ? 0 : echo_drain(g, &failed);
        moved += client_drain(g, &failed);
        if (moved == 0)
            wait_fds(fds, threaded ? 1 : 2, 0.02);
    }
    if (echo_running) {
        g->stop = 1;
        Py_BEGIN_ALLOW_THREADS
        pthread_join(echo_tid, NULL);
        Py_END_ALLOW_THREADS
        failed |= g->echo_failed;
    }
    if (loop_rc < 0)
        goto done;
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *lat = PyBytes_FromStringAndSize((const char *)g->lat.v, (Py_ssize_t)(g->lat.n * sizeof(int64_t)));
    if (lat == NULL)
        goto done;
    PyObject *hold = PyBytes_FromStringAndSize((const char *)g->hold.v, (Py_ssize_t)(g->hold.n * sizeof(int64_t)));
    PyObject *net = PyBytes_FromStringAndSize((const char *)g->net.v, (Py_ssize_t)(g->net.n * sizeof(int64_t)));
    if (hold == NULL || net == NULL) {
        Py_DECREF(lat);
        Py_XDECREF(hold);
        Py_XDECREF(net);
        goto done;
    }
    result = Py_BuildValue("{sLsLsLsdsdsNsNsNsOsLsLsLsL}", "sent", sent, "received", g->received, "errors", g->errors,
                           "send_s", send_s, "behind_s", behind_s, "latencies", lat, "latencies_net", net, "echo_hold", hold, "samples", g->samples,
                           "echoed", g->echoed, "echo_errors", g->echo_errors, "unmatched", g->unmatched, "turns",
                           g->turns);
done:
    PyBuffer_Release(&packets);
    Py_XDECREF(g->samples);
    PyMem_Free(g->dst);
    PyMem_Free(g->sent_ns);
    PyMem_Free(g->hold_ns);
    PyMem_Free(g->seen);
    lat_free(&g->lat);
    lat_free(&g->hold);
    lat_free(&g->net);
    PyMem_Free(g);
    return result;
}

static PyMethodDef methods[] = {
    {"run_echo_path", (PyCFunction)(void (*)(void))run_echo_path, METH_VARARGS | METH_KEYWORDS,
     "run_echo_path(client, echo, dests, packets, packet_bytes, first_round, rate, on_sent, ssrc_base=0,\n"
     "              tick_s=0.0, burst=1024, sample_every=64, drain_s=0.5, echo_thread=False) -> dict"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pathgen", "Batched full-path client and echo.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__pathgen(void)
{
    return PyModule_Create(&module);
}
