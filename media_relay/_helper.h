/* The send helper of an io_uring Forwarder (_fastpath.c): a second thread that sends a share of
 * the forwarded datagrams while the forwarder is behind.
 *
 * Why: on loopback the sender pays for the whole delivery of a datagram (the UDP send, the
 * receive path of the next socket, E's eBPF program), about half of a relay's CPU per packet.
 * A single-threaded relay near the top of its core (C at 1,000 calls on a 2-vCPU machine) has
 * no room for a hiccup: a few milliseconds in which its core runs slower (a busy SMT sibling, a
 * steal) leave a standing queue that drains through the few percent of headroom left. The
 * helper lends it the other core's idle time for exactly those moments.
 *
 * How: the forwarder's thread (the event loop's) still receives, looks up, transcodes and
 * counts every datagram. When a turn finds a backlog (HELPER_ON_PKTS datagrams or more), the
 * forwarder goes *active*: the sends of a fixed share of flows (a hash of egress socket and
 * destination, so one flow always goes the same way) are copied into a single-producer,
 * single-consumer queue instead of the submission ring, and the helper, woken through an
 * eventfd, sends them with sendto from its own core. The forwarder goes back to sending
 * everything itself after HELPER_OFF_TURNS quiet turns, and only once the queue is empty, so a
 * flow's datagrams never overtake each other. Idle, the helper sleeps in read(2): no CPU.
 *
 * The helper touches no Python object, no flow and no SRTP state: a queued item carries its
 * socket, destination and bytes. Sockets are the forwarder's: remove_socket waits until the
 * queue is empty before the caller may close one (helper_wait_empty).
 */
#ifndef EDGE_HELPER_H
#define EDGE_HELPER_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_uring.h"

#define HELPER_QUEUE 2048    /* items (a power of two): ~60 ms of a 1,000-call relay's share */
#define HELPER_ITEM_BYTES 2048
#define HELPER_ON_PKTS 512   /* datagrams received in one turn: a backlog, help at once */
#define HELPER_WINDOW_NS 1000000LL /* the forwarder's busy share is judged per millisecond */
#define HELPER_HOT 0.95      /* busy share of a window that counts as saturated */
#define HELPER_HOT_WINDOWS 2 /* saturated windows in a row: go active */
#define HELPER_COOL 0.80     /* busy share under which an active forwarder counts as relieved */
#define HELPER_COOL_WINDOWS 20 /* relieved windows in a row (and an empty queue): stop */
#define HELPER_BATCH 64      /* items sent per pass before the consumer index moves on */

enum { HELPER_OFF = 0, HELPER_ELASTIC = 1, HELPER_ALWAYS = 2 };

typedef struct {
    int fd;
    unsigned len;
    struct sockaddr_in dst;
    unsigned char data[HELPER_ITEM_BYTES];
} HelperItem;

typedef struct {
    int mode;       /* HELPER_OFF, HELPER_ELASTIC or HELPER_ALWAYS (tests) */
    unsigned share; /* flows offloaded while active, in quarters (1..4) */
    int running;    /* the thread exists */
    pthread_t thread;
    int evfd;       /* wakes the helper */
    HelperItem *q;
    uint64_t head;  /* written by the forwarder's thread (producer) */
    uint64_t tail;  /* written by the helper (consumer) after the items are sent */
    int idle;       /* the helper is (about to be) asleep: the producer must write evfd */
    int avoid_cpu;  /* the CPU the forwarder's thread last ran on (-1: none): the helper runs elsewhere */
    int avoiding;   /* the CPU the helper's affinity leaves out now (-1: none) */
    int stop;
    /* the forwarder's thread */
    int active;
    unsigned hot, cool;
    long long last_exit, acc_busy, acc_total;
    unsigned long long activations, drops, queued;
    /* the helper (read with atomics) */
    unsigned long long sent, errors;
} Helper;

static inline void helper_zero(Helper *h)
{
    memset(h, 0, sizeof(*h));
    h->evfd = -1;
    h->avoid_cpu = h->avoiding = -1;
}

/* Keep off the forwarder thread's CPU: the point is the other cores' idle time (the scheduler
 * would otherwise often wake the helper next to its waker, and the two would take turns). */
static void helper_place(Helper *h)
{
    int avoid = __atomic_load_n(&h->avoid_cpu, __ATOMIC_RELAXED);
    if (avoid == h->avoiding)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        return;
    if (h->avoiding >= 0)
        CPU_SET(h->avoiding, &set);
    if (avoid >= 0 && CPU_COUNT(&set) > 1)
        CPU_CLR(avoid, &set);
    if (sched_setaffinity(0, sizeof(set), &set) == 0)
        h->avoiding = avoid;
}

/* Send items [tail, end) with sendto, one call each (no ring). Returns the failures. */
static unsigned long long helper_sendto(Helper *h, uint64_t tail, uint64_t end)
{
    unsigned long long errors = 0;
    for (; tail != end; tail++) {
        const HelperItem *it = &h->q[tail & (HELPER_QUEUE - 1)];
        ssize_t r;
        do {
            r = sendto(it->fd, it->data, it->len, MSG_DONTWAIT, (const struct sockaddr *)&it->dst, sizeof(it->dst));
        } while (r < 0 && errno == EINTR);
        if (r < 0)
            errors++; /* EAGAIN (socket full), EACCES ...: that datagram is dropped */
    }
    return errors;
}

/* The same through the helper's own ring: one SEND per item, one io_uring_enter for the batch
 * (MSG_DONTWAIT: each completes inside the enter; only failures post a completion). */
static unsigned long long helper_send_ring(URing *r, Helper *h, uint64_t tail, uint64_t end)
{
    uint64_t i;
    for (i = tail; i != end; i++) {
        const HelperItem *it = &h->q[i & (HELPER_QUEUE - 1)];
        struct io_uring_sqe *sqe = ur_sqe(r);
        if (sqe == NULL) /* never: a batch fits the ring; else the rest goes by sendto below */
            break;
        sqe->opcode = IORING_OP_SEND;
        sqe->fd = it->fd;
        sqe->addr = (uint64_t)(uintptr_t)it->data;
        sqe->len = it->len;
        sqe->addr2 = (uint64_t)(uintptr_t)&it->dst;
        sqe->addr_len = (uint16_t)sizeof(it->dst);
        sqe->msg_flags = MSG_DONTWAIT;
        sqe->flags = IOSQE_CQE_SKIP_SUCCESS;
    }
    unsigned long long errors = 0;
    (void)ur_enter(r);
    unsigned left = ur_unsubmitted(r);
    if (left > 0) {
        /* The kernel did not take them all (the enter failed): take the rest back, since they
         * would go out later, after the producer reused their items, and sendto them now.
         * Failures of the ones it took are in the completion ring, reaped below. */
        unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        r->sq_local = head;
        __atomic_store_n(r->sq_tail, head, __ATOMIC_RELEASE);
        errors += helper_sendto(h, i - left, i);
    }
    errors += helper_sendto(h, i, end);
    unsigned head = *r->cq_head, ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != ctail; head++)
        if (r->cqes[head & r->cq_mask].res < 0)
            errors++;
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return errors;
}

static void *helper_main(void *arg)
{
    Helper *h = arg;
    URing ring; /* the helper's own, made on its thread (SINGLE_ISSUER); sendto without one */
    int have_ring = ur_open(&ring, HELPER_BATCH, 4 * HELPER_BATCH, 8, 64, -1) == 0;
    uint64_t tail = __atomic_load_n(&h->tail, __ATOMIC_RELAXED);
    for (;;) {
        uint64_t head = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
        if (head != tail) {
            helper_place(h);
            uint64_t end = head - tail > HELPER_BATCH ? tail + HELPER_BATCH : head;
            unsigned long long errors = have_ring ? helper_send_ring(&ring, h, tail, end) : helper_sendto(h, tail, end);
            unsigned long long sent = (end - tail) - errors;
            tail = end;
            __atomic_fetch_add(&h->sent, sent, __ATOMIC_RELAXED);
            __atomic_fetch_add(&h->errors, errors, __ATOMIC_RELAXED);
            __atomic_store_n(&h->tail, tail, __ATOMIC_RELEASE);
            continue;
        }
        if (__atomic_load_n(&h->stop, __ATOMIC_ACQUIRE))
            break;
        /* Announce the sleep, then look once more: a producer that queued meanwhile either sees
         * idle (and writes evfd) or is seen here (both sides fence between store and load). */
        __atomic_store_n(&h->idle, 1, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&h->head, __ATOMIC_SEQ_CST) != tail || __atomic_load_n(&h->stop, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(&h->idle, 0, __ATOMIC_SEQ_CST);
            continue;
        }
        uint64_t count;
        while (read(h->evfd, &count, sizeof(count)) < 0 && errno == EINTR)
            ;
        __atomic_store_n(&h->idle, 0, __ATOMIC_SEQ_CST);
    }
    if (have_ring)
        ur_close(&ring);
    return NULL;
}

/* Start the thread (mode != HELPER_OFF). 0, or -1 with errno; then the forwarder sends alone. */
static int helper_start(Helper *h, int mode, unsigned share)
{
    helper_zero(h);
    h->mode = mode;
    h->share = share;
    if (mode == HELPER_OFF)
        return 0;
    h->q = mmap(NULL, sizeof(HelperItem) * HELPER_QUEUE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (h->q == MAP_FAILED) {
        h->q = NULL;
        h->mode = HELPER_OFF;
        return -1;
    }
    h->evfd = eventfd(0, EFD_CLOEXEC);
    if (h->evfd < 0) {
        int saved = errno;
        munmap(h->q, sizeof(HelperItem) * HELPER_QUEUE);
        helper_zero(h);
        errno = saved;
        return -1;
    }
    int err = pthread_create(&h->thread, NULL, helper_main, h);
    if (err != 0) {
        close(h->evfd);
        munmap(h->q, sizeof(HelperItem) * HELPER_QUEUE);
        helper_zero(h);
        errno = err;
        return -1;
    }
    h->running = 1;
    h->active = mode == HELPER_ALWAYS;
    return 0;
}

static void helper_wake(Helper *h)
{
    int cpu = sched_getcpu();
    if (cpu != h->avoid_cpu)
        __atomic_store_n(&h->avoid_cpu, cpu, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&h->idle, __ATOMIC_SEQ_CST)) {
        uint64_t one = 1;
        while (write(h->evfd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
}

/* Stop and join the thread; queued items are sent first (the helper empties its queue before
 * it looks at stop). */
static void helper_stop(Helper *h)
{
    if (h->running) {
        __atomic_store_n(&h->stop, 1, __ATOMIC_SEQ_CST);
        uint64_t one = 1;
        while (write(h->evfd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
        pthread_join(h->thread, NULL);
    }
    if (h->evfd >= 0)
        close(h->evfd);
    if (h->q != NULL)
        munmap(h->q, sizeof(HelperItem) * HELPER_QUEUE);
    helper_zero(h);
}

static inline int helper_empty(const Helper *h)
{
    return __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE) == h->head;
}

/* Wait (yielding) until the helper has sent everything queued, at most timeout_ns. 1 if empty. */
static int helper_wait_empty(Helper *h, long long timeout_ns)
{
    if (!h->running || helper_empty(h))
        return 1;
    helper_wake(h);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (!helper_empty(h)) {
        sched_yield();
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec) > timeout_ns)
            return 0;
    }
    return 1;
}

/* Does this send go to the helper? Only while active, for the flows of the offloaded share. */
static inline int helper_takes(const Helper *h, int fd, const struct sockaddr_in *dst)
{
    if (!h->active)
        return 0;
    uint64_t x = ((uint64_t)(uint32_t)fd << 32) ^ ((uint64_t)dst->sin_addr.s_addr << 16) ^ dst->sin_port;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (unsigned)(x >> 62) < h->share;
}

/* Queue one send; 0, or -1 when the queue is full (the datagram is dropped and counted). */
static inline int helper_push(Helper *h, int fd, const struct sockaddr_in *dst, const unsigned char *data, unsigned len)
{
    uint64_t tail = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);
    if (h->head - tail >= HELPER_QUEUE || len > HELPER_ITEM_BYTES) {
        h->drops++;
        return -1;
    }
    HelperItem *it = &h->q[h->head & (HELPER_QUEUE - 1)];
    it->fd = fd;
    it->len = len;
    it->dst = *dst;
    memcpy(it->data, data, len);
    __atomic_store_n(&h->head, h->head + 1, __ATOMIC_RELEASE);
    h->queued++;
    return 0;
}

static inline void helper_activate(Helper *h)
{
    if (!h->active) {
        h->active = 1;
        h->activations++;
    }
    h->cool = 0;
}

/* Within a turn: rx datagrams received so far. A backlog that large: help at once. */
static inline void helper_note(Helper *h, unsigned rx)
{
    if (h->mode == HELPER_ELASTIC && rx >= HELPER_ON_PKTS)
        helper_activate(h);
}

/* After a turn that ran from entry_ns to exit_ns (CLOCK_MONOTONIC): the forwarder's busy share
 * per HELPER_WINDOW_NS decides. Saturated for HELPER_HOT_WINDOWS windows: go active; relieved
 * for HELPER_COOL_WINDOWS and nothing queued: stop (so no flow's datagrams overtake). */
static inline void helper_account(Helper *h, long long entry_ns, long long exit_ns)
{
    if (h->mode != HELPER_ELASTIC)
        return;
    long long total = h->last_exit > 0 && entry_ns >= h->last_exit ? exit_ns - h->last_exit : exit_ns - entry_ns;
    h->last_exit = exit_ns;
    h->acc_busy += exit_ns - entry_ns;
    h->acc_total += total;
    if (h->acc_total < HELPER_WINDOW_NS)
        return;
    double share = (double)h->acc_busy / (double)h->acc_total;
    h->acc_busy = h->acc_total = 0;
    if (share >= HELPER_HOT) {
        if (++h->hot >= HELPER_HOT_WINDOWS)
            helper_activate(h);
        return;
    }
    h->hot = 0;
    if (!h->active)
        return;
    h->cool = share < HELPER_COOL ? h->cool + 1 : 0;
    if (h->cool >= HELPER_COOL_WINDOWS && helper_empty(h))
        h->active = 0;
}

#endif
