/* GGUF's block formats on the CPU: their sizes, one row unpacked into codes, scales and minimums (what
 * quant.c's products and qsparse.c's gathered rows read), and whole matrices dequantized or quantized.
 *
 * Type codes are GGML's (native.h). Every format here is, per 32 weights, an int8 code times a scale plus a
 * minimum: w = d * q + m. K-quants (Q4_K, Q5_K) pack eight such blocks, with 6-bit scales and minimums, in a
 * super-block of 256. Quantizing follows GGML's reference rules (Q8_0, Q4_0, Q4_1).
 */
#include "native.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* The arguments of a conversion over rows [r0, r1), as pool_run hands them to each thread. */
typedef struct {
    const uint8_t *W;
    uint8_t *Q;
    int64_t row_bytes, cols, K;
    int type, tiled; /* tiled: W is in kernels/tiles.c's tiles (each row is rebuilt first) */
    const int64_t *idx;
    const float *x;
    float *out;
} convert_t;

/* Bytes per block and weights per block of a type; 0 for a type these kernels do not run. */
int quant_block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    default: return 0;
    }
}

int quant_block_size(int type) { return type == Q4_K || type == Q5_K ? 256 : QK; }

static inline void scale_min_k4(int j, const uint8_t *s, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *d = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* One row of `cols` weights into q (int8), d and m (one each per 32 weights). */
void quant_unpack_row(int type, const uint8_t *r, int64_t cols, int8_t *q, float *d, float *m) {
    int64_t nb = cols / QK;
    if (type == Q4_K || type == Q5_K) {
        int bytes = quant_block_bytes(type);
        for (int64_t s = 0; s < cols / 256; s++, r += bytes) {
            const uint8_t *sc = r + 4, *qh = r + 16, *qs = r + (type == Q4_K ? 16 : 48);
            float dd = f16_at(r), dmin = f16_at(r + 2);
            for (int j = 0; j < 8; j++) {
                uint8_t a, b;
                scale_min_k4(j, sc, &a, &b);
                int64_t blk = s * 8 + j;
                d[blk] = dd * a;
                m[blk] = -dmin * b;
                const uint8_t *src = qs + (j / 2) * 32;
                int shift = (j & 1) * 4;
                int8_t *dst = q + blk * QK;
                for (int l = 0; l < QK; l++) {
                    int v = (src[l] >> shift) & 0xF;
                    if (type == Q5_K) v += (qh[l] >> j) & 1 ? 16 : 0;
                    dst[l] = (int8_t)v;
                }
            }
        }
        return;
    }
    int bytes = quant_block_bytes(type);
    for (int64_t b = 0; b < nb; b++, r += bytes) {
        int8_t *dst = q + b * QK;
        d[b] = f16_at(r);
        switch (type) {
        case Q8_0:
            m[b] = 0.0f;
            memcpy(dst, r + 2, QK);
            break;
        case Q4_0:
        case Q4_1: {
            const uint8_t *qs = r + (type == Q4_0 ? 2 : 4);
            int off = type == Q4_0 ? 8 : 0;
            m[b] = type == Q4_0 ? 0.0f : f16_at(r + 2);
#if defined(__AVX2__)
            __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0xF), o = _mm_set1_epi8(off);
            _mm_storeu_si128((__m128i *)dst, _mm_sub_epi8(_mm_and_si128(v, mask), o));
            _mm_storeu_si128((__m128i *)(dst + 16), _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), o));
#else
            for (int l = 0; l < 16; l++) {
                dst[l] = (int8_t)((qs[l] & 0xF) - off);
                dst[l + 16] = (int8_t)((qs[l] >> 4) - off);
            }
#endif
            break;
        }
        default: { /* Q5_0, Q5_1 */
            const uint8_t *qhp = r + (type == Q5_0 ? 2 : 4), *qs = qhp + 4;
            uint32_t qh;
            memcpy(&qh, qhp, 4);
            int off = type == Q5_0 ? 16 : 0;
            m[b] = type == Q5_0 ? 0.0f : f16_at(r + 2);
            for (int l = 0; l < 16; l++) {
                dst[l] = (int8_t)(((qs[l] & 0xF) | (((qh >> l) << 4) & 0x10)) - off);
                dst[l + 16] = (int8_t)(((qs[l] >> 4) | ((qh >> (l + 12)) & 0x10)) - off);
            }
        }
        }
    }
}

static void dequant_task(void *p, int64_t r0, int64_t r1) {
    const convert_t *c = p;
    int64_t cols = c->cols, nb = cols / QK;
    int8_t tq[cols]; /* one row: a few KB */
    float tdm[2 * nb];
    uint8_t bytes[c->tiled ? c->row_bytes : 1];
    for (int64_t r = r0; r < r1; r++) {
        int64_t row = c->idx ? c->idx[r] : r;
        if (c->tiled) quant_untile(c->W, c->type, c->K, cols, &row, 1, bytes);
        quant_unpack_row(c->type, c->tiled ? bytes : c->W + row * c->row_bytes, cols, tq, tdm, tdm + nb);
        float *o = c->out + r * cols;
        for (int64_t j = 0; j < cols; j++) o[j] = tdm[j / QK] * (float)tq[j] + tdm[nb + j / QK];
    }
}

/* out [K, cols] fp32 = rows idx (or 0..K-1) of W (row-major, or tiled: type | TILED), dequantized exactly as
 * GGML does (d * q + m, fp32). */
int quant_dequantize(const uint8_t *W, int type, int64_t n_rows, int64_t row_bytes, int64_t cols,
                     const int64_t *idx, int64_t K, float *out) {
    int tiled = type & TILED;
    type &= ~TILED;
    int bytes = quant_block_bytes(type);
    if (!bytes || cols % quant_block_size(type) || row_bytes != cols / quant_block_size(type) * bytes) return -2;
    if (idx && check_ids(idx, K, n_rows)) return -1;
    convert_t c = {.W = W, .row_bytes = row_bytes, .cols = cols, .type = type, .idx = idx, .out = out,
                   .tiled = tiled, .K = n_rows};
    pool_run(dequant_task, &c, K, 16);
    return 0;
}

static void quantize_rows_task(void *p, int64_t r0, int64_t r1) {
    const convert_t *c = p;
    int bytes = quant_block_bytes(c->type);
    for (int64_t r = r0; r < r1; r++) {
        const float *x = c->x + r * c->cols;
        uint8_t *o = c->Q + r * c->row_bytes;
        for (int64_t b = 0; b < c->cols / QK; b++, x += QK, o += bytes) {
            float amax = 0.0f, max = 0.0f, min = x[0], hi = x[0];
            for (int j = 0; j < QK; j++) {
                if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; }
                min = fminf(min, x[j]);
                hi = fmaxf(hi, x[j]);
            }
            if (c->type == Q8_0) {
                float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                f16_put(o, d);
                for (int j = 0; j < QK; j++) o[2 + j] = (uint8_t)(int8_t)nearbyintf(x[j] * id);
            } else if (c->type == Q4_0) {
                float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                f16_put(o, d);
                for (int l = 0; l < 16; l++) {
                    int a = (int)(x[l] * id + 8.5f), b2 = (int)(x[l + 16] * id + 8.5f);
                    o[2 + l] = (uint8_t)((a > 15 ? 15 : a) | ((b2 > 15 ? 15 : b2) << 4));
                }
            } else { /* Q4_1 */
                float d = (hi - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                f16_put(o, d);
                f16_put(o + 2, min);
                for (int l = 0; l < 16; l++) {
                    int a = (int)((x[l] - min) * id + 0.5f), b2 = (int)((x[l + 16] - min) * id + 0.5f);
                    o[4 + l] = (uint8_t)((a > 15 ? 15 : a) | ((b2 > 15 ? 15 : b2) << 4));
                }
            }
        }
    }
}

/* out [n_rows, row_bytes] = x [n_rows, cols] fp32 quantized to Q8_0, Q4_0 or Q4_1 (GGML's reference rules). */
int quant_quantize(const float *x, int type, int64_t n_rows, int64_t cols, uint8_t *out) {
    if ((type != Q8_0 && type != Q4_0 && type != Q4_1) || cols % QK) return -2;
    convert_t c = {.Q = out, .row_bytes = cols / QK * quant_block_bytes(type), .cols = cols, .type = type, .x = x};
    pool_run(quantize_rows_task, &c, n_rows, 16);
    return 0;
}
