/* Q4_0 / Q4_1 matrices in tiles of four rows, and their products (AVX-512 VNNI), for quant.c.
 *
 * One row at a time, a block's scale conversion and each token's activation loads are paid per row: the
 * one-row kernel ran out of instructions (~100 GMAC/s at 16-128 tokens, against ~290 for llama.cpp's
 * repacked GEMM). With four rows in one 512-bit register (a 128-bit lane each: one block's 32 nibbles), one
 * activation load and one pair of vpdpbusd serve four rows, and the four rows' scales convert together. Read
 * from the file's own rows, those four rows are four interleaved streams, which this class of CPU does not
 * prefetch (measured: 17 GB/s against 32 for one stream, on a Zen 4); so the rows are re-laid once, at load,
 * losslessly, as llama.cpp's repacked types are: tile t holds rows 4t..4t+3, block by block,
 *     Q4_0: [d0 d1 d2 d3 (fp16)] [codes of row 0 (16 bytes)] ... [codes of row 3]           72 bytes
 *     Q4_1: [d0 d1 d2 d3] [m0 m1 m2 m3] [codes of rows 0-3]                                    80 bytes
 * (4 x the row's block bytes), so a product reads one sequential stream. A last partial tile is padded with
 * zero rows. Each row's arithmetic is confined to its own lanes and is the same in every slot, and each
 * token's operations are the same whatever else shares the call: a result depends on its row and its token
 * only, never on the thread count or the batch.
 */
#include "native.h"

#include <string.h>

/* Bytes read ahead of the product, in software: the four-row kernel consumes a stream faster than the
 * hardware prefetcher runs ahead of it (measured, 4096 x 11008 Q4_0 from DRAM: 4 tokens 1.6 -> 1.1 ms) */
#define AHEAD 4096

static int tile_block_bytes(int type) { return type == Q4_0 ? 72 : type == Q4_1 ? 80 : 0; }

/* Row r's block b (GGUF bytes) <-> its place in tile r / 4. dir 1: row -> tile, 0: tile -> row. */
static inline __attribute__((always_inline)) void move_block(int type, uint8_t *tile_block, int slot,
                                                              uint8_t *row_block, int dir) {
    int scales = type == Q4_0 ? 1 : 2, head = 8 * scales; /* fp16 d (and m) of 4 rows, then the codes */
    for (int s = 0; s < scales; s++) {
        uint8_t *t = tile_block + 8 * s + 2 * slot, *r = row_block + 2 * s;
        dir ? memcpy(t, r, 2) : memcpy(r, t, 2);
    }
    uint8_t *t = tile_block + head + 16 * slot, *r = row_block + 2 * scales;
    dir ? memcpy(t, r, 16) : memcpy(r, t, 16);
}

typedef struct {
    const uint8_t *W;
    uint8_t *out;
    int type;
    int64_t rows, nb;
} tile_call_t;

static inline __attribute__((always_inline)) void tile_rows(const int type, const tile_call_t *c, int64_t t0,
                                                             int64_t t1) {
    const int tb = tile_block_bytes(type), bytes = tb / 4;
    uint8_t rows[4 * c->nb * bytes]; /* the tile's rows, copied first: out may be W itself */
    for (int64_t t = t0; t < t1; t++) {
        int64_t n = c->rows - 4 * t < 4 ? c->rows - 4 * t : 4;
        memcpy(rows, c->W + 4 * t * c->nb * bytes, (size_t)(n * c->nb * bytes));
        memset(rows + n * c->nb * bytes, 0, (size_t)((4 - n) * c->nb * bytes));
        for (int64_t b = 0; b < c->nb; b++)
            for (int r = 0; r < 4; r++)
                move_block(type, c->out + (t * c->nb + b) * tb, r, rows + (r * c->nb + b) * bytes, 1);
    }
}

static void tile_task(void *p, int64_t t0, int64_t t1) { /* the type a constant in each copy of tile_rows */
    const tile_call_t *c = p;
    if (c->type == Q4_0) tile_rows(Q4_0, c, t0, t1);
    else tile_rows(Q4_1, c, t0, t1); /* quant_tile takes no other type */
}

/* out [ceil(rows / 4), 4 * row_bytes] = W [rows, row_bytes] (GGUF blocks) in tiles (a last partial tile
 * padded with zero rows); out may be W itself when rows is a multiple of 4 (a tile takes its rows' bytes).
 * -2 for another type. */
int quant_tile(const uint8_t *W, int type, int64_t rows, int64_t cols, uint8_t *out) {
    if (!tile_block_bytes(type) || cols % 32 || (out == W && rows % 4)) return -2;
    tile_call_t c = {.W = W, .out = out, .type = type, .rows = rows, .nb = cols / 32};
    pool_run(tile_task, &c, (rows + 3) / 4, 16);
    return 0;
}

static void untile_task(void *p, int64_t t0, int64_t t1) { /* whole tiles back to their rows, in place */
    const tile_call_t *c = p;
    const int tb = tile_block_bytes(c->type), bytes = tb / 4;
    uint8_t tile[c->nb * tb]; /* the tile, copied first: its rows take its bytes */
    for (int64_t t = t0; t < t1; t++) {
        memcpy(tile, c->out + t * c->nb * tb, (size_t)(c->nb * tb));
        for (int r = 0; r < 4; r++)
            for (int64_t b = 0; b < c->nb; b++)
                move_block(c->type, tile + b * tb, r, c->out + ((4 * t + r) * c->nb + b) * bytes, 0);
    }
}

/* out [K, row_bytes] = rows idx (or 0..K-1) of a tiled matrix, as GGUF stores them; out may be T itself
 * (no idx, rows a multiple of 4: no second copy when a plan takes the matrix over). */
int quant_untile(const uint8_t *T, int type, int64_t rows, int64_t cols, const int64_t *idx, int64_t K,
                 uint8_t *out) {
    int tb = tile_block_bytes(type), bytes = tb / 4;
    if (!tb || cols % 32) return -2;
    if (out == T) {
        if (idx || K != rows || rows % 4) return -2;
        tile_call_t c = {.W = T, .out = out, .type = type, .rows = rows, .nb = cols / 32};
        pool_run(untile_task, &c, rows / 4, 16);
        return 0;
    }
    if (idx && check_ids(idx, K, rows)) return -1;
    int64_t nb = cols / 32;
    for (int64_t k = 0; k < K; k++) {
        int64_t r = idx ? idx[k] : k;
        for (int64_t b = 0; b < nb; b++)
            move_block(type, (uint8_t *)T + ((r / 4) * nb + b) * tb, (int)(r % 4), out + (k * nb + b) * bytes, 0);
    }
    return 0;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

int tiles_supported(int type) { return tile_block_bytes(type) != 0; }

/* Block b of the four rows, from a tile (TILE_SOURCE) or from four rows where the file put them
 * (ROWS_SOURCE: gathered rows, e.g. a plan's active neurons): low and high nibbles (u8, row i in 128-bit
 * lane i), d4 the rows' scales and m4 their minimum-term factors (d for Q4_0, whose m = -8 d is applied at
 * the end; m for Q4_1). Both sources give each row the same numbers in the same lanes. */
#define TILE_SOURCE(b)                                                                                     \
    const uint8_t *blk = src + (b) * tb;                                                                   \
    __builtin_prefetch(blk + AHEAD, 0, 0);                                                                 \
    const __m512i c = _mm512_loadu_si512((const void *)(blk + head));                                      \
    const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)blk));                                 \
    const __m128 m4 = type == Q4_0 ? d4 : _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(blk + 8)));

#define ROWS_SOURCE(b)                                                                                     \
    const uint8_t *p0 = src[0] + (b) * bytes, *p1 = src[1] + (b) * bytes, *p2 = src[2] + (b) * bytes,      \
                  *p3 = src[3] + (b) * bytes;                                                              \
    __m512i c = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p0 + off)));                      \
    c = _mm512_inserti32x4(c, _mm_loadu_si128((const __m128i *)(p1 + off)), 1);                            \
    c = _mm512_inserti32x4(c, _mm_loadu_si128((const __m128i *)(p2 + off)), 2);                            \
    c = _mm512_inserti32x4(c, _mm_loadu_si128((const __m128i *)(p3 + off)), 3);                            \
    const __m128i w = _mm_setr_epi32((int)load32(p0), (int)load32(p1), (int)load32(p2), (int)load32(p3)); \
    const __m128 d4 = _mm_cvtph_ps(_mm_shuffle_epi8(w, pick_d));                                           \
    const __m128 m4 = type == Q4_0 ? d4 : _mm_cvtph_ps(_mm_shuffle_epi8(w, pick_m));

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Token x's share of the block: (d dx) * (sum codes * qx) per lane into ACC, m * (dx sum qx) into MS. */
#define TOKEN4(ACC, MS, x)                                                                                 \
    do {                                                                                                   \
        __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(x)->q));                     \
        __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)((x)->q + 16)));              \
        __m512i dp = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);     \
        ACC = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(d16, _mm512_set1_ps((x)->d)), ACC);    \
        MS = _mm_fmadd_ps(m4, _mm_set1_ps((x)->ds), MS);                                                   \
    } while (0)

/* One block of the four rows against the NT tokens, into their accumulators. */
#define BLOCK4(SOURCE, b, ACC, MS)                                                                         \
    {                                                                                                      \
        SOURCE(b);                                                                                         \
        const __m512i lo = _mm512_and_si512(c, nib), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib); \
        const __m512 d16 = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(d4));                       \
        for (int u = 0; u < nt; u++) TOKEN4(ACC[u], MS[u], x + u * nb + (b));                              \
    }

/* Each row's four lanes summed in a fixed order ((l0 + l2) + (l1 + l3)), plus its minimum term. */
static inline void finish4(const int type, __m512 acc0, __m512 acc1, __m128 ms0, __m128 ms1, float *out, int n) {
    __m512 a = _mm512_add_ps(acc0, acc1);
    a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, _MM_SHUFFLE(1, 0, 3, 2)));
    a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    float v[16], m[4];
    _mm512_storeu_ps(v, a);
    _mm_storeu_ps(m, _mm_add_ps(ms0, ms1));
    for (int i = 0; i < n; i++) out[i] = v[4 * i] + (type == Q4_0 ? -8.0f * m[i] : m[i]);
}

/* out[u * stride + i] = row i (< n) of the four dotted with token u (x + u * nb), u < NT. */
#define FOUR(NAME, NT, SRC_T, SOURCE)                                                                      \
static inline void NAME(const int type, SRC_T src, const xblock *x, int64_t nb, float *out, int64_t stride,\
                        int n) {                                                                           \
    const int bytes = type == Q4_0 ? 18 : 20, tb = 4 * bytes, off = type == Q4_0 ? 2 : 4, head = 4 * off;  \
    const __m512i nib = _mm512_set1_epi8(0xF);                                                             \
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);             \
    const __m128i pick_d = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);        \
    const __m128i pick_m = _mm_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);      \
    const int nt = NT;                                                                                     \
    (void)bytes, (void)tb, (void)off, (void)head, (void)pick_d, (void)pick_m;                              \
    __m512 acc0[NT], acc1[NT];                                                                             \
    __m128 ms0[NT], ms1[NT];                                                                               \
    for (int u = 0; u < NT; u++) {                                                                         \
        acc0[u] = acc1[u] = _mm512_setzero_ps();                                                           \
        ms0[u] = ms1[u] = _mm_setzero_ps();                                                                \
    }                                                                                                      \
    int64_t b = 0;                                                                                         \
    for (; b + 1 < nb; b += 2) {                                                                           \
        BLOCK4(SOURCE, b, acc0, ms0)                                                                       \
        BLOCK4(SOURCE, b + 1, acc1, ms1)                                                                   \
    }                                                                                                      \
    if (b < nb) BLOCK4(SOURCE, b, acc0, ms0)                                                               \
    for (int u = 0; u < NT; u++) finish4(type, acc0[u], acc1[u], ms0[u], ms1[u], out + u * stride, n);    \
}
FOUR(tile_1, 1, const uint8_t *, TILE_SOURCE)
FOUR(tile_4, 4, const uint8_t *, TILE_SOURCE)
FOUR(rows_1, 1, const uint8_t *const *, ROWS_SOURCE)
FOUR(rows_4, 4, const uint8_t *const *, ROWS_SOURCE)

#define OVER_TOKENS(KERNEL, src)                                                                           \
    do {                                                                                                   \
        int64_t u = 0;                                                                                     \
        if (type == Q4_0) {                                                                                \
            for (; u + 4 <= B; u += 4) KERNEL##_4(Q4_0, src, x + u * nb, nb, out + u * stride, stride, n); \
            for (; u < B; u++) KERNEL##_1(Q4_0, src, x + u * nb, nb, out + u * stride, stride, n);         \
        } else {                                                                                           \
            for (; u + 4 <= B; u += 4) KERNEL##_4(Q4_1, src, x + u * nb, nb, out + u * stride, stride, n); \
            for (; u < B; u++) KERNEL##_1(Q4_1, src, x + u * nb, nb, out + u * stride, stride, n);         \
        }                                                                                                  \
    } while (0)

void tiles_dots(int type, const uint8_t *tile, const xblock *x, int64_t nb, int64_t B, float *out, int64_t stride,
                int n) {
    OVER_TOKENS(tile, tile);
}

void rows4_dots(int type, const uint8_t *const rows[4], const xblock *x, int64_t nb, int64_t B, float *out,
                int64_t stride, int n) {
    OVER_TOKENS(rows, rows);
}
#else
int tiles_supported(int type) {
    (void)type;
    return 0;
}

void tiles_dots(int type, const uint8_t *tile, const xblock *x, int64_t nb, int64_t B, float *out, int64_t stride,
                int n) {
    (void)type, (void)tile, (void)x, (void)nb, (void)B, (void)out, (void)stride, (void)n;
}

void rows4_dots(int type, const uint8_t *const rows[4], const xblock *x, int64_t nb, int64_t B, float *out,
                int64_t stride, int n) {
    (void)type, (void)rows, (void)x, (void)nb, (void)B, (void)out, (void)stride, (void)n;
}
#endif
