/* A client connection in C: connect, handshake (HMAC-SHA256 via OpenSSL) and batched requests.
 * Used by the NIXL plugin, which must work in processes without Python. Blocking sockets with
 * kernel timeouts; every function returns 0, a negative errno (connection unusable: close it),
 * or 1 when the server answered with an ERROR frame (its text is in err). */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "memkv.h"
#include "memkv_conn.h"

#define MAC_LEN 32
#define NONCE_LEN 32
#define AUTH_LABEL "memkv-auth-v1"

static void set_err(char *err, size_t n, const char *fmt, const char *a, int b) {
    if (err && n) snprintf(err, n, fmt, a, b);
}

static void frame(struct memkv_frame_hdr *h, uint8_t op, uint16_t flags, uint32_t count,
                  uint32_t keys_len, uint64_t body_len) {
    memset(h, 0, sizeof *h);
    h->magic = MEMKV_WIRE_MAGIC;
    h->op = op;
    h->flags = flags;
    h->count = count;
    h->keys_len = keys_len;
    h->body_len = body_len;
}

/* After an ERROR frame header: read its text into err (the caller's buffer); returns 1. */
static int read_error_text(struct memkv_conn *c, const struct memkv_frame_hdr *h, char *err, size_t n) {
    char text[1024];
    size_t k = h->body_len < sizeof text - 1 ? h->body_len : sizeof text - 1;
    int rc = memkv_recv_all(c->fd, text, k);
    if (rc) return rc;
    text[k] = 0;
    c->last_status = h->status;
    if (err && n) snprintf(err, n, "%s", text);
    return 1;
}

/* Read an expected reply header; 1 with the server's text in err when it is an ERROR frame. */
static int read_reply(struct memkv_conn *c, uint8_t op, struct memkv_frame_hdr *h, char *err, size_t n) {
    int rc = memkv_recv_all(c->fd, h, sizeof *h);
    if (rc) return rc;
    if (h->magic != MEMKV_WIRE_MAGIC) return -EPROTO;
    if (h->op == MEMKV_OP_ERROR) return read_error_text(c, h, err, n);
    return h->op == op ? 0 : -EPROTO;
}

int memkv_conn_open(struct memkv_conn *c, const char *host, int port, const uint8_t *ns,
                    size_t ns_len, const uint8_t *secret, size_t secret_len, int timeout_ms,
                    char *err, size_t err_len) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai) {
        set_err(err, err_len, "cannot resolve %s (port %d)", host, port);
        return -EHOSTUNREACH;
    }
    int fd = -1, rc = -ECONNREFUSED;
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds connect() */
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        rc = -errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        set_err(err, err_len, "cannot connect to memkv server %s:%d", host, port);
        return rc;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;

    /* HELLO */
    uint8_t hello[32 + 8 + MEMKV_MAX_KEY];
    struct memkv_frame_hdr h;
    frame(&h, MEMKV_OP_HELLO, 0, 0, 0, 8 + ns_len);
    memcpy(hello, &h, sizeof h);
    uint16_t ver = MEMKV_WIRE_VERSION, nl = (uint16_t)ns_len;
    uint32_t flags = 0;
    memcpy(hello + 32, &ver, 2);
    memcpy(hello + 34, &nl, 2);
    memcpy(hello + 36, &flags, 4);
    memcpy(hello + 40, ns, ns_len);
    rc = memkv_send_all(fd, hello, 40 + ns_len);
    if (!rc) rc = read_reply(c, MEMKV_OP_HELLO, &h, err, err_len);
    /* CHALLENGE: version u16, auth u8, pad 5, max_block u64, min_block u64, max_batch u32, pad 4, nonce */
    uint8_t ch[64];
    if (!rc && h.body_len != sizeof ch) rc = -EPROTO;
    if (!rc) rc = memkv_recv_all(fd, ch, sizeof ch);
    if (rc) goto fail;
    memcpy(&c->max_block, ch + 8, 8);
    memcpy(&c->min_block, ch + 16, 8);
    memcpy(&c->max_batch, ch + 24, 4);
    if (ch[2] && !secret_len) {
        c->last_status = MEMKV_ST_AUTH_FAILED;
        set_err(err, err_len, "memkv server %s:%d requires a shared secret; pass secret_file= "
                "(the same file as the server's --secret-file)", host, port);
        rc = 1;
        goto fail;
    }
    uint8_t mac[MAC_LEN] = {0};
    if (secret_len) {
        uint8_t msg[sizeof AUTH_LABEL + NONCE_LEN + MEMKV_MAX_KEY];
        memcpy(msg, AUTH_LABEL, sizeof AUTH_LABEL); /* includes the NUL, as the server expects */
        memcpy(msg + sizeof AUTH_LABEL, ch + 32, NONCE_LEN);
        memcpy(msg + sizeof AUTH_LABEL + NONCE_LEN, ns, ns_len);
        unsigned int mlen = 0;
        if (!HMAC(EVP_sha256(), secret, (int)secret_len, msg, sizeof AUTH_LABEL + NONCE_LEN + ns_len,
                  mac, &mlen)) {
            rc = -EINVAL;
            goto fail;
        }
    }
    uint8_t auth[32 + MAC_LEN];
    frame(&h, MEMKV_OP_AUTH, 0, 0, 0, MAC_LEN);
    memcpy(auth, &h, sizeof h);
    memcpy(auth + 32, mac, MAC_LEN);
    rc = memkv_send_all(fd, auth, sizeof auth);
    if (!rc) rc = read_reply(c, MEMKV_OP_AUTH, &h, err, err_len);
    if (!rc) return 0;
fail:
    close(fd);
    c->fd = -1;
    return rc;
}

void memkv_conn_close(struct memkv_conn *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* Header + descriptors + keys of one request, in a malloc'd buffer the caller frees. */
static uint8_t *request_head(uint8_t op, uint16_t flags, uint32_t n, const uint8_t *keys,
                             const uint16_t *key_lens, const uint64_t *lens, uint64_t payload,
                             size_t *head_len) {
    uint64_t keys_len = 0;
    for (uint32_t i = 0; i < n; i++) keys_len += key_lens[i];
    size_t len = sizeof(struct memkv_frame_hdr) + n * sizeof(struct memkv_req_desc) + keys_len;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return NULL;
    struct memkv_req_desc *d = (struct memkv_req_desc *)(buf + sizeof(struct memkv_frame_hdr));
    memkv_build_descs(n, key_lens, lens, NULL, d);
    memcpy((uint8_t *)(d + n), keys, keys_len);
    struct memkv_frame_hdr h;
    frame(&h, op, flags, n, (uint32_t)keys_len, len - sizeof h + payload);
    memcpy(buf, &h, sizeof h);
    *head_len = len;
    return buf;
}

static int read_statuses(struct memkv_conn *c, uint8_t op, uint32_t n, uint8_t *status, char *err,
                         size_t err_len) {
    struct memkv_frame_hdr h;
    int rc = read_reply(c, op, &h, err, err_len);
    if (rc) return rc;
    if (h.count != n || h.body_len != n) return -EPROTO;
    return memkv_recv_all(c->fd, status, n);
}

int memkv_conn_put(struct memkv_conn *c, uint32_t n, const uint8_t *keys, const uint16_t *key_lens,
                   const uint64_t *ptrs, const uint64_t *lens, uint16_t flags, uint8_t *status,
                   char *err, size_t err_len) {
    uint64_t payload = 8ull * n;
    for (uint32_t i = 0; i < n; i++) payload += lens[i];
    size_t head_len;
    uint8_t *head = request_head(MEMKV_OP_PUT, flags, n, keys, key_lens, lens, payload, &head_len);
    uint64_t *csums = malloc(sizeof(uint64_t) * (n ? n : 1));
    int rc = head && csums ? memkv_client_put(c->fd, head, head_len, n, ptrs, lens, csums) : -ENOMEM;
    free(head);
    free(csums);
    return rc ? rc : read_statuses(c, MEMKV_OP_PUT, n, status, err, err_len);
}

int memkv_conn_get(struct memkv_conn *c, uint32_t n, const uint8_t *keys, const uint16_t *key_lens,
                   const uint64_t *ptrs, const uint64_t *caps, int verify, uint8_t *status,
                   uint64_t *lens, char *err, size_t err_len) {
    size_t head_len;
    uint8_t *head = request_head(MEMKV_OP_GET, 0, n, keys, key_lens, caps, 0, &head_len);
    if (!head) return -ENOMEM;
    struct memkv_frame_hdr rep;
    int rc = memkv_client_get(c->fd, head, head_len, n, ptrs, caps, verify, &rep, status, lens);
    free(head);
    return rc == 1 ? read_error_text(c, &rep, err, err_len) : rc; /* 1: an ERROR frame */
}

int memkv_conn_keyed(struct memkv_conn *c, uint8_t op, uint32_t n, const uint8_t *keys,
                     const uint16_t *key_lens, uint8_t *status, char *err, size_t err_len) {
    size_t head_len;
    uint8_t *head = request_head(op, 0, n, keys, key_lens, NULL, 0, &head_len);
    if (!head) return -ENOMEM;
    int rc = memkv_send_all(c->fd, head, head_len);
    free(head);
    return rc ? rc : read_statuses(c, op, n, status, err, err_len);
}
