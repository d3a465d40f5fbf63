/* A small io_uring for the relay's Forwarder (_fastpath.c), without liburing.
 *
 * What the forwarder needs from io_uring, and no more: one submission/completion ring set up
 * with DEFER_TASKRUN (completions are produced only inside io_uring_enter, by the one thread that
 * owns the ring), one ring of provided receive buffers (group 0) for multishot RECVMSG, and an
 * eventfd the kernel signals when work is waiting, which the event loop watches.
 *
 * Why: a relay socket carries one call's packets, 50 a second, so recvmmsg/sendmmsg batch
 * nothing across calls (one syscall per datagram each way, plus epoll). With a multishot receive
 * armed on every socket and every send of a turn submitted together, a turn costs one
 * io_uring_enter however many sockets it touches.
 *
 * Memory order: the kernel reads sq_tail and br->tail and writes cq_tail; the helpers below
 * publish and read them with release/acquire atomics as the io_uring ABI requires.
 */
#ifndef EDGE_URING_H
#define EDGE_URING_H

#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    int fd;
    unsigned sq_entries, cq_entries, sq_mask, cq_mask;
    unsigned *sq_head, *sq_tail, *sq_flags, *cq_head, *cq_tail;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *rings;
    size_t rings_bytes, sqes_bytes;
    unsigned sq_local; /* SQEs handed out; published to the kernel by ur_enter */
    /* provided buffers, group 0 */
    struct io_uring_buf_ring *br;
    size_t br_bytes;
    unsigned br_entries;
    uint16_t br_tail;
    unsigned char *bufs;
    unsigned buf_bytes;
    /* registered files (a sparse table indexed by fd number): 0 slots if registration failed */
    unsigned nfiles;
} URing;

static inline void ur_zero(URing *r)
{
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

static void ur_close(URing *r)
{
    if (r->fd >= 0)
        close(r->fd); /* cancels every request and releases their files */
    if (r->rings != NULL)
        munmap(r->rings, r->rings_bytes);
    if (r->sqes != NULL)
        munmap(r->sqes, r->sqes_bytes);
    if (r->br != NULL)
        munmap(r->br, r->br_bytes);
    if (r->bufs != NULL)
        munmap(r->bufs, (size_t)r->br_entries * r->buf_bytes);
    ur_zero(r);
}

static inline void ur_buf_add(URing *r, unsigned bid, unsigned offset)
{
    struct io_uring_buf *b = &r->br->bufs[(uint16_t)(r->br_tail + offset) & (r->br_entries - 1)];
    b->addr = (uint64_t)(uintptr_t)(r->bufs + (size_t)bid * r->buf_bytes);
    b->len = r->buf_bytes;
    b->bid = (uint16_t)bid;
}

static inline void ur_buf_publish(URing *r, unsigned count)
{
    r->br_tail = (uint16_t)(r->br_tail + count);
    __atomic_store_n(&r->br->tail, r->br_tail, __ATOMIC_RELEASE);
}

/* Give one receive buffer back to the kernel. */
static inline void ur_buf_recycle(URing *r, unsigned bid)
{
    ur_buf_add(r, bid, 0);
    ur_buf_publish(r, 1);
}

/* 0, or -1 with errno. sq/cq/nbufs: powers of two; eventfd: signalled when work waits (-1:
 * none, for a ring that only sends). */
static int ur_open(URing *r, unsigned sq, unsigned cq, unsigned nbufs, unsigned buf_bytes, int eventfd)
{
    ur_zero(r);
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER |
              IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    p.cq_entries = cq;
    int fd = (int)syscall(__NR_io_uring_setup, sq, &p);
    if (fd < 0)
        return -1;
    r->fd = fd;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP)) {
        ur_close(r);
        errno = ENOSYS;
        return -1;
    }
    size_t sq_bytes = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->rings_bytes = sq_bytes > cq_bytes ? sq_bytes : cq_bytes;
    r->rings = mmap(NULL, r->rings_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->rings == MAP_FAILED) {
        r->rings = NULL;
        ur_close(r);
        return -1;
    }
    r->sqes_bytes = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        r->sqes = NULL;
        ur_close(r);
        return -1;
    }
    unsigned char *base = r->rings;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->sq_head = (unsigned *)(base + p.sq_off.head);
    r->sq_tail = (unsigned *)(base + p.sq_off.tail);
    r->sq_flags = (unsigned *)(base + p.sq_off.flags);
    r->sq_mask = *(unsigned *)(base + p.sq_off.ring_mask);
    unsigned *array = (unsigned *)(base + p.sq_off.array);
    for (unsigned i = 0; i < p.sq_entries; i++)
        array[i] = i; /* SQE i sits in slot i: ur_sqe hands them out in ring order */
    r->cq_head = (unsigned *)(base + p.cq_off.head);
    r->cq_tail = (unsigned *)(base + p.cq_off.tail);
    r->cq_mask = *(unsigned *)(base + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(base + p.cq_off.cqes);
    r->sq_local = *r->sq_tail;

    r->br_entries = nbufs;
    r->buf_bytes = buf_bytes;
    r->br_bytes = (size_t)nbufs * sizeof(struct io_uring_buf);
    r->br = mmap(NULL, r->br_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (r->br == MAP_FAILED) {
        r->br = NULL;
        ur_close(r);
        return -1;
    }
    r->bufs = mmap(NULL, (size_t)nbufs * buf_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    if (r->bufs == MAP_FAILED) {
        r->bufs = NULL;
        ur_close(r);
        return -1;
    }
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)r->br;
    reg.ring_entries = nbufs;
    reg.bgid = 0;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) != 0) {
        ur_close(r);
        return -1;
    }
    for (unsigned i = 0; i < nbufs; i++)
        ur_buf_add(r, i, i);
    ur_buf_publish(r, nbufs);
    if (eventfd >= 0 && syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &eventfd, 1) != 0) {
        ur_close(r);
        return -1;
    }
    return 0;
}

/* A sparse table of n registered files (IORING_REGISTER_FILES2, Linux 5.19+): a request on a
 * registered file skips the per-request file lookup and reference (fget/fput). n is capped by
 * RLIMIT_NOFILE; 0, or -1 with errno (then nfiles stays 0 and every request uses plain fds). */
static int ur_files_open(URing *r, unsigned n)
{
    struct io_uring_rsrc_register reg;
    memset(&reg, 0, sizeof(reg));
    reg.nr = n;
    reg.flags = IORING_RSRC_REGISTER_SPARSE;
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES2, &reg, sizeof(reg)) != 0)
        return -1;
    r->nfiles = n;
    return 0;
}

/* Put fd into slot idx (fd -1: empty the slot). 0, or -1 with errno. */
static int ur_file_set(URing *r, unsigned idx, int fd)
{
    struct io_uring_files_update up;
    memset(&up, 0, sizeof(up));
    up.offset = idx;
    up.fds = (uint64_t)(uintptr_t)&fd;
    int ret = (int)syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES_UPDATE, &up, 1);
    return ret == 1 ? 0 : -1;
}

/* SQEs handed out and not yet consumed by the kernel. */
static inline unsigned ur_unsubmitted(const URing *r)
{
    return r->sq_local - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
}

/* A zeroed SQE, or NULL when the submission ring is full (ur_enter first). */
static inline struct io_uring_sqe *ur_sqe(URing *r)
{
    if (ur_unsubmitted(r) >= r->sq_entries)
        return NULL;
    struct io_uring_sqe *sqe = &r->sqes[r->sq_local & r->sq_mask];
    r->sq_local++;
    memset(sqe, 0, sizeof(*sqe));
    return sqe;
}

/* Submit what ur_sqe handed out and run the ring's pending work (completions appear in the CQ
 * ring). Returns SQEs consumed, or -1 with errno. */
static inline int ur_enter(URing *r)
{
    __atomic_store_n(r->sq_tail, r->sq_local, __ATOMIC_RELEASE);
    int ret;
    do {
        ret = (int)syscall(__NR_io_uring_enter, r->fd, ur_unsubmitted(r), 0, IORING_ENTER_GETEVENTS, NULL, 0);
    } while (ret < 0 && errno == EINTR);
    return ret;
}

/* Deferred work waits for an io_uring_enter (the kernel runs a bounded amount per enter). */
static inline int ur_work_pending(const URing *r)
{
    return (__atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_TASKRUN) != 0;
}

static inline unsigned ur_cq_ready(const URing *r)
{
    return __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) - *r->cq_head;
}

#endif
