/* Client connection in C (conn.c): used by the NIXL plugin, which runs without Python. */
#ifndef MEMKV_CONN_H
#define MEMKV_CONN_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "memkv.h"

struct memkv_conn {
    int fd;
    uint8_t last_status;  /* status of the last ERROR frame */
    uint8_t cma;          /* same-host copies granted (unix-socket endpoint, server can reach us) */
    uint32_t max_batch;
    uint64_t max_block, min_block;
};

/* Connect and authenticate; 0, negative errno, or 1 (refused; message in err). A host that
   starts with '/' is a unix socket path (port ignored): there the client asks for cma. With
   same_host, a TCP connection moves to the server's unix socket (cma) when that socket is
   reachable from here, leads to the same server, and grants cma. */
int memkv_conn_open(struct memkv_conn *c, const char *host, int port, const uint8_t *ns,
                    size_t ns_len, const uint8_t *secret, size_t secret_len, int timeout_ms,
                    int same_host, char *err, size_t err_len);
void memkv_conn_close(struct memkv_conn *c);
/* Batched requests; keys are packed back to back; one wire status per key. */
int memkv_conn_put(struct memkv_conn *c, uint32_t n, const uint8_t *keys, const uint16_t *key_lens,
                   const uint64_t *ptrs, const uint64_t *lens, uint16_t flags, uint8_t *status,
                   char *err, size_t err_len);
int memkv_conn_get(struct memkv_conn *c, uint32_t n, const uint8_t *keys, const uint16_t *key_lens,
                   const uint64_t *ptrs, const uint64_t *caps, int verify, uint8_t *status,
                   uint64_t *lens, char *err, size_t err_len);
int memkv_conn_keyed(struct memkv_conn *c, uint8_t op, uint32_t n, const uint8_t *keys,
                     const uint16_t *key_lens, uint8_t *status, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif
#endif
