/* Quantized weights on the CPU, kept in GGUF's own blocks: products with integer dot products, as llama.cpp's
 * CPU backend does.
 *
 * A weight row is a run of GGUF blocks along the input dimension (type codes are GGML's: Q4_0 2, Q4_1 3,
 * Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13). Every one of these formats is, per 32 weights, an int8 code
 * times a scale plus a minimum: w = d * q + m. A row is unpacked into that form (q as int8, d and m as
 * floats; kernels/formats.c) in a small per-thread buffer, then dotted with activations quantized the same
 * way per 32 values (x = dx * qx, with the sum of qx kept):
 *     sum w * x = sum_blocks (d * dx) * (sum q * qx) + m * (dx * sum qx)
 * The inner sum is exact in int32; it is what AVX512-VNNI's vpdpbusd (or AVX2's maddubs) computes 32 pairs
 * at a time. Rows are tiled by ROWS so that a tile's unpacked weights and one token's quantized activations
 * stay in L1 while every token of the batch passes over them. Rows are split over the thread pool; each
 * output sums its blocks in a fixed order, so results never depend on the thread count or the batch.
 */
#include "native.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define ROWS 8

/* Two blocks' activations as the 512-bit path reads them (see make_pairs). */
typedef struct {
    int8_t q[64];
    float s[4];
} xpair;

/* sum_b (d[b] * x[b].d) * (sum_j q * x.q) + m[b] * x[b].ds over the nb blocks of one row and one token. */
static inline float dot_row(const int8_t *q, const float *d, const float *m, const xblock *x, int64_t nb) {
    float ms = 0.0f;
    for (int64_t b = 0; b < nb; b++) ms += m[b] * x[b].ds;
#if defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define IDOT(w, v) _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w))
#else
#define IDOT(w, v) _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w)), \
                                     _mm256_set1_epi16(1))
#endif
    for (; b + 1 < nb; b += 2) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + b * QK));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + (b + 1) * QK));
        __m256i p0 = IDOT(w0, _mm256_loadu_si256((const __m256i *)x[b].q));
        __m256i p1 = IDOT(w1, _mm256_loadu_si256((const __m256i *)x[b + 1].q));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d[b] * x[b].d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d[b + 1] * x[b + 1].d), acc1);
    }
    if (b < nb) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + b * QK));
        __m256i p0 = IDOT(w0, _mm256_loadu_si256((const __m256i *)x[b].q));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d[b] * x[b].d), acc0);
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s) + ms;
#else
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += (int32_t)q[b * QK + j] * x[b].q[j];
        acc += (float)s * (d[b] * x[b].d);
    }
    return acc + ms;
#endif
}

#if defined(__AVX2__)
/* The common formats dotted straight from their blocks (no unpacking pass): a few tokens, memory-bound. */
static inline __m256i nibbles(const uint8_t *qs) { /* 32 x u8: the low nibbles, then the high ones */
    __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0xF);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define UDOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
#else
#define UDOT(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
#endif

/* One block's codes (u8, or |w| for Q8_0) and scales [d, m] (Q4_0's codes are unsigned nibbles with
 * m = -8 d; Q8_0 has no m). */
#define WEIGHTS(b)                                                                                         \
    const uint8_t *blk = r + (b) * bytes;                                                                  \
    __m256i w, aw;                                                                                         \
    __m128 wdm;                                                                                            \
    if (type == Q8_0) {                                                                                    \
        w = _mm256_loadu_si256((const __m256i *)(blk + 2));                                                \
        aw = _mm256_sign_epi8(w, w);                                                                       \
        wdm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const uint16_t *)blk));                                     \
    } else if (type == Q4_0) {                                                                             \
        w = aw = nibbles(blk + 2);                                                                         \
        wdm = _mm_mul_ps(_mm_cvtph_ps(_mm_set1_epi16((short)*(const uint16_t *)blk)),                      \
                         _mm_setr_ps(1.0f, -8.0f, 0.0f, 0.0f));                                            \
    } else {                                                                                               \
        uint32_t dmb;                                                                                      \
        memcpy(&dmb, blk, 4);                                                                              \
        w = aw = nibbles(blk + 4);                                                                         \
        wdm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dmb));                                                   \
    }

/* Token t's share of that block: (d dx) * (sum codes * qx) into ACC, m * (dx sum qx) into lane 1 of MS. */
#define TOKEN(ACC, MS, b, x)                                                                               \
    do {                                                                                                   \
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x)[b].q), p;                                     \
        __m128 dm = _mm_mul_ps(wdm, _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)&(x)[b].d)));        \
        p = UDOT(aw, type == Q8_0 ? _mm256_sign_epi8(xv, w) : xv);                                         \
        if (type != Q8_0) MS = _mm_add_ps(MS, dm);                                                         \
        ACC = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(dm), ACC);                      \
    } while (0)

static inline float finish(__m256 acc0, __m256 acc1, __m128 ms0, __m128 ms1) {
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    ms0 = _mm_add_ps(ms0, ms1);
    return _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_movehdup_ps(ms0));
}

/* out[t * stride] = row r dotted with tokens x + t * nb, for NT tokens at once: each block's codes are
 * prepared once for all of them. Every token runs the same operations in the same order as with NT = 1,
 * so its result is bitwise the same whatever else is in the batch. */
#define DOT_DIRECT(NT)                                                                                     \
static inline void dot_direct_##NT(const int type, const int bytes, const uint8_t *r, const xblock *x,    \
                                   int64_t nb, float *out, int64_t stride) {                               \
    __m256 acc0[NT], acc1[NT];                                                                             \
    __m128 ms0[NT], ms1[NT];                                                                               \
    for (int t = 0; t < NT; t++) {                                                                         \
        acc0[t] = acc1[t] = _mm256_setzero_ps();                                                           \
        ms0[t] = ms1[t] = _mm_setzero_ps();                                                                \
    }                                                                                                      \
    int64_t b = 0;                                                                                         \
    for (; b + 1 < nb; b += 2) {                                                                           \
        {                                                                                                  \
            WEIGHTS(b);                                                                                    \
            for (int t = 0; t < NT; t++) TOKEN(acc0[t], ms0[t], b, x + t * nb);                            \
        }                                                                                                  \
        {                                                                                                  \
            WEIGHTS(b + 1);                                                                                \
            for (int t = 0; t < NT; t++) TOKEN(acc1[t], ms1[t], b + 1, x + t * nb);                        \
        }                                                                                                  \
    }                                                                                                      \
    if (b < nb) {                                                                                          \
        WEIGHTS(b);                                                                                        \
        for (int t = 0; t < NT; t++) TOKEN(acc0[t], ms0[t], b, x + t * nb);                                \
    }                                                                                                      \
    for (int t = 0; t < NT; t++) out[t * stride] = finish(acc0[t], acc1[t], ms0[t], ms1[t]);               \
}
DOT_DIRECT(1)
DOT_DIRECT(4)

/* Row r against B tokens (x: B * nb blocks), results at out[b * stride]. */
static inline void dot_direct(const int type, const int bytes, const uint8_t *r, const xblock *x, int64_t nb,
                              int64_t B, float *out, int64_t stride) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) dot_direct_4(type, bytes, r, x + b * nb, nb, out + b * stride, stride);
    for (; b < B; b++) dot_direct_1(type, bytes, r, x + b * nb, nb, out + b * stride, stride);
}
#define HAS_DIRECT(type) ((type) == Q4_0 || (type) == Q4_1 || (type) == Q8_0)

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* Two blocks per 512-bit step (AVX-512 VNNI, rows of an even block count): about half the instructions of
 * the 256-bit path per block. A token's activations are laid out for it once per call: for blocks 2p and
 * 2p+1, codes [x0[0:16], x1[0:16], x0[16:32], x1[16:32]] (the order in which a 128-bit load of two blocks'
 * nibbles unpacks) and scales [dx0, dx0 * sum0, dx1, dx1 * sum1]. */
#define HAS_PAIRS(type, nb) (HAS_DIRECT(type) && (nb) % 2 == 0)

static void make_pairs(const xblock *x, int64_t nb, xpair *out) {
    for (int64_t p = 0; p < nb / 2; p++) {
        const xblock *a = x + 2 * p, *b = a + 1;
        memcpy(out[p].q, a->q, 16);
        memcpy(out[p].q + 16, b->q, 16);
        memcpy(out[p].q + 32, a->q + 16, 16);
        memcpy(out[p].q + 48, b->q + 16, 16);
        out[p].s[0] = a->d, out[p].s[1] = a->ds, out[p].s[2] = b->d, out[p].s[3] = b->ds;
    }
}

static inline __m512i pair_codes(const int type, const int bytes, const uint8_t *b0, __m512i *sign_src) {
    if (type == Q8_0) { /* [w0 | w1] -> [w0lo, w1lo, w0hi, w1hi] */
        __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                       _mm256_loadu_si256((const __m256i *)(b0 + bytes + 2)), 1);
        *sign_src = _mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0));
        return _mm512_abs_epi8(*sign_src);
    }
    int off = type == Q4_0 ? 2 : 4;
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b0 + off))),
                                        _mm_loadu_si128((const __m128i *)(b0 + bytes + off)), 1);
    __m256i mask = _mm256_set1_epi8(0xF);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, mask)),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), 1);
}

static inline __m128 pair_scales(const int type, const int bytes, const uint8_t *b0) { /* [d0, m0, d1, m1] */
    uint16_t d0, d1;
    memcpy(&d0, b0, 2);
    memcpy(&d1, b0 + bytes, 2);
    if (type == Q4_1) {
        uint32_t a, b;
        memcpy(&a, b0, 4);
        memcpy(&b, b0 + bytes, 4);
        return _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)a), (int)b, 1));
    }
    __m128 d = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)(d0 | (uint32_t)d0 << 16)),
                                             (int)(d1 | (uint32_t)d1 << 16), 1));
    return _mm_mul_ps(d, type == Q4_0 ? _mm_setr_ps(1.0f, -8.0f, 1.0f, -8.0f) : _mm_setr_ps(1.0f, 0.0f, 1.0f, 0.0f));
}

#define PAIR_TOKEN(ACC, MS, p, xp)                                                                         \
    do {                                                                                                   \
        __m512i xv = _mm512_loadu_si512((const void *)(xp)[p].q);                                          \
        if (type == Q8_0) xv = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(sgn), _mm512_setzero_si512(), xv); \
        __m128 sd = _mm_mul_ps(wdm, _mm_loadu_ps((xp)[p].s));                                              \
        MS = _mm_add_ps(MS, sd);                                                                           \
        __m512 scale = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(sd));                            \
        __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wc, xv);                                  \
        ACC = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, ACC);                                         \
    } while (0)

/* Row r against NT tokens at once (their pair layouts xp + t * nb / 2), the same operations per token. */
#define DOT_PAIRS(NT)                                                                                      \
static inline void dot_pairs_##NT(const int type, const int bytes, const uint8_t *r, const xpair *xp,     \
                                  int64_t nb, float *out, int64_t stride) {                                \
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);             \
    __m512 acc0[NT], acc1[NT];                                                                             \
    __m128 ms[NT];                                                                                         \
    for (int t = 0; t < NT; t++) {                                                                         \
        acc0[t] = acc1[t] = _mm512_setzero_ps();                                                           \
        ms[t] = _mm_setzero_ps();                                                                          \
    }                                                                                                      \
    int64_t np = nb / 2;                                                                                   \
    for (int64_t p = 0; p < np; p++) {                                                                     \
        const uint8_t *b0 = r + 2 * p * bytes;                                                             \
        __m512i sgn = _mm512_setzero_si512(), wc = pair_codes(type, bytes, b0, &sgn);                      \
        __m128 wdm = pair_scales(type, bytes, b0);                                                         \
        if (p & 1)                                                                                         \
            for (int t = 0; t < NT; t++) PAIR_TOKEN(acc1[t], ms[t], p, xp + t * np);                       \
        else                                                                                               \
            for (int t = 0; t < NT; t++) PAIR_TOKEN(acc0[t], ms[t], p, xp + t * np);                       \
    }                                                                                                      \
    for (int t = 0; t < NT; t++) {                                                                         \
        __m128 m = ms[t];                                                                                  \
        out[t * stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) +                          \
                          (_mm_cvtss_f32(_mm_shuffle_ps(m, m, 1)) + _mm_cvtss_f32(_mm_shuffle_ps(m, m, 3))); \
    }                                                                                                      \
}
DOT_PAIRS(1)
DOT_PAIRS(4)

static inline void dot_pairs(const int type, const int bytes, const uint8_t *r, const xpair *xp, int64_t nb,
                             int64_t B, float *out, int64_t stride) {
    int64_t b = 0, np = nb / 2;
    for (; b + 4 <= B; b += 4) dot_pairs_4(type, bytes, r, xp + b * np, nb, out + b * stride, stride);
    for (; b < B; b++) dot_pairs_1(type, bytes, r, xp + b * np, nb, out + b * stride, stride);
}
#endif
#else
#define HAS_DIRECT(type) 0
#define dot_direct(type, bytes, r, x, nb, B, out, stride) ((void)0)
#endif
#if !(defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)) /* no 512-bit pair path */
#define HAS_PAIRS(type, nb) 0
static void make_pairs(const xblock *x, int64_t nb, xpair *out) { (void)x, (void)nb, (void)out; }
#define dot_pairs(type, bytes, r, xp, nb, B, out, stride) ((void)0)
#endif

/* Activations of one token, 32 at a time: d = amax / 127, q = round(x / d), as llama.cpp's Q8 blocks. */
static void quantize_x(const float *x, int64_t nb, xblock *out) {
    for (int64_t b = 0; b < nb; b++, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int s = 0;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(x[j] * id);
            out[b].q[j] = (int8_t)v;
            s += v;
        }
        out[b].d = d;
        out[b].ds = d * (float)s;
    }
}

typedef struct {
    const uint8_t *W;
    int64_t row_bytes, cols, parts, K, B;
    int type, tiled; /* tiled: W is in kernels/tiles.c's tiles (dequantize rebuilds each row first) */
    const int64_t *idx;
    const float *x, *norm;
    float eps;
    xblock *xq;
    xpair *xp; /* the pair layout of xq, where the 512-bit path runs */
    float *out;
} qcall_t;

/* Each token's activations quantized, after an RMS norm (x * rsqrt(mean(x^2) + eps) * norm) if norm is set:
 * the norm before a projection costs no pass of its own. */
static void quantize_task(void *p, int64_t t0, int64_t t1) {
    const qcall_t *c = p;
    int64_t nb = c->cols / QK, H = c->cols;
    float tmp[c->norm ? H : 1];
    for (int64_t t = t0; t < t1; t++) {
        const float *x = c->x + t * H;
        if (c->norm) {
            float ss = 0.0f;
            for (int64_t j = 0; j < H; j++) ss += x[j] * x[j];
            float r = 1.0f / sqrtf(ss / (float)H + c->eps);
            for (int64_t j = 0; j < H; j++) tmp[j] = c->norm[j] * (x[j] * r);
            x = tmp;
        }
        quantize_x(x, nb, c->xq + t * nb);
        if (c->xp) make_pairs(c->xq + t * nb, nb, c->xp + t * (nb / 2));
    }
}

/* Per-thread scratch for ROWS unpacked rows (grown on demand, kept for the thread's life). */
typedef struct {
    int8_t *q;
    float *dm;
    int64_t cap;
} scratch_t;
static _Thread_local scratch_t tls_scratch __attribute__((tls_model("initial-exec")));

/* This thread's scratch, grown to hold ROWS rows of `cols` (NULL q on failure). Read once per task:
 * thread-local storage in a shared library costs a call per access. */
static scratch_t scratch(int64_t cols) {
    scratch_t *s = &tls_scratch;
    if (cols > s->cap) {
        free(s->q);
        free(s->dm);
        s->q = malloc((size_t)(ROWS * cols));
        s->dm = malloc(sizeof(float) * (size_t)(2 * ROWS * (cols / QK)));
        s->cap = s->q && s->dm ? cols : 0;
        if (!s->cap) s->q = 0;
    }
    return *s;
}

/* out[(b * K + k) * parts + p] = row (idx[k] or k) * parts + p of W, dotted with token b; k in [k0, k1). */
/* The tiled path (kernels/tiles.c): rows j = k * parts + p of the range, four at a time (ranges start on a
 * tile: the pool's grain is a multiple of 4 rows). */
static void dots_tiles_task(void *p, int64_t k0, int64_t k1) {
    const qcall_t *c = p;
    int64_t nb = c->cols / QK, rows = c->K * c->parts, tile_bytes = 4 * c->row_bytes;
    for (int64_t j = k0 * c->parts; j < k1 * c->parts; j += 4)
        tiles_dots(c->type, c->W + (j / 4) * tile_bytes, c->xq, nb, c->B, c->out + j, rows,
                   (int)(rows - j < 4 ? rows - j : 4));
}

/* Gathered rows (kernels/tiles.c's kernel over four rows where they lie): j = k * parts + p counts the rows
 * of the range; a last partial four repeats its first row. Each row's result is what the tiled product
 * gives it. Rows ahead are prefetched: gathered, no hardware prefetcher predicts them. */
static void dots_gathered_task(void *p, int64_t k0, int64_t k1) {
    const qcall_t *c = p;
    int64_t nb = c->cols / QK, parts = c->parts, rb = c->row_bytes, stride = c->K * parts;
    int64_t ahead = 16384 / (parts * rb) + 1, fetched = k0;
    for (int64_t j = k0 * parts; j < k1 * parts; j += 4) {
        int64_t n = k1 * parts - j < 4 ? k1 * parts - j : 4;
        const uint8_t *rows[4];
        for (int64_t i = 0; i < 4; i++) {
            int64_t ji = j + (i < n ? i : 0);
            rows[i] = c->W + (c->idx[ji / parts] * parts + ji % parts) * rb;
        }
        for (; fetched < k1 && fetched <= (j + 3) / parts + ahead; fetched++)
            if (fetched > (j + 3) / parts) prefetch_span(c->W + c->idx[fetched] * parts * rb, parts * rb);
        rows4_dots(c->type, rows, c->xq, nb, c->B, c->out + j, stride, (int)n);
    }
}

/* The direct path: each row of the range streamed once and dotted with every token while in L1. */
static void dots_direct_task(void *p, int64_t k0, int64_t k1) {
    const qcall_t *c = p;
    int64_t nb = c->cols / QK, parts = c->parts, rb = c->row_bytes;
    const int type = c->type;
    int64_t ahead = 16384 / (parts * rb) + 1;
    for (int64_t k = k0; k < k1; k++) {
        /* gathered rows are prefetched ahead; consecutive rows are left to the hardware prefetcher (measured:
         * software prefetches of dense rows cost ~10% of decode time on a 2-core EPYC) */
        if (c->idx && k + ahead < k1) prefetch_span(c->W + c->idx[k + ahead] * parts * rb, parts * rb);
        const uint8_t *row = c->W + (c->idx ? c->idx[k] : k) * parts * rb;
        for (int64_t part = 0; part < parts; part++) {
            float *out = c->out + k * parts + part;
            int64_t stride = c->K * parts;
            (void)out, (void)stride, (void)nb, (void)row; /* unused where no direct path is built (portable) */
            if (c->xp) {
                if (type == Q4_1) dot_pairs(Q4_1, 20, row + part * rb, c->xp, nb, c->B, out, stride); /* folded */
                else if (type == Q4_0) dot_pairs(Q4_0, 18, row + part * rb, c->xp, nb, c->B, out, stride);
                else dot_pairs(Q8_0, 34, row + part * rb, c->xp, nb, c->B, out, stride);
            } else if (type == Q4_1) dot_direct(Q4_1, 20, row + part * rb, c->xq, nb, c->B, out, stride);
            else if (type == Q4_0) dot_direct(Q4_0, 18, row + part * rb, c->xq, nb, c->B, out, stride);
            else dot_direct(Q8_0, 34, row + part * rb, c->xq, nb, c->B, out, stride);
        }
    }
}

static void dots_task(void *p, int64_t k0, int64_t k1) {
    const qcall_t *c = p;
    int64_t cols = c->cols, nb = cols / QK, parts = c->parts, n = (k1 - k0) * parts;
    scratch_t s = scratch(cols);
    int8_t *tq = s.q;
    float *tdm = s.dm;
    if (!tq) return;
    for (int64_t t0 = 0; t0 < n; t0 += ROWS) {
        int64_t tn = n - t0 < ROWS ? n - t0 : ROWS;
        for (int64_t r = 0; r < tn; r++) {
            int64_t k = k0 + (t0 + r) / parts, part = (t0 + r) % parts;
            int64_t row = (c->idx ? c->idx[k] : k) * parts + part;
            if (r == 0 && t0 + ROWS < n) { /* the next tile's rows, while this one is computed */
                int64_t kn = k0 + (t0 + ROWS) / parts;
                for (int64_t a = 0; a < ROWS && kn + a / parts < k1; a += parts)
                    prefetch_span(c->W + ((c->idx ? c->idx[kn + a / parts] : kn + a / parts) * parts) *
                                  c->row_bytes, parts * c->row_bytes);
            }
            quant_unpack_row(c->type, c->W + row * c->row_bytes, cols, tq + r * cols, tdm + 2 * r * nb,
                       tdm + (2 * r + 1) * nb);
        }
        for (int64_t b = 0; b < c->B; b++) {
            const xblock *xb = c->xq + b * nb;
            for (int64_t r = 0; r < tn; r++) {
                int64_t k = k0 + (t0 + r) / parts, part = (t0 + r) % parts;
                c->out[(b * c->K + k) * parts + part] =
                    dot_row(tq + r * cols, tdm + 2 * r * nb, tdm + (2 * r + 1) * nb, xb, nb);
            }
        }
    }
}

/* out [B, K, parts] fp32: rows of W [n_rows * parts, cols] (GGUF blocks of `type`) dotted with x [B, cols]
 * fp32 (RMS-normed first when norm is set), which is first quantized into xq scratch (B * cols / 32 blocks of
 * 40 bytes). idx NULL: all rows. */
int quant_dots(const uint8_t *W, int type, int64_t n_rows, int64_t row_bytes, int64_t cols, int64_t parts,
               const int64_t *idx, int64_t K, const float *x, int64_t B, const float *norm, float eps, void *xq,
               float *out) {
    int tiled = type & TILED;
    type &= ~TILED;
    int bytes = quant_block_bytes(type);
    if (!bytes || cols % quant_block_size(type) || row_bytes != cols / quant_block_size(type) * bytes) return -2;
    if (tiled && (idx || !tiles_supported(type) || ROWS % (4 * parts))) return -2; /* tiles: all rows, in order */
    if (idx && check_ids(idx, K, n_rows)) return -1;
    qcall_t c = {.W = W, .row_bytes = row_bytes, .cols = cols, .parts = parts, .K = K, .B = B, .type = type,
                 .idx = idx, .x = x, .norm = norm, .eps = eps, .xq = xq, .out = out};
    int gathered = idx && tiles_supported(type);
    if (!tiled && !gathered && HAS_PAIRS(type, cols / QK) &&
        !(c.xp = malloc(sizeof(xpair) * (size_t)(B * (cols / QK / 2) + 1))))
        return -3;
    pool_run(quantize_task, &c, B, 1);
    pool_fn task = tiled ? dots_tiles_task : gathered ? dots_gathered_task : HAS_DIRECT(type) ? dots_direct_task
                                                                                              : dots_task;
    pool_run(task, &c, K, (ROWS + parts - 1) / parts);
    free(c.xp);
    return 0;
}
