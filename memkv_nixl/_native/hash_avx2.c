/* xxh3-64 compiled for AVX2 (only this file); memkv_h64 calls it when the CPU supports AVX2. */
#include <stddef.h>
#include <stdint.h>

#include "memkv_hash.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2")
#include <immintrin.h>
#define XXH_VECTOR 2 /* XXH_AVX2 */
#define XXH_INLINE_ALL
#include <xxhash.h>

int memkv_hash_avx2_built(void) { return 1; }
uint64_t memkv_h64_avx2(const void *p, size_t n) { return XXH3_64bits(p, n); }
void memkv_hs_update_avx2(void *state, const void *p, size_t n) {
    XXH3_64bits_update((XXH3_state_t *)state, p, n);
}
#else
int memkv_hash_avx2_built(void) { return 0; }
uint64_t memkv_h64_avx2(const void *p, size_t n) { (void)p; (void)n; return 0; }
void memkv_hs_update_avx2(void *state, const void *p, size_t n) { (void)state; (void)p; (void)n; }
#endif
