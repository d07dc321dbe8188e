/* memkv native layer: the wire structs, the on-disk record header and the C entry points.
 *
 * This header is the C side of the single source of truth: memkv_nixl/protocol.py (wire) and
 * memkv_nixl/diskformat.py (disk) mirror these layouts with explicit little-endian struct
 * formats, and tests/test_formats.py asserts that both sides agree byte for byte.
 * All integers are little-endian (every supported host — x86-64, ARM64 — is).
 */
#ifndef MEMKV_H
#define MEMKV_H

#include <stdint.h>
#include <stddef.h>

/* ---- wire ------------------------------------------------------------------------------- */
#define MEMKV_WIRE_MAGIC 0x31564B4D /* "MKV1" */
#define MEMKV_MAX_KEY 128
#define MEMKV_WIRE_VERSION 2 /* 2: cma, and the server id + unix path after the CHALLENGE */
#define MEMKV_PUT_REPLACE 1 /* PUT frame flag: replace committed keys (file-shaped region mode) */
/* PUT/GET frame flag, on connections that negotiated cma: the payloads are not in the stream; a
   table of `count` u64 caller addresses follows the keys, and the server copies with
   process_vm_readv (PUT) / process_vm_writev (GET) in the caller's process. */
#define MEMKV_FLAG_CMA 2
/* HELLO flag: the client asks for cma; 16 bytes follow the namespace: the address of 8 bytes in
   its memory and their value, which the server reads back to prove it can reach that memory. */
#define MEMKV_HELLO_CMA 1
/* CHALLENGE features byte: cma granted on this connection. */
#define MEMKV_FEATURE_CMA 1
/* After the 64-byte CHALLENGE: a random id of the server process, then the path of its unix
   socket (up to the body's end; empty when it has none). A TCP client on the same host moves to
   that socket when the server behind it has the same id. */
#define MEMKV_SERVER_ID_LEN 16
#define MEMKV_MAX_UNIX_PATH 107

enum memkv_op {
    MEMKV_OP_HELLO = 1, MEMKV_OP_AUTH = 2, MEMKV_OP_PUT = 3, MEMKV_OP_GET = 4, MEMKV_OP_EXISTS = 5,
    MEMKV_OP_DELETE = 6, MEMKV_OP_PIN = 7, MEMKV_OP_UNPIN = 8, MEMKV_OP_STATS = 9, MEMKV_OP_ERROR = 15,
};

/* Per-descriptor and per-frame statuses on the wire (Python: memkv_nixl.protocol.Status). */
enum memkv_status {
    MEMKV_ST_OK = 0, MEMKV_ST_MISS = 1, MEMKV_ST_FULL = 2, MEMKV_ST_CHECKSUM_MISMATCH = 3,
    MEMKV_ST_BAD_LENGTH = 4, MEMKV_ST_BAD_KEY = 5, MEMKV_ST_IO_ERROR = 6, MEMKV_ST_UNREACHABLE = 7,
    MEMKV_ST_AUTH_FAILED = 8, MEMKV_ST_BAD_REQUEST = 9, MEMKV_ST_BUFFER_TOO_SMALL = 10,
    MEMKV_ST_VERSION_MISMATCH = 11, MEMKV_ST_SERVER_ERROR = 12,
};

/* Every frame, both directions, starts with this header. */
struct memkv_frame_hdr {
    uint32_t magic;
    uint8_t op;
    uint8_t status;     /* replies: frame-level status (OK or why the whole request failed) */
    uint16_t flags;
    uint32_t count;     /* descriptors in this frame */
    uint32_t keys_len;  /* bytes of the concatenated keys that follow the descriptor table */
    uint64_t req_id;
    uint64_t body_len;  /* bytes after the header; 0 for a streamed GET reply */
};

/* Request descriptor; `count` of them follow the header, then the keys blob, then (PUT) the
   payloads and a trailer of `count` uint64 xxh3-64 checksums, one per payload. */
struct memkv_req_desc {
    uint64_t len;       /* PUT: payload bytes; GET: capacity of the caller's buffer */
    uint64_t csum;      /* reserved, 0 (PUT checksums travel in the trailer after the payloads) */
    uint32_t key_off;   /* offset into the keys blob */
    uint16_t key_len;
    uint16_t reserved;
};

/* GET reply: one per descriptor, each followed by `len` payload bytes when status is OK. */
struct memkv_get_rep {
    uint8_t status;
    uint8_t reserved[7];
    uint64_t len;
    uint64_t csum;
};

/* ---- disk -------------------------------------------------------------------------------- */
#define MEMKV_REC_MAGIC 0x52564B4D /* "MKVR" */
#define MEMKV_REC_VERSION 1
#define MEMKV_REC_HDR 256
#define MEMKV_ALIGN 4096

/* Written in front of every stored block, in the same O_DIRECT write as its payload. */
struct memkv_rec_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t key_len;
    uint32_t ns_id;
    uint32_t reserved;
    uint64_t seq;
    uint64_t len;
    uint64_t csum;      /* xxh3-64 of the payload */
    uint8_t key[MEMKV_MAX_KEY];
    uint8_t pad[80];    /* header is exactly MEMKV_REC_HDR bytes */
    uint64_t hdr_csum;  /* xxh3-64 of all bytes before it */
};

/* ---- server data path ---------------------------------------------------------------------- */
/* What the server does with one descriptor's bytes. */
enum memkv_action {
    MEMKV_ACT_STORE = 0, /* PUT: receive payload, verify checksum, write the record */
    MEMKV_ACT_DRAIN = 1, /* PUT: receive and discard (duplicate or refused); status preset */
    MEMKV_ACT_LOAD = 2,  /* GET: read the record, verify it, send it */
    MEMKV_ACT_REPLY = 3, /* GET: send only the preset status */
    MEMKV_ACT_RAM = 4,   /* GET: send the payload from the DRAM cache (io->ram, verified when cached) */
    MEMKV_ACT_BEHIND = 5, /* PUT (async durability): assemble the record in the DRAM cache slot at
                             io->fill and write it from there in the background (write-behind) */
};

/* Per-descriptor result codes the server's Python side acts on (not sent on the wire). */
enum memkv_result {
    MEMKV_RES_OK = 0,
    MEMKV_RES_BAD_CSUM = 1,  /* PUT: payload does not match the client's checksum */
    MEMKV_RES_IO = 2,        /* disk read/write failed */
    MEMKV_RES_STALE = 3,     /* GET: header names another block (slot overwritten) */
    MEMKV_RES_CORRUPT = 4,   /* GET: header or payload checksum mismatch */
    MEMKV_RES_PRESET = 5,    /* nothing done; the preset wire status was used */
    MEMKV_RES_FAULT = 6,     /* cma: the caller's buffer could not be read or written */
};

/* One descriptor's disk side, filled by the server's index before the C call. */
struct memkv_io {
    int32_t fd;          /* data file, opened O_DIRECT */
    uint32_t ns_id;
    uint64_t off;        /* record offset in the file (4 KiB aligned) */
    uint64_t len;        /* payload bytes */
    uint64_t csum;       /* PUT: computed by the server as it writes; GET: from the index */
    uint64_t seq;
    uint64_t cap;        /* GET: caller capacity (already checked by the index) */
    const uint8_t *key;  /* borrowed for the duration of the call */
    uint16_t key_len;
    uint8_t action;      /* enum memkv_action */
    uint8_t status;      /* in: preset wire status for DRAIN/REPLY; out: wire status sent/acked */
    uint8_t result;      /* out: enum memkv_result */
    uint8_t reserved[3];
    uint64_t ram;        /* ACT_RAM: address of the cached payload */
    uint64_t fill;       /* LOAD/STORE: where to copy the payload for the DRAM cache, or 0;
                            BEHIND: the 4 KiB aligned cache slot that holds the whole record */
};

struct memkv_arena; /* one connection's request state; its staging buffer comes from a shared pool */
struct memkv_behind; /* one store's queue of finished write-behind records */

/* ---- entry points (return 0 or a negative errno unless stated) ------------------------------ */
/* Version of the C sources, compared with the package version at import (stale builds fail). */
const char *memkv_native_version(void);

/* xxh3-64 of a buffer. */
uint64_t memkv_xxh3(const void *p, size_t n, uint64_t seed);
/* xxh3-64 of n caller buffers (ptrs[i], lens[i]) into out[i]. */
void memkv_xxh3_many(uint32_t n, const uint64_t *ptrs, const uint64_t *lens, uint64_t *out);
/* Rendezvous placement: out[i] = index of the server with the highest xxh3(key_i, seed_j). */
void memkv_rendezvous(uint32_t n, const uint8_t *keys, const uint16_t *key_lens,
                      uint32_t n_servers, const uint64_t *seeds, uint32_t *out);
/* Fill n request descriptors (keys packed back to back in order); returns the keys blob size. */
uint64_t memkv_build_descs(uint32_t n, const uint16_t *key_lens, const uint64_t *lens,
                           const uint64_t *csums, struct memkv_req_desc *out);
/* Validate a received descriptor table; 0 when sound, else -1 with a message in err (caller's buffer).
   Lengths must lie in [min_len, max_len]; *payload_total gets the sum of lens. */
int memkv_check_descs(const struct memkv_req_desc *d, uint32_t n, uint32_t keys_len,
                      uint64_t min_len, uint64_t max_len, uint64_t *payload_total,
                      char *err, size_t err_len);

/* Blocking socket helpers (fd is a blocking socket; timeouts come from SO_RCVTIMEO/SO_SNDTIMEO). */
int memkv_send_all(int fd, const void *buf, size_t len);
int memkv_recv_all(int fd, void *buf, size_t len);

/* Client PUT: send head (header + descriptors + keys), each caller buffer, then the trailer of
   xxh3 checksums (also written to csums[i]), in one stream. (cma: memkv_conn_put sends the
   address table instead.) */
int memkv_client_put(int fd, const void *head, size_t head_len, uint32_t n,
                     const uint64_t *ptrs, const uint64_t *lens, uint64_t *csums);
/* Client GET: send head (for cma, with the address table), receive the reply header into *rep;
   when it is a GET reply with status OK, receive each block straight into ptrs[i] (capacity
   caps[i]) or, with cma, find it already copied there; optionally verify its checksum.
   Returns 0 when blocks were received, 1 when *rep is an error frame (its body is still unread). */
int memkv_client_get(int fd, const void *head, size_t head_len, uint32_t n,
                     const uint64_t *ptrs, const uint64_t *caps, int verify, int cma,
                     struct memkv_frame_hdr *rep, uint8_t *status, uint64_t *lens);

/* Start the shared O_DIRECT I/O thread pool (idempotent). */
int memkv_io_start(int nthreads);
/* Staging memory of all connections together (aligned buffers, held only while a request runs):
   returned buffers are kept for reuse while at most `bytes` is allocated in all. */
void memkv_staging_limit(uint64_t bytes);
/* Bytes of staging memory allocated now, and of those the ones kept free for reuse. */
void memkv_staging_stats(uint64_t *allocated, uint64_t *kept);
/* Request state of one connection; budget = staging bytes a request may use for blocks in flight. */
struct memkv_arena *memkv_arena_new(uint64_t budget);
void memkv_arena_free(struct memkv_arena *a);
/* Server PUT: receive the payloads of ios[0..n) and write STORE records to disk, overlapping
   network and disk. Per-descriptor outcome in ios[i].status/result. With pid != 0 (cma) the
   payloads are copied from addresses peer[i] in process pid instead of the socket.
   BEHIND records are only started: their writes finish later and are reported, one per record,
   by memkv_behind_wait on q. A BEHIND io whose result is still PRESET on return (its buffers
   could not be allocated) was not started and is never reported. */
int memkv_server_put(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                     const uint64_t *peer, struct memkv_behind *q);
struct memkv_behind *memkv_behind_new(void);
void memkv_behind_free(struct memkv_behind *q); /* only once every started record was reported */
/* Wait up to timeout_ms for finished write-behind records: up to max (seq, 0 or negative errno)
   pairs into seqs/errs; returns how many. */
uint32_t memkv_behind_wait(struct memkv_behind *q, uint64_t *seqs, int32_t *errs, uint32_t max,
                           int timeout_ms);
/* Server GET: read LOAD records ahead, verify header and checksum, stream replies to sock.
   With pid != 0 (cma) each payload is copied to peer[i] in process pid; only replies are sent. */
int memkv_server_get(int sock, struct memkv_arena *a, struct memkv_io *ios, uint32_t n, int pid,
                     const uint64_t *peer);
/* Drop CAP_SYS_PTRACE from the effective set (before any thread starts): cma then reaches only
   what the kernel lets the server's own user reach. */
int memkv_cma_harden(void);
/* cma handshake: 0 when the 8 bytes at addr in process pid hold `expect`, else a negative errno
   (-EACCES: they differ). */
int memkv_cma_probe(int pid, uint64_t addr, uint64_t expect);

/* Ceiling measurement: sequential O_DIRECT write (write=1) or read of total bytes in blocks of
   `block` with `depth` in flight on the pool; returns seconds, or a negative errno. */
double memkv_disk_seq(const char *path, uint64_t block, uint64_t total, int write, int depth);

#endif
