/* Run-time choice of the xxh3 kernel for payload-sized inputs (see memkv_hash.h). */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "memkv_hash.h"

_Static_assert(sizeof(XXH3_state_t) <= sizeof(struct memkv_hstate), "hash state room");
_Static_assert(_Alignof(XXH3_state_t) <= 64, "hash state alignment");

static int use_avx2(void) {
    static int v = -1;
    if (v < 0) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        v = memkv_hash_avx2_built() && __builtin_cpu_supports("avx2");
#else
        v = 0;
#endif
    }
    return v;
}

uint64_t memkv_h64(const void *p, size_t n) {
    if (n >= 1024 && use_avx2()) return memkv_h64_avx2(p, n);
    return XXH3_64bits(p, n);
}

void memkv_hs_reset(struct memkv_hstate *s) { XXH3_64bits_reset((XXH3_state_t *)s); }

void memkv_hs_update(struct memkv_hstate *s, const void *p, size_t n) {
    if (use_avx2()) memkv_hs_update_avx2(s, p, n);
    else XXH3_64bits_update((XXH3_state_t *)s, p, n);
}

uint64_t memkv_hs_digest(struct memkv_hstate *s) { return XXH3_64bits_digest((XXH3_state_t *)s); }
