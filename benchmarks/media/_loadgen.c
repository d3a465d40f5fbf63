/* The one-hop generator/sink of benchmarks/media (load.run_plain) with batched syscalls.
 *
 * The Python loop tops out near 100-120k pps on one core (one sendto and one recvmsg per packet),
 * below what the relays under test can forward. This is the same loop, same packets, same
 * pacing and the same latency definition (SO_TIMESTAMPNS kernel receive time minus the
 * CLOCK_REALTIME send time written into the packet), with sendmmsg per tx socket and recvmmsg.
 * Built by load.native_loadgen() on first use; benchmark tooling only.
 */
#include "_loadgen.h"

#include <pthread.h>

#define PACKET_BYTES 172
#define MAX_BURST 1024
#define RX_BATCH 64
#define RX_BATCHES 4 /* per socket per turn, as load.DRAIN = 256 */
#define BUF_BYTES 2048

typedef struct Gen {
    int ntx, nrx;
    int tx[MAX_SOCKS], rx[MAX_SOCKS];
    Py_ssize_t nflows;
    int *flow_sock;
    uint32_t *flow_ssrc;
    struct sockaddr_in *flow_dst;
    uint32_t run_id;
    double rate, t0, drain_s;
    long long count;
    int burst;
    /* send side */
    unsigned char (*pkt)[PACKET_BYTES];
    struct mmsghdr *smsg;
    struct iovec *siov;
    /* receive side */
    unsigned char buf[RX_BATCH][BUF_BYTES];
    char ctl[RX_BATCH][CMSG_SPACE(sizeof(struct timespec))];
    struct mmsghdr rmsg[RX_BATCH];
    struct iovec riov[RX_BATCH];
    Lat lat;
    /* results */
    long long errors, sent, received;
    double last, behind;
    int failed;
    struct Shared *shared;
} Gen;

/* What the threads of one run share: how many have finished sending, and when the last did. */
typedef struct Shared {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int threads, done;
} Shared;

/* Read this run's packets from every rx socket (at most RX_BATCHES batches each). */
static long long drain(Gen *g)
{
    long long got = 0;
    for (int s = 0; s < g->nrx; s++) {
        for (int b = 0; b < RX_BATCHES; b++) {
            for (int i = 0; i < RX_BATCH; i++) {
                g->riov[i].iov_base = g->buf[i];
                g->riov[i].iov_len = BUF_BYTES;
                memset(&g->rmsg[i], 0, sizeof(struct mmsghdr));
                g->rmsg[i].msg_hdr.msg_iov = &g->riov[i];
                g->rmsg[i].msg_hdr.msg_iovlen = 1;
                g->rmsg[i].msg_hdr.msg_control = g->ctl[i];
                g->rmsg[i].msg_hdr.msg_controllen = sizeof(g->ctl[i]);
            }
            int r = recvmmsg(g->rx[s], g->rmsg, RX_BATCH, MSG_DONTWAIT, NULL);
            if (r <= 0)
                break;
            for (int i = 0; i < r; i++) {
                const unsigned char *d = g->buf[i];
                if (g->rmsg[i].msg_len < 24 || get32(d + 20) != g->run_id)
                    continue;
                int64_t sent_ns = (int64_t)(((uint64_t)get32(d + 12) << 32) | get32(d + 16));
                if (lat_push(&g->lat, kernel_ns(&g->rmsg[i].msg_hdr) - sent_ns) < 0) {
                    g->failed = 1;
                    return got;
                }
                got++;
            }
            if (r < RX_BATCH)
                break;
        }
    }
    return got;
}

/* Packets [first, first + n) of this thread's share, one sendmmsg per tx socket. */
static void send_burst(Gen *g, long long first, int n)
{
    int64_t now_ns = real_ns();
    int per[MAX_SOCKS] = {0};
    int order[MAX_BURST];
    for (int i = 0; i < n; i++) {
        long long idx = first + i;
        Py_ssize_t j = (Py_ssize_t)(idx % g->nflows);
        long long k = idx / g->nflows;
        unsigned char *p = g->pkt[i];
        p[0] = 0x80;
        p[1] = 0;
        p[2] = (unsigned char)((k >> 8) & 0xFF);
        p[3] = (unsigned char)(k & 0xFF);
        put32(p + 4, (uint32_t)((k * 160) & 0xFFFFFFFF));
        put32(p + 8, g->flow_ssrc[j]);
        put32(p + 12, (uint32_t)((uint64_t)now_ns >> 32));
        put32(p + 16, (uint32_t)now_ns);
        put32(p + 20, g->run_id);
        per[g->flow_sock[j]]++;
    }
    int start[MAX_SOCKS], fill[MAX_SOCKS];
    for (int s = 0, acc = 0; s < g->ntx; s++) {
        start[s] = fill[s] = acc;
        acc += per[s];
    }
    for (int i = 0; i < n; i++)
        order[fill[g->flow_sock[(first + i) % g->nflows]]++] = i;
    for (int m = 0; m < n; m++) {
        int i = order[m];
        Py_ssize_t j = (Py_ssize_t)((first + i) % g->nflows);
        g->siov[m].iov_base = g->pkt[i];
        g->siov[m].iov_len = PACKET_BYTES;
        memset(&g->smsg[m], 0, sizeof(struct mmsghdr));
        g->smsg[m].msg_hdr.msg_name = &g->flow_dst[j];
        g->smsg[m].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        g->smsg[m].msg_hdr.msg_iov = &g->siov[m];
        g->smsg[m].msg_hdr.msg_iovlen = 1;
    }
    for (int s = 0; s < g->ntx; s++) {
        int i = start[s], end = start[s] + per[s];
        while (i < end) {
            int r = sendmmsg(g->tx[s], &g->smsg[i], (unsigned)(end - i), MSG_DONTWAIT);
            if (r > 0) {
                i += r;
            } else if (r < 0 && errno == EINTR) {
                continue;
            } else {
                g->errors++;
                i++;
            }
        }
    }
}

/* One thread's window: pace its share out (draining as it goes), then say so. */
static void send_phase(Gen *g)
{
    int burst = g->burst;
    double hard_end = g->t0 + (double)g->count / g->rate + 2.0;
    g->last = g->t0;
    while (g->sent < g->count && !g->failed) {
        double now = mono();
        if (now >= hard_end)
            break;
        long long due = paced_due(now, g->t0, g->rate, g->count);
        long long stop = due < g->sent + burst ? due : g->sent + burst;
        if (stop > g->sent) {
            send_burst(g, g->sent, (int)(stop - g->sent));
            g->sent = stop;
        }
        g->last = mono();
        long long got = drain(g);
        g->received += got;
        if (got == 0 && g->sent >= due) {
            double wait = g->t0 + (double)g->sent / g->rate - mono();
            if (wait > 0)
                wait_fds(g->rx, g->nrx, wait);
        }
    }
    g->behind = g->last - (g->t0 + (double)(g->sent - 1) / g->rate);
    Shared *sh = g->shared;
    pthread_mutex_lock(&sh->mu);
    if (++sh->done == sh->threads)
        pthread_cond_broadcast(&sh->cv);
    pthread_mutex_unlock(&sh->mu);
}

/* Until every thread has sent, keep reading; then read for drain_s more. */
static void drain_phase(Gen *g)
{
    Shared *sh = g->shared;
    for (;;) {
        pthread_mutex_lock(&sh->mu);
        int all = sh->done == sh->threads;
        pthread_mutex_unlock(&sh->mu);
        if (all || g->failed)
            break;
        long long got = drain(g);
        g->received += got;
        if (got == 0)
            wait_fds(g->rx, g->nrx, 0.005);
    }
    double end = mono() + g->drain_s;
    while (mono() < end && !g->failed) {
        long long got = drain(g);
        g->received += got;
        if (got == 0)
            wait_fds(g->rx, g->nrx, 0.02);
    }
}

static void *gen_thread(void *arg)
{
    Gen *g = arg;
    send_phase(g);
    drain_phase(g);
    return NULL;
}

static void gen_free(Gen *g)
{
    if (g == NULL)
        return;
    free(g->flow_sock);
    free(g->flow_ssrc);
    free(g->flow_dst);
    free(g->pkt);
    free(g->smsg);
    free(g->siov);
    lat_free(&g->lat);
    free(g);
}

/* Thread t of `threads` owns the t-th contiguous block of tx sockets and of rx sockets, and the
 * flows sent from its tx sockets. */
static Gen *gen_new(const int *tx, int ntx, const int *rx, int nrx, int t, int threads, PyObject *fl,
                    uint32_t run_id)
{
    Gen *g = calloc(1, sizeof(Gen));
    if (g == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    int tx0 = t * (ntx / threads), rx0 = t * (nrx / threads);
    g->ntx = ntx / threads;
    g->nrx = nrx / threads;
    memcpy(g->tx, tx + tx0, sizeof(int) * (size_t)g->ntx);
    memcpy(g->rx, rx + rx0, sizeof(int) * (size_t)g->nrx);
    g->run_id = run_id;
    Py_ssize_t all = PySequence_Fast_GET_SIZE(fl);
    g->flow_sock = calloc((size_t)all + 1, sizeof(int));
    g->flow_ssrc = calloc((size_t)all + 1, sizeof(uint32_t));
    g->flow_dst = calloc((size_t)all + 1, sizeof(struct sockaddr_in));
    g->pkt = calloc(MAX_BURST, PACKET_BYTES);
    g->smsg = calloc(MAX_BURST, sizeof(struct mmsghdr));
    g->siov = calloc(MAX_BURST, sizeof(struct iovec));
    if (!g->flow_sock || !g->flow_ssrc || !g->flow_dst || !g->pkt || !g->smsg || !g->siov) {
        PyErr_NoMemory();
        gen_free(g);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < all; j++) {
        int si, port;
        const char *host;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fl, j), "isi", &si, &host, &port)) {
            gen_free(g);
            return NULL;
        }
        if (si < 0 || si >= ntx || port < 1 || port > 65535) {
            PyErr_SetString(PyExc_ValueError, "bad flow");
            gen_free(g);
            return NULL;
        }
        if (si < tx0 || si >= tx0 + g->ntx)
            continue;
        Py_ssize_t k = g->nflows++;
        g->flow_sock[k] = si - tx0;
        g->flow_ssrc[k] = (uint32_t)(j + 1);
        g->flow_dst[k].sin_family = AF_INET;
        g->flow_dst[k].sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &g->flow_dst[k].sin_addr) != 1) {
            PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", host);
            gen_free(g);
            return NULL;
        }
    }
    if (g->nflows < 1) {
        PyErr_SetString(PyExc_ValueError, "a thread without flows");
        gen_free(g);
        return NULL;
    }
    return g;
}

static PyObject *run_plain(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tx",      "flows", "rx",      "rate",    "count", "run_id",
                             "on_sent", "burst", "drain_s", "threads", NULL};
    PyObject *tx, *flows, *rx, *on_sent;
    double rate, drain_s = 0.5;
    long long count;
    unsigned int run_id;
    int burst = 64, threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOdLIO|idi", kwlist, &tx, &flows, &rx, &rate, &count, &run_id,
                                     &on_sent, &burst, &drain_s, &threads))
        return NULL;
    if (rate <= 0 || count < 1 || burst < 1 || burst > MAX_BURST || drain_s < 0 || drain_s > 60 || threads < 1 ||
        threads > MAX_SOCKS) {
        PyErr_SetString(PyExc_ValueError, "bad rate, count, burst, drain_s or threads");
        return NULL;
    }
    int txfd[MAX_SOCKS], rxfd[MAX_SOCKS], ntx, nrx;
    if (fd_list(tx, txfd, &ntx) < 0 || fd_list(rx, rxfd, &nrx) < 0)
        return NULL;
    if (ntx % threads || nrx % threads) {
        PyErr_SetString(PyExc_ValueError, "tx and rx sockets must split evenly over the threads");
        return NULL;
    }
    PyObject *fl = PySequence_Fast(flows, "flows: a sequence of (tx index, host, port)");
    if (fl == NULL)
        return NULL;
    PyObject *result = NULL;
    Gen *g[MAX_SOCKS] = {NULL};
    pthread_t tid[MAX_SOCKS];
    int started = 0;
    Shared sh = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, threads, 0};
    long long total_flows = PySequence_Fast_GET_SIZE(fl);
    for (int t = 0; t < threads; t++) {
        if ((g[t] = gen_new(txfd, ntx, rxfd, nrx, t, threads, fl, run_id)) == NULL)
            goto done;
    }
    /* Each thread paces its share: its flows' part of the rate and of the count. */
    double t0 = mono();
    long long assigned = 0;
    for (int t = 0; t < threads; t++) {
        g[t]->rate = rate * (double)g[t]->nflows / (double)total_flows;
        g[t]->count = t == threads - 1 ? count - assigned : (long long)((double)count * (double)g[t]->nflows / (double)total_flows);
        assigned += g[t]->count;
        g[t]->t0 = t0;
        g[t]->drain_s = drain_s;
        g[t]->burst = burst;
        g[t]->shared = &sh;
        if (g[t]->count < 1) {
            PyErr_SetString(PyExc_ValueError, "count too small for the threads");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, gen_thread, g[t]) != 0) {
            g[0]->failed = 2;
            pthread_mutex_lock(&sh.mu);
            sh.done += threads - t;  /* the threads that never started count as done */
            pthread_mutex_unlock(&sh.mu);
            break;
        }
        started = t;
    }
    send_phase(g[0]);
    pthread_mutex_lock(&sh.mu);
    while (sh.done < sh.threads)
        pthread_cond_wait(&sh.cv, &sh.mu);
    pthread_mutex_unlock(&sh.mu);
    Py_END_ALLOW_THREADS
    /* The CPU probe stops with the sending; the threads drain and are joined either way. */
    PyObject *stopped = on_sent == Py_None ? Py_NewRef(Py_None) : PyObject_CallNoArgs(on_sent);
    Py_BEGIN_ALLOW_THREADS
    drain_phase(g[0]);
    for (int t = 1; t <= started; t++)
        pthread_join(tid[t], NULL);
    Py_END_ALLOW_THREADS
    if (stopped == NULL)
        goto done;
    Py_DECREF(stopped);
    long long sent = 0, received = 0, errors = 0;
    double send_s = 0, behind = -1e9;
    size_t nlat = 0;
    for (int t = 0; t < threads; t++) {
        if (g[t]->failed) {
            if (g[t]->failed == 2)
                PyErr_SetString(PyExc_OSError, "cannot start a generator thread");
            else
                PyErr_NoMemory();
            goto done;
        }
        sent += g[t]->sent;
        received += g[t]->received;
        errors += g[t]->errors;
        send_s = g[t]->last - t0 > send_s ? g[t]->last - t0 : send_s;
        behind = g[t]->behind > behind ? g[t]->behind : behind;
        nlat += g[t]->lat.n;
    }
    PyObject *lat = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nlat * sizeof(int64_t)));
    if (lat == NULL)
        goto done;
    char *at = PyBytes_AS_STRING(lat);
    for (int t = 0; t < threads; t++) {
        memcpy(at, g[t]->lat.v, g[t]->lat.n * sizeof(int64_t));
        at += g[t]->lat.n * sizeof(int64_t);
    }
    result = Py_BuildValue("{sLsLsLsdsdsO}", "sent", sent, "received", received, "errors", errors, "send_s",
                           send_s, "behind_s", behind, "latencies", lat);
    Py_DECREF(lat);
done:
    for (int t = 0; t < threads; t++)
        gen_free(g[t]);
    Py_DECREF(fl);
    return result;
}

static PyMethodDef methods[] = {
    {"run_plain", (PyCFunction)(void (*)(void))run_plain, METH_VARARGS | METH_KEYWORDS,
     "run_plain(tx, flows, rx, rate, count, run_id, on_sent, burst=64, drain_s=0.5, threads=1) -> dict"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loadgen", "Batched load generator.", -1, methods};

PyMODINIT_FUNC PyInit__loadgen(void)
{
    return PyModule_Create(&module);
}
