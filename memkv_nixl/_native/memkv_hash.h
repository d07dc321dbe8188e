/* Bulk xxh3-64 for payloads: the same values as XXH3_64bits, computed with AVX2 when the CPU has
 * it (chosen at run time; the build itself targets the baseline ISA), SSE2/scalar otherwise.
 * Header-sized inputs keep using the inline XXH3_64bits. */
#ifndef MEMKV_HASH_H
#define MEMKV_HASH_H
#include <stddef.h>
#include <stdint.h>

/* Opaque, suitably aligned room for an XXH3_state_t (checked in hash.c). */
struct memkv_hstate {
    _Alignas(64) unsigned char opaque[640];
};

uint64_t memkv_h64(const void *p, size_t n);
void memkv_hs_reset(struct memkv_hstate *s);
void memkv_hs_update(struct memkv_hstate *s, const void *p, size_t n);
uint64_t memkv_hs_digest(struct memkv_hstate *s);

/* hash_avx2.c: only called when memkv_h64 found AVX2 at run time */
uint64_t memkv_h64_avx2(const void *p, size_t n);
void memkv_hs_update_avx2(void *state, const void *p, size_t n);
int memkv_hash_avx2_built(void);
#endif
