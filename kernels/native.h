/* Shared by the native CPU kernels (the .c files beside it), built into one library by kernels/native.py. */
#ifndef HOTCOLD_NATIVE_H
#define HOTCOLD_NATIVE_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* GGUF's block formats (GGML's type codes) and the weights per block of the 32-weight ones. */
#define QK 32
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13 };

/* The fp16 number at p (unaligned), and back. */
static inline float f16_at(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}
static inline void f16_put(uint8_t *p, float v) {
    _Float16 h = (_Float16)v;
    memcpy(p, &h, 2);
}

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
/* The paged KV cache's row of position p of a sequence (engine/cache.py: blocks of 1 << shift positions,
 * `table` the sequence's block ids). */
static inline size_t cache_row(const int64_t *table, int64_t shift, int64_t p) {
    return ((size_t)table[p >> shift] << shift) + (size_t)(p & ((1 << shift) - 1));
}

/* kernels/attention.c: causal attention of a step's tokens over the paged KV cache; see there. */
void paged_attention(const float *qkv, int64_t qkv_dim, float *out, const float *k_cache, const float *v_cache,
                     const int64_t *tables, const int64_t *seq, const int64_t *pos, int64_t B, int64_t n_heads,
                     int64_t n_kv, int64_t D, int64_t max_blocks, int64_t shift, int64_t window);

/* 32 activations quantized as llama.cpp's Q8 blocks: x[j] ~= d * q[j]; ds = d * sum(q). */
typedef struct {
    float d, ds;
    int8_t q[32];
} xblock;

/* A type code with this bit set: the matrix is in kernels/tiles.c's tiles of four rows (Q4_0/Q4_1 only). */
#define TILED 256
/* kernels/tiles.c: whether this build multiplies tiles of `type`; the products of one tile (n <= 4 rows of
 * it) with B tokens' xblocks, out[u * stride + i]; tiling and untiling (both any build). */
int tiles_supported(int type);
void tiles_dots(int type, const uint8_t *tile, const xblock *x, int64_t nb, int64_t B, float *out, int64_t stride,
                int n);
/* The same kernel over four rows where the file put them (gathered rows; repeat one to fill a tile). */
void rows4_dots(int type, const uint8_t *const rows[4], const xblock *x, int64_t nb, int64_t B, float *out,
                int64_t stride, int n);
int quant_tile(const uint8_t *W, int type, int64_t rows, int64_t cols, uint8_t *out);
int quant_untile(const uint8_t *T, int type, int64_t rows, int64_t cols, const int64_t *idx, int64_t K,
                 uint8_t *out);

/* kernels/quant.c: out [B, K, parts] = quantized rows . (rmsnorm of) x; see there. */
int quant_dots(const uint8_t *W, int type, int64_t n_rows, int64_t row_bytes, int64_t cols, int64_t parts,
               const int64_t *idx, int64_t K, const float *x, int64_t B, const float *norm, float eps, void *xq,
               float *out);
/* kernels/tsparse.c: y [B, N] = W (x with small inputs dropped) over an input-major matrix; see there. */
int tsparse_linear(const uint8_t *codes, const uint8_t *d, const uint8_t *m, int type, int64_t N, int64_t K,
                   const float *x, int64_t B, float threshold, const uint8_t *sparse, float *y);
/* kernels/formats.c: one row of `cols` quantized weights (a whole number of the type's blocks) as int8 codes q
 * with a scale d and a minimum m per 32 (w = d * q + m); the type's bytes and weights per block. */
void quant_unpack_row(int type, const uint8_t *r, int64_t cols, int8_t *q, float *d, float *m);
int quant_block_bytes(int type);
int quant_block_size(int type);

/* The element-wise functions of kernels.reference.FUNCTIONS, by code; t is FATReLU's threshold (code 6). */
static inline float act(int fn, float v, float t) {
    switch (fn) {
    case 1: return v / (1.0f + expf(-v));
    case 2: return v > 0.0f ? v : 0.0f;
    case 3: return v > 0.0f ? v * v : 0.0f;
    case 4: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 5: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case 6: return v >= t ? v : 0.0f;
    default: return v;
    }
}
#endif
