/* The server's data path: an O_DIRECT I/O thread pool and the PUT/GET pipelines that overlap
 * socket transfers with disk transfers through a connection's staging arena.
 * Called with the GIL released; the Python index decides *where* (struct memkv_io), this file
 * moves and verifies the bytes. It must never serve a block whose header or checksum is wrong. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "memkv.h"
#include "memkv_hash.h"

_Static_assert(sizeof(struct memkv_rec_hdr) == MEMKV_REC_HDR, "record header size");
_Static_assert(sizeof(struct memkv_frame_hdr) == 32, "frame header size");
_Static_assert(sizeof(struct memkv_req_desc) == 24, "request descriptor size");
_Static_assert(sizeof(struct memkv_get_rep) == 24, "get reply size");

#define DRAIN_BUF (1u << 20)
/* Large records move to and from disk in pieces, so a block's first bytes go to disk while the
   rest is still arriving (PUT) and a block is read by several pool threads at once (GET). */
#define PIECE_MIN (2u << 20)
#define PIECES_MAX 16
/* PUT hashes what it receives in steps of this size, while the bytes are still in cache. */
#define HASH_STEP (256u << 10)

int memkv_send_iov(int fd, struct iovec *iov, int cnt); /* wire.c */

static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
/* Bytes a block of len payload bytes takes on disk: header, payload, padding (as record_length). */
static uint64_t record_len(uint64_t len) { return round_up(MEMKV_REC_HDR + len, MEMKV_ALIGN); }

/* ---- cma: one-sided copies with a client process on this host ------------------------------- */
/* Copy len bytes between our `local` and `remote` in process pid (write: to it). -EFAULT means the
   client named memory it does not have (that descriptor fails); any other error ends the request. */
static int cma_copy(int pid, int write, void *local, uint64_t remote, uint64_t len) {
    while (len) {
        struct iovec l = {local, len}, r = {(void *)(uintptr_t)remote, len};
        ssize_t k = write ? process_vm_writev(pid, &l, 1, &r, 1, 0) : process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (k == 0) return -EFAULT;
        local = (char *)local + k;
        remote += (uint64_t)k;
        len -= (uint64_t)k;
    }
    return 0;
}

/* The server never needs CAP_SYS_PTRACE in effect. Without it, the kernel lets process_vm_* reach
   only processes of the server's own user that are dumpable and hold no capability the server
   lacks: a cma client that execs a setuid program (which makes it non-dumpable) or whose pid is
   reused by another user's process can no longer be reached, even by a server run as root.
   Called before any thread exists, so every thread inherits it. */
int memkv_cma_harden(void) {
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[_LINUX_CAPABILITY_U32S_3];
    if (syscall(SYS_capget, &h, d)) return -errno;
    if (!(d[CAP_TO_INDEX(CAP_SYS_PTRACE)].effective & CAP_TO_MASK(CAP_SYS_PTRACE))) return 0;
    d[CAP_TO_INDEX(CAP_SYS_PTRACE)].effective &= ~CAP_TO_MASK(CAP_SYS_PTRACE);
    return syscall(SYS_capset, &h, d) ? -errno : 0;
}

/* cma: has the client hung up (closed or shut down its side)? Its buffers may then be reused, so
   nothing more may be copied from or into them, and nothing copied may be committed. */
static int client_gone(int sock) {
    struct pollfd p = {sock, POLLRDHUP, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

int memkv_cma_probe(int pid, uint64_t addr, uint64_t expect) {
    uint64_t v = 0;
    int rc = cma_copy(pid, 0, &v, addr, sizeof v);
    return rc ? rc : v == expect ? 0 : -EACCES;
}

/* Where a PUT's payload bytes come from: the socket, or (cma) the client's memory. */
struct source {
    int sock, pid;
    uint64_t remote; /* cma: the client address of the current block */
};

static int take(const struct source *src, char *dst, uint64_t at, uint64_t len) {
    if (!src->pid) return memkv_recv_all(src->sock, dst, len);
    return client_gone(src->sock) ? -ECONNRESET : cma_copy(src->pid, 0, dst, src->remote + at, len);
}

/* ---- I/O pools ------------------------------------------------------------------------------ */
struct batch {
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

enum job_kind {
    JOB_RAW,    /* plain pread/pwrite (ceiling measurement) */
    JOB_WRITE,  /* pwrite one piece of a record whose payload the socket thread hashed */
    JOB_READ,   /* pread one piece of a record; the slot's last piece to land verifies it */
    JOB_PUSH,   /* cma GET: copy one piece of a block into the client (fd: its pid, off: address) */
    JOB_PULL,   /* cma PUT: copy one piece of a block from the client (fd: its pid, off: address) */
    JOB_BEHIND, /* pwrite one piece of a write-behind record; nobody waits: the last piece reports */
};

/* Write-behind (async durability): a record assembled in a DRAM cache slot is written from there
   after the PUT was acknowledged. Each record counts its pieces in flight plus one reference held
   by the socket thread while it submits them; whoever drops the count to zero queues the record
   on its store's memkv_behind, where memkv_behind_wait hands (seq, error) to the index. */
struct memkv_behind {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct behind_rec *head, *tail;
};

struct behind_rec {
    struct behind_rec *next;
    struct memkv_behind *q;
    uint64_t seq;
    uint32_t left; /* pieces in flight + the submitter's reference (atomic) */
    int err;       /* first error of any piece (set before the count drops) */
    struct job *jobs;
};

/* One arena slot's record while its pieces are in flight (GET). */
struct slot_state {
    struct memkv_io *io;
    uint32_t left;  /* pieces not yet read (guarded by batch mu) */
    int err;
    int ready;      /* all pieces read and the record verified (guarded by batch mu) */
};

struct job {
    struct job *next;
    struct batch *b;
    struct memkv_io *io;  /* JOB_WRITE / JOB_READ */
    struct slot_state *slot; /* JOB_READ: set before submit */
    struct behind_rec *wb;   /* JOB_BEHIND: the record this piece belongs to */
    char *rec;            /* JOB_READ: the whole record, for its verification */
    int kind;
    int fd, write;
    void *buf;
    size_t len;
    off_t off;
    int busy;  /* submitted and not yet finished (guarded by b->mu) */
    int err;   /* 0 or a negative errno */
};

/* Two pools: disk transfers, and cma copies (CPU work a client waits on, which must not queue
   behind disk writes). The disk pool runs write-behind pieces (nobody waits on them) only when
   no other job is queued, and on all threads but one, so a read that misses the DRAM cache
   during a burst of async puts waits for at most one piece, not for the whole burst. */
struct queue {
    struct job *head, *tail;
};
struct pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct queue now, behind; /* behind: JOB_BEHIND pieces */
    int started, behind_running;
};
static struct pool disk_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static struct pool copy_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
#define COPY_THREADS 3

static void fill_header(struct memkv_rec_hdr *h, const struct memkv_io *io);
static uint8_t verify_record(const struct memkv_rec_hdr *h, const struct memkv_io *io);
static void behind_drop(struct behind_rec *wb, int err);

/* Runs on a pool thread: disk transfers (for GET also the verification) and cma copies, beside the
   socket thread. */
static void run_job(struct job *j) {
    char *p = j->buf;
    size_t left = j->len;
    off_t off = j->off;
    int err = 0;
    if (j->kind == JOB_PUSH || j->kind == JOB_PULL) {
        err = cma_copy(j->fd, j->kind == JOB_PUSH, p, (uint64_t)off, left);
        left = 0;
    }
    while (left) {
        ssize_t k = j->write ? pwrite(j->fd, p, left, off) : pread(j->fd, p, left, off);
        if (k < 0) {
            if (errno == EINTR) continue;
            err = -errno;
            break;
        }
        if (k == 0) {
            err = -EIO; /* short file: the record lies beyond its end */
            break;
        }
        p += k;
        off += k;
        left -= (size_t)k;
    }
    if (j->kind == JOB_BEHIND) { /* j belongs to the record: nothing may touch it after this */
        behind_drop(j->wb, err);
        return;
    }
    if (j->kind == JOB_WRITE && err) j->io->result = MEMKV_RES_IO;
    struct slot_state *ss = j->kind == JOB_READ ? j->slot : NULL;
    int verify = 0;
    pthread_mutex_lock(&j->b->mu);
    j->err = err;
    j->busy = 0;
    if (j->kind == JOB_READ) {
        if (err) ss->err = err;
        verify = --ss->left == 0; /* the last piece to land checks the whole record */
    }
    pthread_cond_broadcast(&j->b->cv);
    pthread_mutex_unlock(&j->b->mu);
    if (verify) {
        struct memkv_io *io = ss->io;
        io->result = ss->err ? MEMKV_RES_IO : verify_record((struct memkv_rec_hdr *)j->rec, io);
        if (io->result == MEMKV_RES_OK && io->fill) /* into the DRAM cache, here beside the send */
            memcpy((void *)(uintptr_t)io->fill, j->rec + MEMKV_REC_HDR, io->len);
        pthread_mutex_lock(&j->b->mu);
        ss->ready = 1;
        pthread_cond_broadcast(&j->b->cv);
        pthread_mutex_unlock(&j->b->mu);
    }
}

static void push(struct queue *q, struct job *j) {
    j->next = NULL;
    if (q->tail) q->tail->next = j;
    else q->head = j;
    q->tail = j;
}

static struct job *pop(struct queue *q) {
    struct job *j = q->head;
    q->head = j->next;
    if (!q->head) q->tail = NULL;
    return j;
}

static void *pool_main(void *arg) {
    struct pool *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        for (;;) {
            if (p->now.head) break;
            if (p->behind.head && (p->behind_running < p->started - 1 || p->started == 1)) break;
            pthread_cond_wait(&p->cv, &p->mu);
        }
        int behind = !p->now.head;
        struct job *j = pop(behind ? &p->behind : &p->now);
        p->behind_running += behind;
        pthread_mutex_unlock(&p->mu);
        run_job(j);
        if (behind) {
            pthread_mutex_lock(&p->mu);
            p->behind_running--;
            pthread_cond_signal(&p->cv); /* a thread held back by the limit may take the next */
            pthread_mutex_unlock(&p->mu);
        }
    }
    return NULL;
}

static int pool_start(struct pool *p, int nthreads) {
    pthread_mutex_lock(&p->mu);
    int rc = 0;
    for (; p->started < nthreads; p->started++) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        rc = -pthread_create(&t, &at, pool_main, p);
        pthread_attr_destroy(&at);
        if (rc) break;
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int memkv_io_start(int nthreads) {
    int rc = pool_start(&disk_pool, nthreads);
    return rc ? rc : pool_start(&copy_pool, COPY_THREADS);
}

static void submit(struct batch *b, struct job *j, int kind, struct memkv_io *io, int fd, int write,
                   void *buf, size_t len, off_t off) {
    j->b = b;
    j->kind = kind;
    j->io = io;
    j->fd = fd;
    j->write = write;
    j->buf = buf;
    j->len = len;
    j->off = off;
    j->err = 0;
    if (kind == JOB_BEHIND) {
        __atomic_add_fetch(&j->wb->left, 1, __ATOMIC_ACQ_REL);
    } else {
        pthread_mutex_lock(&b->mu);
        j->busy = 1;
        pthread_mutex_unlock(&b->mu);
    }
    struct pool *p = kind == JOB_PUSH || kind == JOB_PULL ? &copy_pool : &disk_pool;
    pthread_mutex_lock(&p->mu);
    push(kind == JOB_BEHIND ? &p->behind : &p->now, j);
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

/* ---- write-behind --------------------------------------------------------------------------- */
struct memkv_behind *memkv_behind_new(void) {
    struct memkv_behind *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    return q;
}

void memkv_behind_free(struct memkv_behind *q) {
    if (!q) return;
    for (struct behind_rec *wb = q->head, *nx; wb; wb = nx) {
        nx = wb->next;
        free(wb);
    }
    free(q);
}

static struct behind_rec *behind_new(struct memkv_behind *q, uint64_t seq, uint32_t pieces) {
    struct behind_rec *wb = calloc(1, sizeof *wb + pieces * sizeof(struct job));
    if (!wb) return NULL;
    wb->q = q;
    wb->seq = seq;
    wb->left = 1; /* the submitter's reference */
    wb->jobs = (struct job *)(wb + 1);
    for (uint32_t k = 0; k < pieces; k++) wb->jobs[k].wb = wb;
    return wb;
}

/* One piece finished (or the submitter let go, err -ECANCELED when it gave up on the record). */
static void behind_drop(struct behind_rec *wb, int err) {
    if (err) { /* any error wins; it is published by the release below */
        int none = 0;
        __atomic_compare_exchange_n(&wb->err, &none, err, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
    if (__atomic_sub_fetch(&wb->left, 1, __ATOMIC_ACQ_REL)) return;
    struct memkv_behind *q = wb->q;
    pthread_mutex_lock(&q->mu);
    wb->next = NULL;
    if (q->tail) q->tail->next = wb;
    else q->head = wb;
    q->tail = wb;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

uint32_t memkv_behind_wait(struct memkv_behind *q, uint64_t *seqs, int32_t *errs, uint32_t max,
                           int timeout_ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    uint32_t got = 0;
    pthread_mutex_lock(&q->mu);
    while (!q->head && pthread_cond_timedwait(&q->cv, &q->mu, &until) == 0) {}
    while (q->head && got < max) {
        struct behind_rec *wb = q->head;
        q->head = wb->next;
        if (!q->head) q->tail = NULL;
        seqs[got] = wb->seq;
        errs[got++] = __atomic_load_n(&wb->err, __ATOMIC_ACQUIRE);
        free(wb);
    }
    pthread_mutex_unlock(&q->mu);
    return got;
}

static void wait_job(struct batch *b, struct job *j) {
    pthread_mutex_lock(&b->mu);
    while (j->busy) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

/* ---- staging memory ---------------------------------------------------------------------------
   Aligned buffers that requests stage records in. A connection holds one only while a request
   runs, so idle connections (a fleet keeps hundreds open) hold none. Returned buffers stay
   allocated, already faulted in, for the next request of any connection, as long as all of them
   together stay within the limit; a request never waits for staging memory. */
struct stage_buf {
    struct stage_buf *next;
    void *mem;
    size_t size;
};
static struct {
    pthread_mutex_t mu;
    uint64_t limit, allocated, kept; /* kept: bytes of the free buffers */
    struct stage_buf *free;
} stage = {PTHREAD_MUTEX_INITIALIZER, 1ull << 30, 0, 0, NULL};

/* Release the largest free buffers while more than the limit is allocated (caller holds mu). */
static void stage_trim(void) {
    while (stage.allocated > stage.limit && stage.free) {
        struct stage_buf **big = &stage.free;
        for (struct stage_buf **pp = &stage.free; *pp; pp = &(*pp)->next)
            if ((*pp)->size > (*big)->size) big = pp;
        struct stage_buf *b = *big;
        *big = b->next;
        stage.allocated -= b->size;
        stage.kept -= b->size;
        free(b->mem);
        free(b);
    }
}

void memkv_staging_limit(uint64_t bytes) {
    pthread_mutex_lock(&stage.mu);
    stage.limit = bytes;
    stage_trim();
    pthread_mutex_unlock(&stage.mu);
}

void memkv_staging_stats(uint64_t *allocated, uint64_t *kept) {
    pthread_mutex_lock(&stage.mu);
    *allocated = stage.allocated;
    *kept = stage.kept;
    pthread_mutex_unlock(&stage.mu);
}

/* A buffer of at least `need` bytes: the smallest free one that fits (up to twice as large),
   else a new one. */
static struct stage_buf *stage_take(size_t need) {
    pthread_mutex_lock(&stage.mu);
    struct stage_buf **best = NULL;
    for (struct stage_buf **pp = &stage.free; *pp; pp = &(*pp)->next)
        if ((*pp)->size >= need && (*pp)->size <= 2 * need && (!best || (*pp)->size < (*best)->size))
            best = pp;
    if (best) {
        struct stage_buf *b = *best;
        *best = b->next;
        stage.kept -= b->size;
        pthread_mutex_unlock(&stage.mu);
        return b;
    }
    stage.allocated += need;
    stage_trim(); /* a new size: free ones that no longer fit the limit go */
    pthread_mutex_unlock(&stage.mu);
    struct stage_buf *b = malloc(sizeof *b);
    if (b && !posix_memalign(&b->mem, MEMKV_ALIGN, need)) {
        b->size = need;
        return b;
    }
    free(b);
    pthread_mutex_lock(&stage.mu);
    stage.allocated -= need;
    pthread_mutex_unlock(&stage.mu);
    return NULL;
}

static void stage_give(struct stage_buf *b) {
    if (!b) return;
    pthread_mutex_lock(&stage.mu);
    b->next = stage.free;
    stage.free = b;
    stage.kept += b->size;
    stage_trim();
    pthread_mutex_unlock(&stage.mu);
}

/* ---- arena ---------------------------------------------------------------------------------- */
struct memkv_arena {
    struct stage_buf *buf; /* held only while a request runs */
    void *mem;
    uint64_t budget;
    void *drain;
    struct job *jobs;
    size_t njobs;
};

struct memkv_arena *memkv_arena_new(uint64_t budget) {
    struct memkv_arena *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->budget = budget;
    return a;
}

void memkv_arena_free(struct memkv_arena *a) {
    if (!a) return;
    stage_give(a->buf);
    free(a->drain);
    free(a->jobs);
    free(a);
}

/* Carve `*nslots` aligned slots of `slot` bytes (2..64 of them, within the budget when possible). */
static int arena_slots(struct memkv_arena *a, uint64_t slot, uint32_t want, uint32_t *nslots) {
    uint64_t k = a->budget / slot;
    if (k < 2) k = 2;
    if (k > 64) k = 64;
    if (k > want) k = want ? want : 1;
    if (!(a->buf = stage_take((size_t)(k * slot)))) return -ENOMEM;
    a->mem = a->buf->mem;
    *nslots = (uint32_t)k;
    return 0;
}

/* The end of a request: its staging buffer goes back for any connection to use. */
static int arena_done(struct memkv_arena *a, int rc) {
    stage_give(a->buf);
    a->buf = NULL;
    a->mem = NULL;
    return rc;
}

static uint64_t piece_size(uint64_t slot) {
    uint64_t p = round_up((slot + PIECES_MAX - 1) / PIECES_MAX, MEMKV_ALIGN);
    return p < PIECE_MIN ? PIECE_MIN : p;
}

/* Room for `n` jobs, reused across requests; every one starts idle. */
static struct job *arena_jobs(struct memkv_arena *a, size_t n) {
    if (n > a->njobs) {
        free(a->jobs);
        a->njobs = 0;
        if (!(a->jobs = malloc(n * sizeof *a->jobs))) return NULL;
        a->njobs = n;
    }
    for (size_t i = 0; i < n; i++) a->jobs[i].busy = 0;
    return a->jobs;
}

static int drain(int sock, struct memkv_arena *a, uint64_t len) {
    if (!a->drain && !(a->drain = malloc(DRAIN_BUF))) return -ENOMEM;
    while (len) {
        size_t k = len > DRAIN_BUF ? DRAIN_BUF : (size_t)len;
        int rc = memkv_recv_all(sock, a->drain, k);
        if (rc) return rc;
        len -= k;
    }
    return 0;
}

static void fill_header(struct memkv_rec_hdr *h, const struct memkv_io *io) {
    memset(h, 0, sizeof *h);
    h->magic = MEMKV_REC_MAGIC;
    h->version = MEMKV_REC_VERSION;
    h->key_len = io->key_len;
    h->ns_id = io->ns_id;
    h->seq = io->seq;
    h->len = io->len;
    h->csum = io->csum;
    memcpy(h->key, io->key, io->key_len);
    h->hdr_csum = XXH3_64bits(h, offsetof(struct memkv_rec_hdr, hdr_csum));
}

/* Check a record read back from disk against what the index expects. */
static uint8_t verify_record(const struct memkv_rec_hdr *h, const struct memkv_io *io) {
    if (h->magic != MEMKV_REC_MAGIC || h->version != MEMKV_REC_VERSION ||
        h->hdr_csum != XXH3_64bits(h, offsetof(struct memkv_rec_hdr, hdr_csum)))
        return MEMKV_RES_CORRUPT;
    if (h->seq != io->seq || h->ns_id != io->ns_id || h->len != io->len || h->key_len != io->key_len ||
        memcmp(h->key, io->key, io->key_len) != 0)
        return MEMKV_RES_STALE;
    if (h->csum != io->csum || memkv_h64((const char *)h + MEMKV_REC_HDR, io->len) != io->csum)
        return MEMKV_RES_CORRUPT;
    return MEMKV_RES_OK;
}

static uint64_t max_store_len(const struct memkv_io *ios, uint32_t n, uint8_t action, uint32_t *count) {
    uint64_t m = 0;
    *count = 0;
    for (uint32_t i = 0; i < n; i++)
        if (ios[i].action == action) {
            (*count)++;
            if (ios[i].len > m) m = ios[i].len;
        }
    return m;
}

/* cma GET: copy into the client's buffer. The kernel's copy into a destination that is not 64-byte
   aligned relative to the source ran at 1.6 GB/s here against 8 GB/s aligned (bytearrays sit
   16 B past a page), so such copies bounce through the arena's spare buffer, placed at the
   destination's alignment, 1 MiB at a time while it stays in cache. */
static int cma_push(struct memkv_arena *a, int pid, const char *src, uint64_t dst, uint64_t len) {
    if (((uintptr_t)src ^ dst) % 64 == 0 || len < 64 * 1024)
        return cma_copy(pid, 1, (void *)src, dst, len);
    if (!a->drain && !(a->drain = malloc(DRAIN_BUF))) return -ENOMEM;
    uint64_t shift = (dst - (uintptr_t)a->drain) % 64;
    char *bounce = (char *)a->drain + shift;
    uint64_t room = DRAIN_BUF - 64;
    for (uint64_t at = 0; at < len;) {
        uint64_t k = len - at < room ? len - at : room;
        memcpy(bounce, src + at, k);
        int rc = cma_copy(pid, 1, bounce, dst + at, k);
        if (rc) return rc;
        at += k;
    }
    return 0;
}

/* Large blocks are copied into the client by several threads at once: one thread's copy (it pins
   the client's pages one by one) ran at ~5 GB/s here, and there are cores to spare while the
   client checks the previous block. */
#define PUSH_SPLIT_MIN (4u << 20)
#define PUSH_PIECES 4
static int cma_push_split(struct memkv_arena *a, struct batch *b, int pid, const char *src, uint64_t dst,
                          uint64_t len) {
    if (len < PUSH_SPLIT_MIN || ((uintptr_t)src ^ dst) % 64) return cma_push(a, pid, src, dst, len);
    struct job jobs[PUSH_PIECES - 1];
    uint64_t piece = round_up((len + PUSH_PIECES - 1) / PUSH_PIECES, MEMKV_ALIGN);
    int k = 0;
    for (uint64_t at = piece; at < len; at += piece, k++)
        submit(b, &jobs[k], JOB_PUSH, NULL, pid, 1, (void *)(src + at), len - at < piece ? len - at : piece,
               (off_t)(dst + at));
    int rc = cma_copy(pid, 1, (void *)src, dst, piece);
    for (int q = 0; q < k; q++) {
        wait_job(b, &jobs[q]);
        if (jobs[q].err && (!rc || rc == -EFAULT)) rc = jobs[q].err; /* a fatal error wins */
    }
    return rc;
}

/* ---- server PUT ------------------------------------------------------------------------------ */
/* One record being received: where its bytes go and the jobs that move its pieces. */
struct incoming {
    struct memkv_io *io;
    struct source src;
    char *rec;
    struct job *jobs;        /* one per piece: pull it (cma), then write it */
    uint64_t piece, npieces; /* npieces: pieces that hold payload */
    int kind;                /* JOB_WRITE (arena slot) or JOB_BEHIND (DRAM cache slot) */
    int split;               /* pieces first.. are pulled from the client by the copy pool */
    uint64_t first;          /* 0: the whole record is pulled ahead; 1: this thread takes piece 0 */
    uint64_t waited;         /* pulls [waited, npieces) may still be in flight */
};

/* cma PUT of a large block: its pieces are copied from the client by the copy pool at once (one
   thread's copy ran at ~4.8 GB/s here) while the socket thread hashes each in order as it lands.
   With write-behind, the next records of the batch (up to PULL_AHEAD_BYTES) are pulled while
   this one is hashed, small ones whole: the socket thread then only hashes them. */
#define PULL_SPLIT_MIN (4u << 20)
#define PULL_AHEAD_MAX 16
#define PULL_AHEAD_BYTES (16u << 20)

static int pull_start(struct batch *b, struct incoming *in, int ahead) {
    struct memkv_io *io = in->io;
    uint64_t end = MEMKV_REC_HDR + io->len;
    in->npieces = (end + in->piece - 1) / in->piece;
    int large = io->len >= PULL_SPLIT_MIN && in->npieces > 1;
    in->first = ahead && !large ? 0 : 1; /* a large record's piece 0 is hashed as it is taken */
    in->split = in->src.pid && (ahead || large);
    in->waited = in->first;
    if (!in->split) return 0;
    if (client_gone(in->src.sock)) {
        in->split = 0;
        return -ECONNRESET;
    }
    for (uint64_t q = in->first; q < in->npieces; q++) {
        uint64_t from = q ? q * in->piece : MEMKV_REC_HDR;
        uint64_t to = (q + 1) * in->piece < end ? (q + 1) * in->piece : end;
        submit(b, &in->jobs[q], JOB_PULL, io, in->src.pid, 0, in->rec + from, to - from,
               (off_t)(in->src.remote + from - MEMKV_REC_HDR));
    }
    return 0;
}

/* Pulls write into the record and reuse its jobs: none may be left behind. */
static void pull_wait(struct batch *b, struct incoming *in) {
    for (uint64_t q = in->waited; in->split && q < in->npieces; q++) wait_job(b, &in->jobs[q]);
    in->waited = in->npieces;
}

/* Receive one block's payload into its record buffer (pull_start came first), hashing it step by
   step while it is in cache, and hand each complete piece but the first (it holds the header) and
   the last (its padding) to the disk pool as soon as it has arrived; those two follow once the
   checksum is known. */
static int put_record(struct batch *b, struct incoming *in) {
    struct memkv_io *io = in->io;
    char *rec = in->rec;
    struct job *jobs = in->jobs;
    uint64_t piece = in->piece, end = MEMKV_REC_HDR + io->len, reclen = record_len(io->len);
    int kind = in->kind, rc = 0;
    struct memkv_hstate hs;
    memkv_hs_reset(&hs);
    io->result = MEMKV_RES_OK; /* a failed piece write turns it into MEMKV_RES_IO */
    uint64_t pos = MEMKV_REC_HDR;
    for (uint64_t k = 0; pos < end; k++) {
        uint64_t pend = (k + 1) * piece < end ? (k + 1) * piece : end;
        int pulled = in->split && k >= in->first;
        if (pulled) {
            wait_job(b, &jobs[k]);
            in->waited = k + 1;
            if ((rc = jobs[k].err)) goto out;
        }
        while (pos < pend) {
            uint64_t step = pend - pos < HASH_STEP ? pend - pos : HASH_STEP;
            if (!pulled && (rc = take(&in->src, rec + pos, pos - MEMKV_REC_HDR, step))) goto out;
            memkv_hs_update(&hs, rec + pos, step);
            if (io->fill && kind == JOB_WRITE) /* into the DRAM cache while the step is still in the CPU cache */
                memcpy((char *)(uintptr_t)io->fill + (pos - MEMKV_REC_HDR), rec + pos, step);
            pos += step;
        }
        if (k > 0 && (k + 1) * piece < reclen)
            submit(b, &jobs[k], kind, io, io->fd, 1, rec + k * piece, piece, (off_t)(io->off + k * piece));
    }
    io->csum = memkv_hs_digest(&hs);
    fill_header((struct memkv_rec_hdr *)rec, io);
    memset(rec + end, 0, reclen - end);
    uint64_t last = (reclen - 1) / piece;
    if (last > 0)
        submit(b, &jobs[last], kind, io, io->fd, 1, rec + last * piece, reclen - last * piece,
               (off_t)(io->off + last * piece));
    submit(b, &jobs[0], kind, io, io->fd, 1, rec, reclen < piece ? reclen : piece, (off_t)io->off);
    return 0;
out:
    pull_wait(b, in);
    if (rc == -EFAULT && in->src.pid) { /* no header is written: the record never becomes valid */
        io->result = MEMKV_RES_FAULT;
        return 0;
    }
    return rc;
}

/* Size the arena's slots and job room for the records of `action` in this batch. */
struct plan {
    uint64_t slot, piece; /* bytes per slot; bytes per disk piece */
    uint32_t nslots, per; /* slots in flight; pieces (jobs) per slot */
    struct job *jobs;     /* nslots * per jobs, all idle */
};

static int plan_slots(struct memkv_arena *a, const struct memkv_io *ios, uint32_t n, uint8_t action,
                      struct plan *p) {
    uint32_t count;
    p->slot = record_len(max_store_len(ios, n, action, &count));
    p->nslots = 0;
    int rc = count ? arena_slots(a, p->slot, count, &p->nslots) : 0;
    if (rc) return rc;
    p->piece = piece_size(p->slot);
    p->per = (uint32_t)((p->slot + p->piece - 1) / p->piece);
    p->jobs = arena_jobs(a, (size_t)p->nslots * p->per);
    return p->nslots && !p->jobs ? -ENOMEM : 0;
}

static int stored(const struct memkv_io *io) {
    return io->action == MEMKV_ACT_STORE || io->action == MEMKV_ACT_BEHIND;
}

/* A write-behind record moves in pieces sized for its own length (it has no arena slot). */
static uint64_t behind_piece(const struct memkv_io *io) {
    return piece_size(record_len(io->len));
}

/* Descriptor i of a batch, to be received into its DRAM cache slot (BEHIND). */
static struct incoming behind_incoming(struct memkv_io *ios, uint32_t i, int sock, int pid,
                                       const uint64_t *peer, struct behind_rec **wbs) {
    struct memkv_io *io = &ios[i];
    return (struct incoming){io, {sock, pid, pid ? peer[i] : 0}, (char *)(uintptr_t)io->fill,
                             wbs[i]->jobs, behind_piece(io), 0, JOB_BEHIND};
}

/* A write-behind record per BEHIND descriptor, all or none (then: -ENOMEM, results untouched).
   A started one is marked by result IO until put_record sets it; it is always reported. */
static int behind_start(struct memkv_behind *q, struct memkv_io *ios, uint32_t n,
                        struct behind_rec ***out) {
    *out = NULL;
    uint32_t count = 0;
    for (uint32_t i = 0; i < n; i++) count += ios[i].action == MEMKV_ACT_BEHIND;
    if (!count) return 0;
    if (!q) return -EINVAL;
    struct behind_rec **wbs = calloc(n, sizeof *wbs);
    if (!wbs) return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        if (ios[i].action != MEMKV_ACT_BEHIND) continue;
        uint64_t reclen = record_len(ios[i].len), piece = behind_piece(&ios[i]);
        if (!(wbs[i] = behind_new(q, ios[i].seq, (uint32_t)((reclen + piece - 1) / piece)))) {
            for (uint32_t k = 0; k < i; k++) free(wbs[k]);
            free(wbs);
            return -ENOMEM;
        }
    }
    for (uint32_t i = 0; i < n; i++)
        if (wbs[i]) ios[i].result = MEMKV_RES_IO;
    *out = wbs;
    return 0;
}

static int server_put(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                      const uint64_t *peer, struct memkv_behind *q);
static int server_get(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                      const uint64_t *peer);

int memkv_server_put(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                     const uint64_t *peer, struct memkv_behind *q) {
    return arena_done(a, server_put(sock, a, ios, n, pid, peer, q));
}

int memkv_server_get(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                     const uint64_t *peer) {
    return arena_done(a, server_get(sock, a, ios, n, pid, peer));
}

static int server_put(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                      const uint64_t *peer, struct memkv_behind *q) {
    struct plan pl;
    int rc = plan_slots(a, ios, n, MEMKV_ACT_STORE, &pl);
    if (rc) return rc;
    uint64_t slot = pl.slot, piece = pl.piece;
    uint32_t nslots = pl.nslots, per = pl.per;
    struct job *jobs = pl.jobs;
    uint64_t *trailer = pid ? NULL : malloc(sizeof(uint64_t) * (n ? n : 1)); /* cma: none */
    if (!pid && !trailer) return -ENOMEM;
    struct behind_rec **wbs;
    if ((rc = behind_start(q, ios, n, &wbs))) {
        free(trailer);
        return rc;
    }
    struct batch b = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    uint32_t next = 0;
    int fatal = 0;
    struct incoming cur = {0};
    struct incoming ahead[PULL_AHEAD_MAX]; /* write-behind records whose pulls started, in order */
    uint32_t ahead_head = 0, ahead_n = 0, last_queued = 0;
    uint64_t ahead_bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct memkv_io *io = &ios[i];
        if (!stored(io)) {
            if (!fatal && !pid) fatal = drain(sock, a, io->len);
            continue;
        }
        if (ahead_n && ahead[ahead_head].io == io) {
            cur = ahead[ahead_head];
            ahead_head = (ahead_head + 1) % PULL_AHEAD_MAX;
            ahead_n--;
            ahead_bytes -= io->len;
        } else if (!fatal) {
            if (io->action == MEMKV_ACT_BEHIND) {
                cur = behind_incoming(ios, i, sock, pid, peer, wbs);
            } else {
                uint32_t s = next++ % nslots;
                struct job *sj = &jobs[(size_t)s * per];
                for (uint32_t k = 0; k < per; k++) wait_job(&b, &sj[k]); /* its last record is on disk */
                cur = (struct incoming){io, {sock, pid, pid ? peer[i] : 0}, (char *)a->mem + (size_t)s * slot,
                                        sj, piece, 0, JOB_WRITE};
            }
            fatal = pull_start(&b, &cur, 0);
        } else {
            cur.io = NULL;
        }
        /* cma into DRAM: the next records are pulled while this one is hashed */
        if (last_queued < i + 1) last_queued = i + 1;
        while (!fatal && pid && ahead_n < PULL_AHEAD_MAX && ahead_bytes < PULL_AHEAD_BYTES) {
            uint32_t j = last_queued;
            while (j < n && !stored(&ios[j])) j++;
            if (j >= n || ios[j].action != MEMKV_ACT_BEHIND) break;
            struct incoming *in = &ahead[(ahead_head + ahead_n) % PULL_AHEAD_MAX];
            *in = behind_incoming(ios, j, sock, pid, peer, wbs);
            ahead_n++;
            ahead_bytes += ios[j].len;
            last_queued = j + 1;
            fatal = pull_start(&b, in, 1);
        }
        if (!fatal) fatal = put_record(&b, &cur);
        else if (cur.io == io) pull_wait(&b, &cur);
        if (io->action == MEMKV_ACT_BEHIND) /* the submitter lets go; a record it gave up on fails */
            behind_drop(wbs[i], fatal || io->result != MEMKV_RES_OK ? -ECANCELED : 0);
    }
    for (; ahead_n; ahead_n--, ahead_head = (ahead_head + 1) % PULL_AHEAD_MAX)
        pull_wait(&b, &ahead[ahead_head]); /* a fatal error left them behind */
    free(wbs);
    /* the client's checksums follow the payloads: it hashes each block right after sending it.
       With cma there is no wire to protect: the server hashes what it copied, as it copies; and
       a client still connected after the last copy held its buffers through all of them. */
    if (!fatal && !pid) fatal = memkv_recv_all(sock, trailer, sizeof(uint64_t) * n);
    if (!fatal && pid && client_gone(sock)) fatal = -ECONNRESET;
    for (size_t k = 0; k < (size_t)nslots * per; k++) wait_job(&b, &jobs[k]);
    for (uint32_t i = 0; i < n; i++) {
        struct memkv_io *io = &ios[i];
        if (!stored(io)) continue;
        if (fatal) {
            io->result = MEMKV_RES_IO; /* the batch is not acknowledged; nothing is committed */
            continue;
        }
        if (io->result == MEMKV_RES_IO) {
            io->status = MEMKV_ST_IO_ERROR;
        } else if (io->result == MEMKV_RES_FAULT) {
            io->status = MEMKV_ST_BAD_REQUEST;
        } else if (!pid && io->csum != trailer[i]) {
            io->result = MEMKV_RES_BAD_CSUM;
            io->status = MEMKV_ST_CHECKSUM_MISMATCH;
        } else {
            io->status = MEMKV_ST_OK;
        }
    }
    free(trailer);
    return fatal;
}

/* ---- server GET ------------------------------------------------------------------------------ */
static int server_get(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                      const uint64_t *peer) {
    struct plan pl;
    int rc = plan_slots(a, ios, n, MEMKV_ACT_LOAD, &pl);
    if (rc) return rc;
    uint64_t slot = pl.slot, piece = pl.piece;
    uint32_t nslots = pl.nslots, per = pl.per;
    struct job *jobs = pl.jobs;
    struct slot_state ss[64];
    struct batch b = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    uint32_t sub = 0; /* next descriptor to consider for read-ahead */
    /* Give slot s the next LOAD descriptor not yet submitted: its pieces are read in parallel (in
       order, so the pool finishes the earliest block first); the last one to land verifies it. */
    #define FEED(s)                                                                            \
        do {                                                                                   \
            while (sub < n && ios[sub].action != MEMKV_ACT_LOAD) sub++;                        \
            if (sub < n) {                                                                     \
                struct memkv_io *fio = &ios[sub++];                                            \
                char *rec = (char *)a->mem + (size_t)(s) * slot;                               \
                uint64_t reclen = record_len(fio->len);                                        \
                uint32_t np = (uint32_t)((reclen + piece - 1) / piece);                        \
                ss[s] = (struct slot_state){fio, np, 0, 0};                                    \
                for (uint32_t k = 0; k < np; k++) {                                            \
                    struct job *fj = &jobs[(size_t)(s) * per + k];                             \
                    uint64_t o = k * piece, l = reclen - o < piece ? reclen - o : piece;       \
                    fj->slot = &ss[s]; /* before submit: the pool may run it at once */        \
                    fj->rec = rec;                                                             \
                    submit(&b, fj, JOB_READ, fio, fio->fd, 0, rec + o, l, (off_t)(fio->off + o)); \
                }                                                                              \
            } else {                                                                           \
                ss[s].ready = 1;                                                               \
            }                                                                                  \
        } while (0)
    for (uint32_t s = 0; s < nslots; s++) FEED(s);
    uint32_t next = 0;
    int fatal = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct memkv_io *io = &ios[i];
        struct memkv_get_rep rep = {0};
        struct iovec iov[2] = {{&rep, sizeof rep}, {NULL, 0}};
        int cnt = 1;
        uint32_t s = 0;
        if (io->action == MEMKV_ACT_LOAD) {
            s = next++ % nslots;
            pthread_mutex_lock(&b.mu);
            while (!ss[s].ready) pthread_cond_wait(&b.cv, &b.mu);
            pthread_mutex_unlock(&b.mu);
            /* anything but a verified record is a miss for the client: never wrong bytes */
            io->status = io->result == MEMKV_RES_OK ? MEMKV_ST_OK : MEMKV_ST_MISS;
            if (io->result == MEMKV_RES_OK) {
                rep.len = io->len;
                rep.csum = io->csum;
                iov[1].iov_base = (char *)a->mem + (size_t)s * slot + MEMKV_REC_HDR;
                iov[1].iov_len = io->len;
                cnt = 2;
            }
        } else if (io->action == MEMKV_ACT_RAM) {
            io->result = MEMKV_RES_OK;
            rep.len = io->len;
            rep.csum = io->csum;
            iov[1].iov_base = (void *)(uintptr_t)io->ram;
            iov[1].iov_len = io->len;
            cnt = 2;
        }
        if (pid && cnt == 2) { /* cma: the payload goes straight into the client's buffer */
            if (io->len > io->cap) fatal = -EFAULT; /* the index checked it; never overrun */
            else fatal = client_gone(sock) ? -ECONNRESET : cma_push_split(a, &b, pid, iov[1].iov_base, peer[i], io->len);
            if (fatal == -EFAULT) {
                fatal = 0;
                io->result = MEMKV_RES_FAULT;
                io->status = MEMKV_ST_BAD_REQUEST;
                rep.len = rep.csum = 0;
            }
            cnt = 1;
        }
        rep.status = io->status;
        if (!fatal) fatal = memkv_send_iov(sock, iov, cnt);
        if (fatal) break; /* the client is gone; results of the rest stay PRESET */
        if (io->action == MEMKV_ACT_LOAD) FEED(s);
    }
    #undef FEED
    pthread_mutex_lock(&b.mu); /* no job may outlive this frame: wait for every piece and verify */
    for (uint32_t s = 0; s < nslots; s++)
        while (!ss[s].ready) pthread_cond_wait(&b.cv, &b.mu);
    pthread_mutex_unlock(&b.mu);
    return fatal;
}

/* ---- ceiling measurement ---------------------------------------------------------------------- */
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

double memkv_disk_seq(const char *path, uint64_t block, uint64_t total, int write, int depth) {
    if (depth < 1 || depth > 64 || block % MEMKV_ALIGN) return -EINVAL;
    int rc = memkv_io_start(depth);
    if (rc) return rc;
    int fd = open(path, O_RDWR | O_CREAT | O_DIRECT, 0600);
    if (fd < 0) return -errno;
    if (write && fallocate(fd, 0, 0, (off_t)total) && errno != EOPNOTSUPP) {
        int e = errno;
        close(fd);
        return -e;
    }
    void *mem = NULL;
    if (posix_memalign(&mem, MEMKV_ALIGN, (size_t)(block * (uint64_t)depth))) {
        close(fd);
        return -ENOMEM;
    }
    memset(mem, 0x5a, (size_t)(block * (uint64_t)depth));
    struct job jobs[64];
    struct batch b = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    for (int s = 0; s < depth; s++) jobs[s].busy = jobs[s].err = 0;
    int err = 0;
    double t0 = now();
    uint64_t n = total / block;
    for (uint64_t i = 0; i < n; i++) {
        int s = (int)(i % (uint64_t)depth);
        wait_job(&b, &jobs[s]);
        if (jobs[s].err) err = jobs[s].err;
        submit(&b, &jobs[s], JOB_RAW, NULL, fd, write, (char *)mem + (size_t)s * block, block, (off_t)(i * block));
    }
    for (int s = 0; s < depth; s++) {
        wait_job(&b, &jobs[s]);
        if (jobs[s].err) err = jobs[s].err;
    }
    if (write && !err && fdatasync(fd)) err = -errno;
    double dt = now() - t0;
    free(mem);
    close(fd);
    return err ? (double)err : dt;
}
