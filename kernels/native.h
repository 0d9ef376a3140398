/* Shared by the native CPU kernels (pool.c, gathered.c, quant.c), built into one library by kernels/native.py. */
#ifndef HOTCOLD_NATIVE_H
#define HOTCOLD_NATIVE_H
#include <stdint.h>

/* fn(ctx, begin, end) over [0, n) split into one contiguous range per thread, each range a multiple of
 * `grain` (but the last). Work items must be independent: each output is computed by exactly one thread,
 * in the same order whatever the split, so results are bitwise identical for any thread count. */
typedef void (*pool_fn)(void *ctx, int64_t begin, int64_t end);
void pool_run(pool_fn fn, void *ctx, int64_t n, int64_t grain);

static inline void prefetch_span(const void *p, int64_t nbytes) {
    for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 0);
}

/* 0, or -1 (nothing computed) when an id is outside [0, n_rows): a bad id must not read foreign memory. */
static inline int check_ids(const int64_t *idx, int64_t K, int64_t n_rows) {
    for (int64_t k = 0; k < K; k++)
        if (idx[k] < 0 || idx[k] >= n_rows) return -1;
    return 0;
}
#endif
