/* Checksums, placement, descriptor tables and the client's socket data path.
 * Called from Python through cffi with the GIL released; never touches Python objects. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "memkv.h"
#include "memkv_hash.h"

#ifndef MEMKV_VERSION
#error "MEMKV_VERSION must be defined by the build"
#endif

const char *memkv_native_version(void) { return MEMKV_VERSION; }

uint64_t memkv_xxh3(const void *p, size_t n, uint64_t seed) { return XXH3_64bits_withSeed(p, n, seed); }

void memkv_xxh3_many(uint32_t n, const uint64_t *ptrs, const uint64_t *lens, uint64_t *out) {
    for (uint32_t i = 0; i < n; i++)
        out[i] = memkv_h64((const void *)(uintptr_t)ptrs[i], lens[i]);
}

void memkv_rendezvous(uint32_t n, const uint8_t *keys, const uint16_t *key_lens,
                      uint32_t n_servers, const uint64_t *seeds, uint32_t *out) {
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t best = 0;
        uint32_t pick = 0;
        for (uint32_t j = 0; j < n_servers; j++) {
            uint64_t score = XXH3_64bits_withSeed(keys + off, key_lens[i], seeds[j]);
            if (j == 0 || score > best) {
                best = score;
                pick = j;
            }
        }
        out[i] = pick;
        off += key_lens[i];
    }
}

uint64_t memkv_build_descs(uint32_t n, const uint16_t *key_lens, const uint64_t *lens,
                           const uint64_t *csums, struct memkv_req_desc *out) {
    uint64_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        out[i].len = lens ? lens[i] : 0;
        out[i].csum = csums ? csums[i] : 0;
        out[i].key_off = (uint32_t)off;
        out[i].key_len = key_lens[i];
        out[i].reserved = 0;
        off += key_lens[i];
    }
    return off;
}

int memkv_check_descs(const struct memkv_req_desc *d, uint32_t n, uint32_t keys_len,
                      uint64_t min_len, uint64_t max_len, uint64_t *payload_total,
                      char *err, size_t err_len) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (d[i].key_len == 0 || d[i].key_len > MEMKV_MAX_KEY) {
            snprintf(err, err_len, "descriptor %u: key length %u outside 1..%d", i, d[i].key_len,
                     MEMKV_MAX_KEY);
            return -1;
        }
        if ((uint64_t)d[i].key_off + d[i].key_len > keys_len) {
            snprintf(err, err_len, "descriptor %u: key [%u, +%u) beyond the %u-byte keys blob", i,
                     d[i].key_off, d[i].key_len, keys_len);
            return -1;
        }
        if (d[i].len < min_len || d[i].len > max_len) {
            snprintf(err, err_len, "descriptor %u: length %llu outside the server's %llu..%llu", i,
                     (unsigned long long)d[i].len, (unsigned long long)min_len,
                     (unsigned long long)max_len);
            return -1;
        }
        total += d[i].len;
    }
    *payload_total = total;
    return 0;
}

int memkv_send_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t k = send(fd, p, len, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

int memkv_recv_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t k = recv(fd, p, len, MSG_WAITALL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (k == 0) return -ECONNRESET; /* peer closed mid-frame */
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

/* Send an iovec array completely (advances through partial writes); iov is modified. */
int memkv_send_iov(int fd, struct iovec *iov, int cnt) {
    while (cnt > 0) {
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = cnt > IOV_MAX ? IOV_MAX : cnt;
        ssize_t k = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        while (cnt > 0 && (size_t)k >= iov->iov_len) {
            k -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (char *)iov->iov_base + k;
            iov->iov_len -= (size_t)k;
        }
    }
    return 0;
}

/* Payloads are sent and hashed in segments of about SEG bytes (small blocks share one sendmsg,
   large ones are split): each segment is hashed right after the kernel copied it, while it is
   still in cache and while the receiver drains the socket. */
enum { SEG = 1 << 20 };

int memkv_client_put(int fd, const void *head, size_t head_len, uint32_t n,
                     const uint64_t *ptrs, const uint64_t *lens, uint64_t *csums) {
    enum { CHUNK = 256 };
    struct iovec iov[CHUNK];
    struct { uint32_t blk; uint64_t off, len; } seg[CHUNK];
    struct memkv_hstate hs;
    int rc = memkv_send_all(fd, head, head_len);
    uint32_t i = 0;  /* next block to send ... */
    uint64_t at = 0; /* ... from this offset */
    while (!rc && i < n) {
        int cnt = 0;
        uint64_t bytes = 0;
        while (i < n && cnt < CHUNK && bytes < SEG) {
            uint64_t take = lens[i] - at;
            if (take > SEG - bytes) take = SEG - bytes;
            if (lens[i] == 0) {
                csums[i] = memkv_h64(NULL, 0);
            } else {
                iov[cnt].iov_base = (char *)(uintptr_t)ptrs[i] + at;
                iov[cnt].iov_len = take;
                seg[cnt].blk = i;
                seg[cnt].off = at;
                seg[cnt++].len = take;
            }
            bytes += take;
            at += take;
            if (at == lens[i]) {
                i++;
                at = 0;
            }
        }
        rc = memkv_send_iov(fd, iov, cnt);
        for (int k = 0; k < cnt && !rc; k++) {
            const char *p = (const char *)(uintptr_t)ptrs[seg[k].blk] + seg[k].off;
            uint64_t blen = lens[seg[k].blk];
            if (seg[k].len == blen) {
                csums[seg[k].blk] = memkv_h64(p, blen);
                continue;
            }
            if (seg[k].off == 0) memkv_hs_reset(&hs);
            memkv_hs_update(&hs, p, seg[k].len);
            if (seg[k].off + seg[k].len == blen) csums[seg[k].blk] = memkv_hs_digest(&hs);
        }
    }
    return rc ? rc : memkv_send_all(fd, csums, sizeof(uint64_t) * n);
}

int memkv_client_get(int fd, const void *head, size_t head_len, uint32_t n,
                     const uint64_t *ptrs, const uint64_t *caps, int verify, int cma,
                     struct memkv_frame_hdr *rep, uint8_t *status, uint64_t *lens) {
    int rc = memkv_send_all(fd, head, head_len);
    if (rc) return rc;
    rc = memkv_recv_all(fd, rep, sizeof *rep);
    if (rc) return rc;
    if (rep->magic != MEMKV_WIRE_MAGIC) return -EPROTO;
    if (rep->op != MEMKV_OP_GET || rep->status != MEMKV_ST_OK) return 1;
    if (rep->count != n) return -EPROTO;
    struct memkv_hstate hs;
    for (uint32_t i = 0; i < n; i++) {
        struct memkv_get_rep r;
        rc = memkv_recv_all(fd, &r, sizeof r);
        if (rc) return rc;
        status[i] = r.status;
        lens[i] = 0;
        if (r.status != MEMKV_ST_OK) continue;
        if (r.len > caps[i]) return -EPROTO; /* server must never overrun a buffer */
        char *dst = (char *)(uintptr_t)ptrs[i];
        if (cma) { /* the server already copied it here; check it while the next one is copied */
            if (verify && memkv_h64(dst, r.len) != r.csum) status[i] = MEMKV_ST_CHECKSUM_MISMATCH;
        } else if (!verify || r.len <= SEG) {
            rc = memkv_recv_all(fd, dst, r.len);
            if (rc) return rc;
            if (verify && memkv_h64(dst, r.len) != r.csum) status[i] = MEMKV_ST_CHECKSUM_MISMATCH;
        } else { /* hash each segment as it lands, while it is in cache */
            memkv_hs_reset(&hs);
            for (uint64_t at = 0; at < r.len;) {
                uint64_t k = r.len - at < SEG ? r.len - at : SEG;
                rc = memkv_recv_all(fd, dst + at, k);
                if (rc) return rc;
                memkv_hs_update(&hs, dst + at, k);
                at += k;
            }
            if (memkv_hs_digest(&hs) != r.csum) status[i] = MEMKV_ST_CHECKSUM_MISMATCH;
        }
        lens[i] = r.len;
    }
    return 0;
}
