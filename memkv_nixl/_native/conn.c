/* A client connection in C: connect, handshake (HMAC-SHA256 via OpenSSL) and batched requests.
 * Used by the NIXL plugin, which must work in processes without Python. Blocking sockets with
 * kernel timeouts; every function returns 0, a negative errno (connection unusable: close it),
 * or 1 when the server answered with an ERROR frame (its text is in err). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "memkv.h"
#include "memkv_conn.h"

#define MAC_LEN 32
#define NONCE_LEN 32
#define AUTH_LABEL "memkv-auth-v1"

__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
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

static int connect_tcp(const char *host, int port, const struct timeval *tv, char *err, size_t err_len) {
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, portstr, &hints, &res)) {
        set_err(err, err_len, "cannot resolve %s (port %d)", host, port);
        return -EHOSTUNREACH;
    }
    int fd = -1, rc = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, sizeof *tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, tv, sizeof *tv); /* also bounds connect() */
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        rc = -errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) return rc;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static int connect_unix(const char *path, const struct timeval *tv) {
    struct sockaddr_un sa = {0};
    if (strlen(path) >= sizeof sa.sun_path) return -ENAMETOOLONG;
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, sizeof *tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, tv, sizeof *tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

/* What a CHALLENGE tells beyond the limits: who the server is, and its unix socket, if any. */
struct server_info {
    uint8_t id[MEMKV_SERVER_ID_LEN];
    char unix_path[MEMKV_MAX_UNIX_PATH + 1];
};

/* HELLO -> CHALLENGE -> AUTH on c->fd. With ask_cma (a unix socket) the HELLO asks for cma and
   names 8 bytes of ours that the server must read back. */
static int handshake(struct memkv_conn *c, int ask_cma, const char *name, const uint8_t *ns,
                     size_t ns_len, const uint8_t *secret, size_t secret_len, struct server_info *si,
                     char *err, size_t err_len) {
    uint8_t hello[32 + 8 + MEMKV_MAX_KEY + 16];
    volatile uint64_t probe = 0;
    size_t body = 8 + ns_len;
    if (ask_cma) {
        uint64_t v = 0;
        if (getentropy(&v, sizeof v)) v = (uint64_t)(uintptr_t)&v ^ 0x9e3779b97f4a7c15ull;
        probe = v;
        uint64_t addr = (uint64_t)(uintptr_t)&probe;
        memcpy(hello + 40 + ns_len, &addr, 8);
        memcpy(hello + 48 + ns_len, &v, 8);
        body += 16;
    }
    struct memkv_frame_hdr h;
    frame(&h, MEMKV_OP_HELLO, 0, 0, 0, body);
    memcpy(hello, &h, sizeof h);
    uint16_t ver = MEMKV_WIRE_VERSION, nl = (uint16_t)ns_len;
    uint32_t flags = ask_cma ? MEMKV_HELLO_CMA : 0;
    memcpy(hello + 32, &ver, 2);
    memcpy(hello + 34, &nl, 2);
    memcpy(hello + 36, &flags, 4);
    memcpy(hello + 40, ns, ns_len);
    int rc = memkv_send_all(c->fd, hello, 32 + body);
    if (!rc) rc = read_reply(c, MEMKV_OP_HELLO, &h, err, err_len);
    /* CHALLENGE: version u16, auth u8, features u8, pad 4, max_block u64, min_block u64,
       max_batch u32, pad 4, nonce[32]; then the server id and its unix socket path (may be empty) */
    uint8_t ch[64 + MEMKV_SERVER_ID_LEN + MEMKV_MAX_UNIX_PATH];
    size_t fixed = 64 + MEMKV_SERVER_ID_LEN;
    if (!rc && (h.body_len < fixed || h.body_len > sizeof ch)) rc = -EPROTO;
    if (!rc) rc = memkv_recv_all(c->fd, ch, h.body_len);
    if (rc) return rc;
    memcpy(&c->max_block, ch + 8, 8);
    memcpy(&c->min_block, ch + 16, 8);
    memcpy(&c->max_batch, ch + 24, 4);
    c->cma = ask_cma && (ch[3] & MEMKV_FEATURE_CMA); /* only where we asked, on a unix socket */
    (void)probe; /* it had to stay alive until the server read it (before CHALLENGE) */
    memcpy(si->id, ch + 64, MEMKV_SERVER_ID_LEN);
    memcpy(si->unix_path, ch + fixed, h.body_len - fixed);
    si->unix_path[h.body_len - fixed] = 0;
    if (ch[2] && !secret_len) {
        c->last_status = MEMKV_ST_AUTH_FAILED;
        set_err(err, err_len, "memkv server %s requires a shared secret; pass secret_file= "
                "(the same file as the server's --secret-file)", name);
        return 1;
    }
    uint8_t mac[MAC_LEN] = {0};
    if (secret_len) {
        uint8_t msg[sizeof AUTH_LABEL + NONCE_LEN + MEMKV_MAX_KEY];
        memcpy(msg, AUTH_LABEL, sizeof AUTH_LABEL); /* includes the NUL, as the server expects */
        memcpy(msg + sizeof AUTH_LABEL, ch + 32, NONCE_LEN);
        memcpy(msg + sizeof AUTH_LABEL + NONCE_LEN, ns, ns_len);
        unsigned int mlen = 0;
        if (!HMAC(EVP_sha256(), secret, (int)secret_len, msg, sizeof AUTH_LABEL + NONCE_LEN + ns_len,
                  mac, &mlen))
            return -EINVAL;
    }
    uint8_t auth[32 + MAC_LEN];
    frame(&h, MEMKV_OP_AUTH, 0, 0, 0, MAC_LEN);
    memcpy(auth, &h, sizeof h);
    memcpy(auth + 32, mac, MAC_LEN);
    rc = memkv_send_all(c->fd, auth, sizeof auth);
    return rc ? rc : read_reply(c, MEMKV_OP_AUTH, &h, err, err_len);
}

/* A TCP peer on this host: a loopback address, or the very address we connect from. Only then
   is a unix socket path the server announces worth trying (and never one of a remote server). */
static int peer_is_this_host(int fd) {
    struct sockaddr_storage a = {0}, b = {0};
    socklen_t la = sizeof a, lb = sizeof b;
    if (getpeername(fd, (struct sockaddr *)&a, &la) || getsockname(fd, (struct sockaddr *)&b, &lb))
        return 0;
    if (a.ss_family == AF_INET) {
        struct in_addr p = ((struct sockaddr_in *)&a)->sin_addr, s = ((struct sockaddr_in *)&b)->sin_addr;
        return (ntohl(p.s_addr) >> 24) == 127 || p.s_addr == s.s_addr;
    }
    if (a.ss_family == AF_INET6) {
        struct in6_addr *p = &((struct sockaddr_in6 *)&a)->sin6_addr, *s = &((struct sockaddr_in6 *)&b)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(p) || memcmp(p, s, sizeof *p) == 0;
    }
    return 0;
}

/* A TCP connection to a server that also listens on a unix socket: if that socket is reachable
   from here and leads to the same server (same id), and cma is granted there, use it instead.
   Anything else keeps the TCP connection, silently: the server may simply be on another host. */
static void upgrade_to_cma(struct memkv_conn *c, const struct server_info *si, const struct timeval *tv,
                           const uint8_t *ns, size_t ns_len, const uint8_t *secret, size_t secret_len) {
    struct memkv_conn u = {0};
    u.fd = connect_unix(si->unix_path, tv);
    if (u.fd < 0) return;
    struct server_info usi;
    if (handshake(&u, 1, si->unix_path, ns, ns_len, secret, secret_len, &usi, NULL, 0) == 0 && u.cma &&
        memcmp(usi.id, si->id, MEMKV_SERVER_ID_LEN) == 0) {
        close(c->fd);
        *c = u;
        return;
    }
    close(u.fd);
}

int memkv_conn_open(struct memkv_conn *c, const char *host, int port, const uint8_t *ns,
                    size_t ns_len, const uint8_t *secret, size_t secret_len, int timeout_ms,
                    int same_host, char *err, size_t err_len) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    int unix_path = host[0] == '/';
    int fd = unix_path ? connect_unix(host, &tv) : connect_tcp(host, port, &tv, err, err_len);
    char name[320]; /* how messages name the server */
    if (unix_path) snprintf(name, sizeof name, "memkv+unix://%s", host);
    else snprintf(name, sizeof name, "%s:%d", host, port);
    if (fd < 0) {
        if (fd != -EHOSTUNREACH) set_err(err, err_len, "cannot connect to memkv server %s", name);
        return fd;
    }
    c->fd = fd;
    struct server_info si;
    int rc = handshake(c, unix_path, name, ns, ns_len, secret, secret_len, &si, err, err_len);
    if (rc) {
        close(c->fd);
        c->fd = -1;
        return rc;
    }
    if (!unix_path && same_host && si.unix_path[0] == '/' && peer_is_this_host(c->fd))
        upgrade_to_cma(c, &si, &tv, ns, ns_len, secret, secret_len);
    return 0;
}

void memkv_conn_close(struct memkv_conn *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* Header + descriptors + keys of one request, in a malloc'd buffer the caller frees. */
/* With addrs (cma), the table of caller addresses follows the keys and no payload follows. */
static uint8_t *request_head(uint8_t op, uint16_t flags, uint32_t n, const uint8_t *keys,
                             const uint16_t *key_lens, const uint64_t *lens, uint64_t payload,
                             const uint64_t *addrs, size_t *head_len) {
    uint64_t keys_len = 0;
    for (uint32_t i = 0; i < n; i++) keys_len += key_lens[i];
    size_t table = addrs ? 8ull * n : 0;
    size_t len = sizeof(struct memkv_frame_hdr) + n * sizeof(struct memkv_req_desc) + keys_len + table;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return NULL;
    struct memkv_req_desc *d = (struct memkv_req_desc *)(buf + sizeof(struct memkv_frame_hdr));
    memkv_build_descs(n, key_lens, lens, NULL, d);
    memcpy((uint8_t *)(d + n), keys, keys_len);
    if (addrs) {
        memcpy((uint8_t *)(d + n) + keys_len, addrs, table);
        flags |= MEMKV_FLAG_CMA;
    }
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
    size_t head_len;
    if (c->cma) { /* the server copies the payloads out of our memory and hashes them itself */
        uint8_t *head = request_head(MEMKV_OP_PUT, flags, n, keys, key_lens, lens, 0, ptrs, &head_len);
        int rc = head ? memkv_send_all(c->fd, head, head_len) : -ENOMEM;
        free(head);
        return rc ? rc : read_statuses(c, MEMKV_OP_PUT, n, status, err, err_len);
    }
    uint64_t payload = 8ull * n;
    for (uint32_t i = 0; i < n; i++) payload += lens[i];
    uint8_t *head = request_head(MEMKV_OP_PUT, flags, n, keys, key_lens, lens, payload, NULL, &head_len);
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
    uint8_t *head = request_head(MEMKV_OP_GET, 0, n, keys, key_lens, caps, 0, c->cma ? ptrs : NULL,
                                 &head_len);
    if (!head) return -ENOMEM;
    struct memkv_frame_hdr rep;
    int rc = memkv_client_get(c->fd, head, head_len, n, ptrs, caps, verify, c->cma, &rep, status, lens);
    free(head);
    if (rc < 0 && c->cma) { /* the server may still be copying into our buffers: before they go
                               back to the caller, tell it to stop and wait until it has */
        shutdown(c->fd, SHUT_WR);
        char sink[4096];
        while (recv(c->fd, sink, sizeof sink, 0) > 0) {}
    }
    return rc == 1 ? read_error_text(c, &rep, err, err_len) : rc; /* 1: an ERROR frame */
}

int memkv_conn_keyed(struct memkv_conn *c, uint8_t op, uint32_t n, const uint8_t *keys,
                     const uint16_t *key_lens, uint8_t *status, char *err, size_t err_len) {
    size_t head_len;
    uint8_t *head = request_head(op, 0, n, keys, key_lens, NULL, 0, NULL, &head_len);
    if (!head) return -ENOMEM;
    int rc = memkv_send_all(c->fd, head, head_len);
    free(head);
    return rc ? rc : read_statuses(c, op, n, status, err, err_len);
}
