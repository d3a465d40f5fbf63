/* The one-hop generator/sink of benchmarks/media (load.run_plain) with batched syscalls.
 *
 * The Python loop tops out near 100-120k pps on one core (one sendto and one recvmsg per packet),
 * below what the relays under test can forward. This is the same loop, same packets, same
 * pacing and the same latency definition (SO_TIMESTAMPNS kernel receive time minus the
 * CLOCK_REALTIME send time written into the packet), with sendmmsg per tx socket and recvmmsg.
 * Built by load.native_loadgen() on first use; benchmark tooling only.
 */
#include "_loadgen.h"

#define PACKET_BYTES 172
#define MAX_BURST 1024
#define RX_BATCH 64
#define RX_BATCHES 4 /* per socket per turn, as load.DRAIN = 256 */
#define BUF_BYTES 2048

typedef struct {
    int ntx, nrx;
    int tx[MAX_SOCKS], rx[MAX_SOCKS];
    Py_ssize_t nflows;
    int *flow_sock;
    struct sockaddr_in *flow_dst;
    uint32_t run_id;
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
    long long errors;
} Gen;

/* Read this run's packets from every rx socket (at most RX_BATCHES batches each). */
static long long drain(Gen *g, int *failed)
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
                    *failed = 1;
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

/* Packets [first, first + n) of the run, one sendmmsg per tx socket. */
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
        put32(p + 8, (uint32_t)(j + 1));
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

static PyObject *run_plain(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tx", "flows", "rx", "rate", "count", "run_id", "on_sent", "burst", "drain_s", NULL};
    PyObject *tx, *flows, *rx, *on_sent;
    double rate, drain_s = 0.5;
    long long count;
    unsigned int run_id;
    int burst = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOdLIO|id", kwlist, &tx, &flows, &rx, &rate, &count, &run_id,
                                     &on_sent, &burst, &drain_s))
        return NULL;
    if (rate <= 0 || count < 1 || burst < 1 || burst > MAX_BURST || drain_s < 0 || drain_s > 60) {
        PyErr_SetString(PyExc_ValueError, "bad rate, count, burst or drain_s");
        return NULL;
    }
    Gen *g = PyMem_Calloc(1, sizeof(Gen));
    if (g == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL, *fl = NULL;
    g->run_id = run_id;
    if (fd_list(tx, g->tx, &g->ntx) < 0 || fd_list(rx, g->rx, &g->nrx) < 0)
        goto done;
    fl = PySequence_Fast(flows, "flows: a sequence of (tx index, host, port)");
    if (fl == NULL)
        goto done;
    g->nflows = PySequence_Fast_GET_SIZE(fl);
    g->flow_sock = PyMem_Calloc((size_t)g->nflows + 1, sizeof(int));
    g->flow_dst = PyMem_Calloc((size_t)g->nflows + 1, sizeof(struct sockaddr_in));
    g->pkt = PyMem_Calloc(MAX_BURST, PACKET_BYTES);
    g->smsg = PyMem_Calloc(MAX_BURST, sizeof(struct mmsghdr));
    g->siov = PyMem_Calloc(MAX_BURST, sizeof(struct iovec));
    if (!g->flow_sock || !g->flow_dst || !g->pkt || !g->smsg || !g->siov) {
        PyErr_NoMemory();
        goto done;
    }
    if (g->nflows < 1) {
        PyErr_SetString(PyExc_ValueError, "no flows");
        goto done;
    }
    for (Py_ssize_t j = 0; j < g->nflows; j++) {
        int si, port;
        const char *host;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fl, j), "isi", &si, &host, &port))
            goto done;
        if (si < 0 || si >= g->ntx || port < 1 || port > 65535) {
            PyErr_SetString(PyExc_ValueError, "bad flow");
            goto done;
        }
        g->flow_sock[j] = si;
        g->flow_dst[j].sin_family = AF_INET;
        g->flow_dst[j].sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &g->flow_dst[j].sin_addr) != 1) {
            PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", host);
            goto done;
        }
    }

    long long sent = 0, received = 0;
    int failed = 0;
    double t0 = mono(), hard_end = t0 + (double)count / rate + 2.0, last = t0;
    long long turns = 0;
    while (sent < count && !failed) {
        double now = mono();
        if (now >= hard_end)
            break;
        long long due = paced_due(now, t0, rate, count);
        long long stop = due < sent + burst ? due : sent + burst;
        if (stop > sent) {
            send_burst(g, sent, (int)(stop - sent));
            sent = stop;
        }
        last = mono();
        long long got = drain(g, &failed);
        received += got;
        if (got == 0 && sent >= due) {
            double wait = t0 + (double)sent / rate - mono();
            if (wait > 0)
                wait_fds(g->rx, g->nrx, wait);
        }
        if ((++turns & 1023) == 0 && PyErr_CheckSignals() < 0)
            goto done;
    }
    if (on_sent != Py_None) {
        PyObject *r = PyObject_CallNoArgs(on_sent);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    double behind = last - (t0 + (double)(sent - 1) / rate);
    double end = mono() + drain_s;
    while (mono() < end && !failed) {
        long long got = drain(g, &failed);
        received += got;
        if (got == 0)
            wait_fds(g->rx, g->nrx, 0.02);
    }
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *lat = PyBytes_FromStringAndSize((const char *)g->lat.v, (Py_ssize_t)(g->lat.n * sizeof(int64_t)));
    if (lat == NULL)
        goto done;
    result = Py_BuildValue("{sLsLsLsdsdsO}", "sent", sent, "received", received, "errors", g->errors, "send_s",
                           last - t0, "behind_s", behind, "latencies", lat);
    Py_DECREF(lat);
done:
    Py_XDECREF(fl);
    PyMem_Free(g->flow_sock);
    PyMem_Free(g->flow_dst);
    PyMem_Free(g->pkt);
    PyMem_Free(g->smsg);
    PyMem_Free(g->siov);
    PyMem_Free(g->lat.v);
    PyMem_Free(g);
    return result;
}

static PyMethodDef methods[] = {
    {"run_plain", (PyCFunction)(void (*)(void))run_plain, METH_VARARGS | METH_KEYWORDS,
     "run_plain(tx, flows, rx, rate, count, run_id, on_sent, burst=64, drain_s=0.5) -> dict"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loadgen", "Batched load generator.", -1, methods};

PyMODINIT_FUNC PyInit__loadgen(void)
{
    return PyModule_Create(&module);
}
