/* Sparse products over quantized rows: the gathered FFN of the active neurons, and the axpy it ends with.
 *
 * A neuron owns one row of gate/up (quant.c's quant_dots reads the active ones by id) and one row of down_t
 * [I, H]: GGUF's `ffn_down` [H, I] re-quantized along H at load, as PowerInfer's converter does, so that an
 * active neuron's down weights are a contiguous run of blocks instead of one weight per output row.
 *     y[b, :] += sum_k h[b, k] * down_t[idx[k], :]
 * Outputs are taken 256 at a time (16 vector registers); for each token, every row's 256-wide piece is
 * unpacked (int8 codes, a scale and a minimum per 32) and added, scaled by h, into the registers, which are
 * written out once. Threads split the output columns in whole pieces, so each output sums its rows in k order
 * whatever the thread count; a token whose h is 0 for a row skips it, so a token's result does not depend on
 * the other tokens of the batch either (a row's piece is read from L2 again for the batch's later tokens). The same kernel is an input-sparse
 * product (TEAL): rows of W^T for the inputs that survive, h the inputs themselves.
 */
#include "native.h"

#include <stdlib.h>
#include <string.h>

#define G 8 /* blocks of 32 outputs per pass: 16 vector accumulators, and one K-quant super-block */
#define AHEAD 8 /* rows prefetched ahead */

typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef uint8_t vb __attribute__((vector_size(16), aligned(1)));
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));
/* unsigned bytes -> int32 -> float: GCC widens in one step (vpmovzxbd), where a direct byte -> float
 * conversion, or a signed byte -> int32 one, came out as 16 scalar conversions; signed codes are shifted to
 * unsigned (q + 128) and the shift folded into the block's minimum */
#define TO_VF(v) __builtin_convertvector(__builtin_convertvector(v, vi), vf)

/* One block of 32 weights as w = d * (lo|hi) + m, lo/hi the codes of weights 0-15 and 16-31. */
static inline __attribute__((always_inline)) void decode(int type, const uint8_t *r, vf *lo, vf *hi, float *d,
                                                         float *m) {
    *d = f16_at(r);
    if (type == Q8_0) { /* codes shifted to unsigned (q + 128), the shift folded into m */
        vb a, b;
        memcpy(&a, r + 2, 16);
        memcpy(&b, r + 18, 16);
        *lo = TO_VF(a ^ 0x80), *hi = TO_VF(b ^ 0x80), *m = -128.0f * *d;
        return;
    }
    vb v;
    memcpy(&v, r + (type == Q4_0 ? 2 : 4), 16);
    *lo = TO_VF(v & 0xF), *hi = TO_VF(v >> 4);
    *m = type == Q4_0 ? -8.0f * *d : f16_at(r + 2);
}

typedef struct {
    const uint8_t *W;
    int type;
    int64_t row_bytes, cols, units, bytes, K, B; /* units: blocks of 32 per block of the type (1, or 8) */
    const int64_t *idx;
    const float *h;
    float *y;
} axpy_t;

/* y[blk * 32 + j] += acc + ms[blk]: a pass's sums, added to the outputs once. */
static inline __attribute__((always_inline)) void store(float *y, const vf *acc, const float *ms, int nb) {
    for (int blk = 0; blk < nb; blk++)
        for (int j = 0; j < 16; j++) {
            y[blk * QK + j] += acc[2 * blk][j] + ms[blk];
            y[blk * QK + 16 + j] += acc[2 * blk + 1][j] + ms[blk];
        }
}

/* Outputs [g0 * 32, (g0 + nb) * 32) of token b over Q4_0, Q4_1 or Q8_0 rows (type and nb <= G constants at
 * each call, so that the loops unroll and the accumulators stay in registers):
 * the sum over every row with a nonzero h, kept in registers (acc: the d * q terms; ms: the minimum's m terms
 * per block), then added to y once. */
static inline __attribute__((always_inline)) void fast_pass(const axpy_t *c, int type, int64_t b, int64_t g0,
                                                            int nb, int64_t pf) {
    vf acc[2 * G];
    float ms[G];
#pragma GCC unroll 16
    for (int i = 0; i < 2 * G; i++) acc[i] = (vf){0};
#pragma GCC unroll 8
    for (int i = 0; i < G; i++) ms[i] = 0.0f;
    const float *h = c->h + b * c->K;
    int64_t off = g0 * c->bytes;
    for (int64_t k = 0; k < c->K; k++) {
        if (pf && k + AHEAD < c->K) prefetch_span(c->W + c->idx[k + AHEAD] * c->row_bytes + off, pf);
        float hk = h[k];
        if (hk == 0.0f) continue;
        const uint8_t *r = c->W + c->idx[k] * c->row_bytes + off;
#pragma GCC unroll 8
        for (int blk = 0; blk < nb; blk++) {
            vf lo, hi;
            float db, mb;
            decode(type, r + blk * c->bytes, &lo, &hi, &db, &mb);
            acc[2 * blk] += (hk * db) * lo;
            acc[2 * blk + 1] += (hk * db) * hi;
            ms[blk] += hk * mb;
        }
    }
    store(c->y + b * c->cols + g0 * QK, acc, ms, nb);
}

#define FAST_CASES(T)                                                                                          \
    switch (nb) {                                                                                              \
    case 1: fast_pass(c, T, b, g0, 1, pf); break;                                                              \
    case 2: fast_pass(c, T, b, g0, 2, pf); break;                                                              \
    case 3: fast_pass(c, T, b, g0, 3, pf); break;                                                              \
    case 4: fast_pass(c, T, b, g0, 4, pf); break;                                                              \
    case 5: fast_pass(c, T, b, g0, 5, pf); break;                                                              \
    case 6: fast_pass(c, T, b, g0, 6, pf); break;                                                              \
    case 7: fast_pass(c, T, b, g0, 7, pf); break;                                                              \
    default: fast_pass(c, T, b, g0, G, pf);                                                                    \
    }

/* The same for any type and nb blocks (a partial group, other formats): rows unpacked by formats.c, and the
 * sums in the same order as fast_pass, so a row's result does not depend on which of the two ran. */
static void slow_pass(const axpy_t *c, int64_t b, int64_t g0, int nb) {
    vf acc[2 * G];
    float ms[G], d[G], m[G];
    int8_t q[G * QK];
    for (int i = 0; i < 2 * G; i++) acc[i] = (vf){0};
    for (int i = 0; i < G; i++) ms[i] = 0.0f;
    const float *h = c->h + b * c->K;
    int64_t off = g0 / c->units * c->bytes;
    for (int64_t k = 0; k < c->K; k++) {
        float hk = h[k];
        if (hk == 0.0f) continue;
        quant_unpack_row(c->type, c->W + c->idx[k] * c->row_bytes + off, (int64_t)nb * QK, q, d, m);
        for (int blk = 0; blk < nb; blk++) { /* int8 codes as unsigned q + 128, as in decode */
            vb lo, hi;
            memcpy(&lo, q + blk * QK, 16);
            memcpy(&hi, q + blk * QK + 16, 16);
            acc[2 * blk] += (hk * d[blk]) * TO_VF(lo ^ 0x80);
            acc[2 * blk + 1] += (hk * d[blk]) * TO_VF(hi ^ 0x80);
            ms[blk] += hk * (m[blk] - 128.0f * d[blk]);
        }
    }
    store(c->y + b * c->cols + g0 * QK, acc, ms, nb);
}

/* Columns [u0, u1) in blocks of 32 (whole blocks of the type), up to G blocks per pass, every token in turn. */
static void axpy_task(void *p, int64_t u0, int64_t u1) {
    const axpy_t *c = p;
    for (int64_t g0 = u0; g0 < u1; g0 += G) {
        int nb = u1 - g0 < G ? (int)(u1 - g0) : G;
        for (int64_t b = 0; b < c->B; b++) {
            /* the first pass requests each row's whole range for this thread, AHEAD rows early (a gathered
             * row is a DRAM miss the hardware prefetcher cannot guess); later passes find it in L2 */
            int64_t pf = g0 == u0 && b == 0 ? (u1 - u0) * c->bytes : 0;
            if (c->type == Q4_0) FAST_CASES(Q4_0)
            else if (c->type == Q4_1) FAST_CASES(Q4_1)
            else if (c->type == Q8_0) FAST_CASES(Q8_0)
            else slow_pass(c, b, g0, nb);
        }
    }
}

static int check_layout(int type, int64_t cols, int64_t row_bytes) {
    int bytes = quant_block_bytes(type), bs = quant_block_size(type);
    return !bytes || cols % bs || row_bytes != cols / bs * bytes ? -2 : 0;
}

/* y [B, cols] += sum_k h[b, k] * row idx[k] of W [n_rows, cols] (GGUF blocks of `type`); h [B, K] fp32. */
int quant_axpy(const uint8_t *W, int type, int64_t n_rows, int64_t row_bytes, int64_t cols, const int64_t *idx,
               int64_t K, const float *h, int64_t B, float *y) {
    if (check_layout(type, cols, row_bytes)) return -2;
    if (check_ids(idx, K, n_rows)) return -1;
    int64_t units = quant_block_size(type) / QK;
    axpy_t c = {.W = W, .type = type, .row_bytes = row_bytes, .cols = cols, .units = units,
                .bytes = quant_block_bytes(type), .K = K, .B = B, .idx = idx, .h = h, .y = y};
    pool_run(axpy_task, &c, cols / QK, units); /* whole blocks of the type: balanced over the threads */
    return 0;
}

typedef struct {
    const float *z, *bias;
    const int64_t *idx;
    const uint8_t *mask;
    float *h;
    int64_t K, parts;
    int gate_fn, up_fn;
    float threshold;
} sact_t;

static void sact_task(void *p, int64_t r0, int64_t r1) { /* rows r = b * K + k of z [B*K, parts] -> h */
    const sact_t *a = p;
    for (int64_t r = r0; r < r1; r++) {
        if (a->mask && !a->mask[r]) {
            a->h[r] = 0.0f;
            continue;
        }
        const float *z = a->z + r * a->parts;
        const float *bias = a->bias ? a->bias + a->idx[r % a->K] * a->parts : 0;
        float v = act(a->up_fn, z[a->parts - 1] + (bias ? bias[a->parts - 1] : 0.0f), a->threshold);
        if (a->parts == 2) v *= act(a->gate_fn, z[0] + (bias ? bias[0] : 0.0f), a->threshold);
        a->h[r] = v;
    }
}

/* The FFN of B tokens over the K neurons idx, in one call: y [B, H] = sum_k h[b, k] * down_t[idx[k]] with
 * h[b, k] = gate_fn(gate . rmsnorm(x_b)) * up_fn(up . rmsnorm(x_b)) (biases fp32 [I, parts] or NULL), zero where
 * mask[b * K + k] == 0 (mask NULL: every token needs every listed neuron). Gate and up rows interleaved in
 * Wgu [I * parts, H], down_t [I, H]. scratch: B * K * (parts + 1) floats, then H / 32 * 40 * B bytes. */
int quant_sparse_ffn(const uint8_t *Wgu, int type_gu, int64_t rb_gu, const uint8_t *Wd, int type_d, int64_t rb_d,
                     int64_t I, int64_t H, int64_t parts, const int64_t *idx, int64_t K, const float *x, int64_t B,
                     const float *norm, float eps, const float *gu_bias, const uint8_t *mask, int gate_fn,
                     int up_fn, float threshold, float *scratch, float *y) {
    if (check_layout(type_d, H, rb_d)) return -2;
    memset(y, 0, sizeof(float) * (size_t)(B * H));
    if (K == 0) return 0;
    float *z = scratch, *h = scratch + B * K * parts;
    int s = quant_dots(Wgu, type_gu, I, rb_gu, H, parts, idx, K, x, B, norm, eps, h + B * K, z);
    if (s) return s;
    sact_t a = {.z = z, .bias = gu_bias, .idx = idx, .mask = mask, .h = h, .K = K, .parts = parts,
                .gate_fn = gate_fn, .up_fn = up_fn, .threshold = threshold};
    pool_run(sact_task, &a, B * K, 256);
    return quant_axpy(Wd, type_d, I, rb_d, H, idx, K, h, B, y);
}
