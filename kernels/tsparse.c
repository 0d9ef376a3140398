/* Input-sparse products (TEAL) over quantized weights stored input-major, losslessly.
 *
 * A GGUF matrix W [N, K] (Q4_0, Q4_1 or Q8_0) quantizes each output row in blocks of 32 inputs:
 *     W[j, k] = d[j, g] * q[j, k] + m[j, g],  g = k / 32   (Q4_0: m = -8 d; Q8_0: m = 0, signed q)
 * Input-major, the same numbers are stored as
 *     codes [K, N]: input k's codes for every output, 32 outputs per 16 bytes (4-bit: the low nibbles are
 *                   outputs 0-15, the high ones 16-31, as in a GGUF block) or per 32 bytes (Q8_0, int8);
 *     d, m  [K / 32, N] fp16: each block's scale and minimum, one row per group of 32 inputs.
 * so that y = W x over the inputs that survive |x_k| > t reads only their code rows, plus one row of scales
 * per group of inputs with a survivor:
 *     y[j] = sum_g scale_g ( d[g, j] * sum_{k in g, kept} xq_k q[k, j]  +  m[g, j] * sum_{k in g, kept} xq_k ),
 * the kept inputs of a group quantized to int16 (x_k = scale_g * xq_k, scale_g = max |x_k| / 32767: 16 bits
 * where llama.cpp's dense products take 8). Bytes read per weight: 4-bit, (1 - s) / 2 + 1/8 (Q4_1; 1/16 for
 * Q4_0) against a dense row's 5/8 (9/16); the weights are the GGUF's own numbers.
 *
 * The integer sums take the kept rows two at a time (any two: the pair is formed at run time), their codes
 * interleaved per output so that one multiply-add of int16 pairs (vpdpwssd, or vpmaddwd + add) covers both:
 * a row stays skippable one input at a time. Threads split the outputs in passes of 64; every output sums its
 * groups in order (integer sums within a group are exact), whatever the thread count and the other tokens of
 * the batch. Kept rows are where no hardware prefetcher looks, so each pass requests the same span of the
 * next group's kept rows (into L2, a pass's worth at a time: measured 1.5x faster than requesting a whole
 * group's span at once, which overran the miss queues).
 */
#include "native.h"

#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

#define P 2     /* blocks of 32 outputs per pass: 8 int32 accumulators of 8 lanes */
#define NT 2    /* tokens per multi-token pass (16 accumulators: AVX-512VL has 32 registers) */

typedef struct {
    const uint8_t *codes, *d, *m;
    int type;
    int64_t N, K, B, bpb;    /* bpb: code bytes per 32 outputs of one input (16, or 32 for Q8_0) */
    const int16_t *xq;       /* [B, K]: kept inputs as int16, x = scale[b, g] * xq; dropped ones 0 */
    const float *scale;      /* [B, K / 32] */
    const int32_t *sum;      /* [B, K / 32]: sum of xq over the group */
    const int32_t *kept;     /* [B, K]: each token's kept inputs in order, an even count per group (padded
                              * with an input of xq 0) */
    const int32_t *start;    /* [B, K/32 + 1]: where each group's inputs begin in kept */
    const int32_t *any, *any_start; /* the inputs some token keeps, and where each group's begin */
    float *y;
} tax_t;

#if defined(__AVX2__) && defined(__F16C__)
#define PAIR_SUMS 1
/* acc[4 * blk + i] (8 lanes: outputs 8i..8i+7 of block blk) += q[k1, j] * x1 + q[k2, j] * x2, the two rows'
 * codes interleaved per output so that one multiply-add of int16 pairs does both (vpdpwssd where the CPU has
 * it). 4-bit codes zero-extended, int8 (Q8_0) sign-extended; products and sums exact in int32. */
static inline __m256i madd(__m256i acc, __m256i w, __m256i xx) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, w, xx);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, xx));
#endif
}

/* The same for nt tokens that keep the same two rows (prompt tokens keep every input): the codes are
 * unpacked once for all of them; acc holds each token's 4 * P accumulators in turn. Each token's sums are
 * those of one at a time (exact integers). */
static inline __attribute__((always_inline)) void pair(int type, const uint8_t *r1, const uint8_t *r2,
                                                       const int32_t *x12, int nt, int nb, __m256i *acc) {
    __m256i xx[NT], low = _mm256_set1_epi16(0xF);
    for (int t = 0; t < nt; t++) xx[t] = _mm256_set1_epi32(x12[t]);
    for (int blk = 0; blk < nb; blk++) {
        __m256i w[4];
        if (type == Q8_0) {
            for (int h = 0; h < 2; h++) {
                __m128i a = _mm_loadu_si128((const __m128i *)(r1 + blk * 32 + h * 16)),
                        b = _mm_loadu_si128((const __m128i *)(r2 + blk * 32 + h * 16));
                w[2 * h] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b));
                w[2 * h + 1] = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b));
            }
        } else {
            __m128i a = _mm_loadu_si128((const __m128i *)(r1 + blk * 16)),
                    b = _mm_loadu_si128((const __m128i *)(r2 + blk * 16));
            __m256i w0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)), w1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
            w[0] = _mm256_and_si256(w0, low), w[1] = _mm256_and_si256(w1, low);
            w[2] = _mm256_srli_epi16(w0, 4), w[3] = _mm256_srli_epi16(w1, 4);
        }
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < 4; i++) acc[t * 4 * P + 4 * blk + i] = madd(acc[t * 4 * P + 4 * blk + i], w[i], xx[t]);
    }
}
#endif

/* Code of input row r for output j of a pass (4-bit: low nibbles outputs 0-15 of a block, high 16-31). */
static inline int32_t code_at(int type, const uint8_t *r, int64_t j) {
    if (type == Q8_0) return (int8_t)r[j];
    uint8_t v = r[j / QK * 16 + j % 16];
    return j % QK < 16 ? v & 0xF : v >> 4;
}

/* One group's kept rows for one token, as the passes read them: row offsets in pairs and each pair's two
 * int16 inputs packed in one int32 (low: the first row's). */
typedef struct {
    int64_t off[QK];
    int32_t x12[QK / 2];
    int32_t pairs;
} rows_t;

/* Tokens bs[0..nt) (nt > 1: tokens with the same kept rows), group g, outputs [o0, o0 + nb * 32) into ys[t]
 * (each token's output row at o0): the group's integer sums in registers, then
 * y += scale * (d * acc + m * sum(xq)) with m = -8 d (Q4_0), 0 (Q8_0) or the block's minimum (Q4_1). */
static inline __attribute__((always_inline)) void piece(const tax_t *c, int type, const rows_t *const *rs,
                                                        const int64_t *bs, int nt, int64_t g, int64_t o0, int nb,
                                                        float *const *ys) {
    const uint8_t *codes = c->codes + o0 / QK * c->bpb;
    const uint8_t *dg = c->d + (g * c->N + o0) * 2, *mg = c->m ? c->m + (g * c->N + o0) * 2 : 0;
#ifdef PAIR_SUMS
    const rows_t *r = rs[0];
    __m256i v[NT * 4 * P];
    for (int i = 0; i < nt * 4 * P; i++) v[i] = _mm256_setzero_si256();
    for (int32_t i = 0; i < r->pairs; i++) {
        int32_t x12[NT];
        for (int t = 0; t < nt; t++) x12[t] = rs[t]->x12[i];
        pair(type, codes + r->off[2 * i], codes + r->off[2 * i + 1], x12, nt, nb, v);
    }
    for (int t = 0; t < nt; t++) {
        float sc = c->scale[bs[t] * (c->K / QK) + g], sm = sc * (float)c->sum[bs[t] * (c->K / QK) + g];
        float *y = ys[t];
        /* y += d * (scale * acc) + m * (scale * sum): Q4_0's m = -8 d folds into the first term, Q8_0 has none */
        __m256 vsc = _mm256_set1_ps(sc), vsm = _mm256_set1_ps(type == Q4_0 ? -8.0f * sm : sm);
        for (int i = 0; i < 4 * nb; i++) { /* v[t * 4P + i]: outputs 8i..8i+7 of the pass */
            __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dg + 16 * i)));
            __m256 tv = _mm256_mul_ps(_mm256_cvtepi32_ps(v[t * 4 * P + i]), vsc), out = _mm256_loadu_ps(y + 8 * i);
            if (type == Q4_0) tv = _mm256_add_ps(tv, vsm);
            if (type == Q4_1)
                out = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mg + 16 * i))), vsm, out);
            _mm256_storeu_ps(y + 8 * i, _mm256_fmadd_ps(dv, tv, out));
        }
    }
#else
    int64_t n = nb * QK;
    for (int t = 0; t < nt; t++) {
        const rows_t *rt = rs[t];
        float sc = c->scale[bs[t] * (c->K / QK) + g], sm = sc * (float)c->sum[bs[t] * (c->K / QK) + g];
        int32_t acc[4 * P * 8];
        for (int64_t j = 0; j < n; j++) acc[j] = 0;
        for (int32_t i = 0; i < 2 * rt->pairs; i++) {
            int32_t xk = (int16_t)(i % 2 ? (uint32_t)rt->x12[i / 2] >> 16 : (uint32_t)rt->x12[i / 2] & 0xFFFF);
            for (int64_t j = 0; j < n; j++) acc[j] += code_at(type, codes + rt->off[i], j) * xk;
        }
        for (int64_t j = 0; j < n; j++) {
            float d = f16_at(dg + 2 * j), m = type == Q4_1 ? f16_at(mg + 2 * j) : type == Q4_0 ? -8.0f * d : 0.0f;
            ys[t][j] = ys[t][j] + ((sc * d) * (float)acc[j] + m * sm);
        }
    }
#endif
}

/* Token b's kept rows of group g (0 when it keeps none). */
static int32_t group_rows(const tax_t *c, int64_t b, int64_t g, int64_t row, rows_t *r) {
    const int32_t *s = c->start + b * (c->K / QK + 1), *kept = c->kept + b * c->K;
    const int16_t *x = c->xq + b * c->K;
    r->pairs = (s[g + 1] - s[g]) / 2;
    for (int32_t i = 0; i < 2 * r->pairs; i++) r->off[i] = kept[s[g] + i] * row;
    for (int32_t i = 0; i < r->pairs; i++)
        r->x12[i] = (int32_t)((uint32_t)(uint16_t)x[kept[s[g] + 2 * i]] |
                              ((uint32_t)(uint16_t)x[kept[s[g] + 2 * i + 1]] << 16));
    return r->pairs;
}

/* Whether tokens a and b keep the same rows of group g, in the same order (prompt tokens keep all 32). */
static inline int same_rows(const tax_t *c, int64_t a, int64_t b, int64_t g) {
    int64_t ng = c->K / QK;
    const int32_t *sa = c->start + a * (ng + 1) + g, *sb = c->start + b * (ng + 1) + g;
    int32_t n = sa[1] - sa[0];
    return n == sb[1] - sb[0] &&
           !memcmp(c->kept + a * c->K + sa[0], c->kept + b * c->K + sb[0], sizeof(int32_t) * (size_t)n);
}

/* Outputs [o0, o0 + nb * 32) of nt tokens of one group into ys[t]. */
static inline void pass(const tax_t *c, const rows_t *const *rs, const int64_t *bs, int nt, int64_t g, int64_t o0,
                        int nb, float *const *ys) {
#define PASS(T, NB)                                                                                            \
    do {                                                                                                       \
        if (nt == 1) piece(c, T, rs, bs, 1, g, o0, NB, ys);                                                    \
        else piece(c, T, rs, bs, NT, g, o0, NB, ys);                                                           \
    } while (0)
    if (nb < P) {
        if (nt == 1) piece(c, c->type, rs, bs, 1, g, o0, nb, ys);
        else piece(c, c->type, rs, bs, NT, g, o0, nb, ys);
    } else if (c->type == Q8_0) PASS(Q8_0, P);
    else if (c->type == Q4_0) PASS(Q4_0, P);
    else PASS(Q4_1, P);
#undef PASS
}

/* Threads split the outputs. Outputs [u0 * 32, u1 * 32), group by group and token by token (the thread's
 * span of a group's kept rows, at most 32 of them, stays in L1/L2 while it is read pass by pass and token by
 * token), requesting the span of the next group's kept rows into L2 a pass at a time. Consecutive tokens
 * that keep the same rows of the group (prompt tokens keep all) go NT at a time: the codes unpacked once.
 * (Tried for narrow matrices, where a thread's span of a row is a few hundred bytes: fixed chunks of groups
 * over whole rows, partial sums added in chunk order. On the default model's matrices it was 1.2x slower.) */
static void tax_task(void *p, int64_t u0, int64_t u1) {
    const tax_t *c = p;
    int64_t ng = c->K / QK, row = c->N / QK * c->bpb;
    rows_t r[NT];
    for (int64_t b = 0; b < c->B; b++) memset(c->y + b * c->N + u0 * QK, 0, sizeof(float) * (size_t)((u1 - u0) * QK));
    for (int64_t g = 0; g < ng; g++)
        for (int64_t b = 0; b < c->B;) {
            int nt = 1;
            if (!group_rows(c, b, g, row, &r[0])) {
                b++;
                continue;
            }
            while (nt < NT && b + nt < c->B && same_rows(c, b, b + nt, g)) /* the next tokens with these rows */
                group_rows(c, b + nt, g, row, &r[nt]), nt++;
            const rows_t *rs[NT];
            int64_t bs[NT];
            float *ys[NT];
            for (int t = 0; t < nt; t++) rs[t] = &r[t], bs[t] = b + t;
            for (int64_t o = u0; o < u1; o += P) {
                if (b == 0 && g + 1 < ng) /* as many requests in flight as the passes consume */
                    for (int32_t i = c->any_start[g + 1]; i < c->any_start[g + 2]; i++)
                        for (int64_t at = o * c->bpb; at < (o + P) * c->bpb; at += 64)
                            __builtin_prefetch(c->codes + c->any[i] * row + at, 0, 2);
                for (int t = 0; t < nt; t++) ys[t] = c->y + bs[t] * c->N + o * QK;
                pass(c, rs, bs, nt, g, o * QK, u1 - o < P ? (int)(u1 - o) : P, ys);
            }
            b += nt;
        }
}

/* y [B, N] = W (x masked), x [B, K] fp32: token b keeps input k iff |x[b, k]| > threshold * (sparse ? sparse[b]
 * : 1) (sparse NULL: every token is sparse; sparse[b] == 0: the token keeps every nonzero input, a dense
 * product through the same layout). Kept inputs are quantized to int16 per group of 32 (scale: the group's
 * largest kept |x| / 32767). d, m: fp16 [K / 32, N] (m only for Q4_1). Returns -2 for a layout it does not run
 * (N or K not a multiple of 32, another type), -3 when out of memory. */
int tsparse_linear(const uint8_t *codes, const uint8_t *d, const uint8_t *m, int type, int64_t N, int64_t K,
                   const float *x, int64_t B, float threshold, const uint8_t *sparse, float *y) {
    if ((type != Q4_0 && type != Q4_1 && type != Q8_0) || N % QK || K % QK || (type == Q4_1 && !m)) return -2;
    int64_t ng = K / QK;
    size_t ints = (size_t)(B * K + B * (ng + 1) + K + ng + 1 + 2 * B * ng) + (size_t)(B * K + 1) / 2;
    int32_t *buf = malloc(sizeof(int32_t) * ints);
    uint8_t *seen = calloc((size_t)K, 1);
    if (!buf || !seen) {
        free(buf);
        free(seen);
        return -3;
    }
    int32_t *kept = buf, *start = kept + B * K, *any = start + B * (ng + 1), *any_start = any + K;
    int32_t *sum = any_start + ng + 1;
    float *scale = (float *)(sum + B * ng);
    int16_t *xq = (int16_t *)(scale + B * ng);
    for (int64_t b = 0; b < B; b++) {
        float t = sparse && !sparse[b] ? 0.0f : threshold;
        const float *xb = x + b * K;
        int32_t n = 0, *s = start + b * (ng + 1), *kb = kept + b * K;
        for (int64_t g = 0; g < ng; g++) {
            float amax = 0.0f;
            int32_t first = n, total = 0;
            s[g] = n;
            for (int64_t k = g * QK; k < (g + 1) * QK; k++)
                if (fabsf(xb[k]) > t) {
                    kb[n++] = (int32_t)k, seen[k] = 1;
                    if (fabsf(xb[k]) > amax) amax = fabsf(xb[k]);
                }
            float sc = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            for (int64_t k = g * QK; k < (g + 1) * QK; k++) xq[b * K + k] = 0;
            for (int32_t i = first; i < n; i++) {
                int16_t v = (int16_t)lrintf(xb[kb[i]] * inv);
                xq[b * K + kb[i]] = v, total += v;
            }
            if ((n - first) % 2) { /* an even count: the pair kernel takes two rows at a time */
                int64_t pad = g * QK;
                while (pad < (g + 1) * QK && xq[b * K + pad] != 0) pad++;
                if (pad == (g + 1) * QK) pad = kb[n - 1]; /* cannot happen for an odd count below 32 */
                kb[n++] = (int32_t)pad;
            }
            scale[b * ng + g] = sc, sum[b * ng + g] = total;
        }
        s[ng] = n;
    }
    int32_t n = 0;
    for (int64_t g = 0; g < ng; g++) {
        any_start[g] = n;
        for (int64_t k = g * QK; k < (g + 1) * QK; k++)
            if (seen[k]) any[n++] = (int32_t)k;
    }
    any_start[ng] = n;
    tax_t c = {.codes = codes, .d = d, .m = m, .type = type, .N = N, .K = K, .bpb = type == Q8_0 ? 32 : 16,
               .B = B, .xq = xq, .scale = scale, .sum = sum, .kept = kept, .start = start, .any = any,
               .any_start = any_start, .y = y};
    pool_run(tax_task, &c, N / QK, P); /* whole passes per thread */
    free(buf);
    free(seen);
    return 0;
}
