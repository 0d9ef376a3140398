/* Causal attention of one step's tokens over the paged fp32 KV cache (engine/cache.py: [blocks, block_size,
 * n_kv, D], block_size = 1 << shift; token b's sequence has the block table tables[seq[b] * max_blocks ...]).
 *
 * Work is tiled the way flash attention tiles it: one work item is a tile of up to QT consecutive tokens of
 * one sequence times the query heads that share one kv head, and it walks the keys in blocks of KB. A block's
 * K and V rows are read from memory once per tile and then from L1 for each of its queries (one query at a
 * time, the tile re-read the keys and values of a long context for every token and head: memory-bound).
 *
 * Each query's result is computed in an order fixed by its own position alone: key blocks start at absolute
 * multiples of KB, scores are dot products of one routine, the online softmax rescales at block boundaries,
 * and the weights are summed key by key. So a token gets bitwise the same output whichever tile, step,
 * chunk or batch it lands in (engine/model.py's load-independent results, prefix caching's equal logits). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native.h"

#define KB 32 /* keys per block: KB K rows + KB V rows of D floats stay in L1 across the tile */
#define QT 8  /* tokens per tile */

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    int64_t e = 0;
    if (n % 16 == 0) {
        v16 acc = {0};
        for (; e < n; e += 16) {
            v16 x, y;
            memcpy(&x, a + e, sizeof x);
            memcpy(&y, b + e, sizeof y);
            acc += x * y;
        }
        typedef float v8 __attribute__((vector_size(32), aligned(4)));
        typedef float v4 __attribute__((vector_size(16), aligned(4)));
        v8 h8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
        v4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
        s = (h4[0] + h4[2]) + (h4[1] + h4[3]);
    }
    for (; e < n; e++) s += a[e] * b[e];
    return s;
}

static inline void axpy_f32(float *y, float w, const float *x, int64_t n) {
    int64_t e = 0;
    if (n % 16 == 0)
        for (; e < n; e += 16) {
            v16 a, b;
            memcpy(&a, y + e, sizeof a);
            memcpy(&b, x + e, sizeof b);
            a += w * b;
            memcpy(y + e, &a, sizeof a);
        }
    for (; e < n; e++) y[e] += w * x[e];
}

/* exp of 16 floats at once (x <= 0 here: scores minus their maximum): 2^n * p(r), r = x - n ln 2 in
 * [-ln2/2, ln2/2], p the degree-6 Taylor polynomial (relative error < 2e-7); below -87 it gives exp(-87),
 * which next to the maximum's weight of 1 is nothing. Lane by lane, so each value is independent of its
 * neighbours. */
static inline v16 exp16(v16 x) {
    const v16 lo = {0}, floor_ = lo - 87.0f;
    v16i small = x < floor_;
    x = (v16)(((v16i)x & ~small) | ((v16i)floor_ & small));
    v16 t = x * 1.44269504088896341f + 0.5f;
    v16i n = __builtin_convertvector(t, v16i);
    n += (v16i)(__builtin_convertvector(n, v16) > t); /* truncation toward zero -> floor */
    v16 nf = __builtin_convertvector(n, v16);
    v16 r = x - nf * 0.693145751953125f - nf * 1.428606765330187045e-06f;
    v16 p = (v16){0} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (v16)((n + 127) << 23);
}

typedef struct {
    const float *qkv;
    float *out;
    const float *k_cache, *v_cache;
    const int64_t *tables, *seq, *pos, *tiles;
    int64_t n_tiles, n_heads, n_kv, D, qkv_dim, max_blocks, shift, window;
} pattn_t;

/* One tile (tokens tiles[t] .. tiles[t + 1] - 1) and one kv head g. */
static void attend_tile(const pattn_t *a, int64_t t, int64_t g, int64_t D) {
    int64_t b0 = a->tiles[t], nb = a->tiles[t + 1] - b0, group = a->n_heads / a->n_kv, nq = nb * group;
    int64_t stride = a->n_kv * D, lo_q[QT], hi_q[QT], kmin = INT64_MAX, kmax = 0;
    const int64_t *table = a->tables + a->seq[b0] * a->max_blocks;
    float acc[nq * D], m[nq], l[nq], scale = 1.0f / sqrtf((float)D);
    for (int64_t i = 0; i < nb; i++) {
        int64_t p = a->pos[b0 + i];
        lo_q[i] = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        hi_q[i] = p + 1;
        kmin = lo_q[i] < kmin ? lo_q[i] : kmin;
        kmax = hi_q[i] > kmax ? hi_q[i] : kmax;
    }
    memset(acc, 0, sizeof acc);
    for (int64_t q = 0; q < nq; q++) m[q] = -INFINITY, l[q] = 0.0f;
    const float *krow[KB], *vrow[KB];
    for (int64_t start = kmin - kmin % KB; start < kmax; start += KB) {
        int64_t n_keys = kmax - start < KB ? kmax - start : KB;
        for (int64_t j = 0; j < n_keys; j++) {
            size_t row = cache_row(table, a->shift, start + j) * stride + g * D;
            krow[j] = a->k_cache + row, vrow[j] = a->v_cache + row;
        }
        for (int64_t q = 0; q < nq; q++) {
            int64_t i = q / group, h = g * group + q % group;
            int64_t jlo = lo_q[i] > start ? lo_q[i] - start : 0;
            int64_t jhi = hi_q[i] - start < n_keys ? hi_q[i] - start : n_keys;
            if (jlo >= jhi) continue;
            const float *qv = a->qkv + (b0 + i) * a->qkv_dim + h * D;
            float s[KB], w[KB], cmax = -INFINITY;
            for (int64_t j = 0; j < KB; j++) s[j] = -INFINITY;
            for (int64_t j = jlo; j < jhi; j++) {
                s[j] = dot_f32(qv, krow[j], D) * scale;
                cmax = s[j] > cmax ? s[j] : cmax;
            }
            float *o = acc + q * D;
            if (cmax > m[q]) { /* rescale what was summed under the old maximum */
                float r = expf(m[q] - cmax);
                l[q] *= r;
                for (int64_t e = 0; e < D; e++) o[e] *= r;
                m[q] = cmax;
            }
            for (int64_t j = 0; j < KB; j += 16) {
                v16 x;
                memcpy(&x, s + j, sizeof x);
                x = exp16(x - m[q]);
                memcpy(w + j, &x, sizeof x);
            }
            for (int64_t j = jlo; j < jhi; j++) {
                l[q] += w[j];
                axpy_f32(o, w[j], vrow[j], D);
            }
        }
    }
    for (int64_t q = 0; q < nq; q++) {
        int64_t i = q / group, h = g * group + q % group;
        float *o = a->out + (b0 + i) * a->n_heads * D + h * D, inv = 1.0f / l[q];
        for (int64_t e = 0; e < D; e++) o[e] = acc[q * D + e] * inv;
    }
}

static void tiles_task(void *p, int64_t i0, int64_t i1) {
    const pattn_t *a = p;
    for (int64_t i = i0; i < i1; i++) {
        /* tiles interleaved from both ends, so that the contiguous ranges the threads get hold as many early
         * (short-context) tiles of a prefill chunk as late ones */
        int64_t u = i / a->n_kv, t = (u & 1) ? a->n_tiles - 1 - (u >> 1) : (u >> 1);
        if (a->D == 64) attend_tile(a, t, i % a->n_kv, 64);
        else if (a->D == 128) attend_tile(a, t, i % a->n_kv, 128);
        else attend_tile(a, t, i % a->n_kv, a->D);
    }
}

/* out [B, n_heads, D] = softmax(q k^T / sqrt(D)) v for each token b over its sequence's keys lo..pos[b], with
 * q the first n_heads * D values of qkv [B, qkv_dim]. Tokens of one sequence are consecutive in the step. */
void paged_attention(const float *qkv, int64_t qkv_dim, float *out, const float *k_cache, const float *v_cache,
                     const int64_t *tables, const int64_t *seq, const int64_t *pos, int64_t B, int64_t n_heads,
                     int64_t n_kv, int64_t D, int64_t max_blocks, int64_t shift, int64_t window) {
    int64_t tiles[B + 1], n_tiles = 0;
    for (int64_t b = 0; b < B; b++)
        if (b == 0 || seq[b] != seq[b - 1] || b - tiles[n_tiles - 1] == QT) tiles[n_tiles++] = b;
    tiles[n_tiles] = B;
    pattn_t a = {.qkv = qkv, .out = out, .k_cache = k_cache, .v_cache = v_cache, .tables = tables, .seq = seq,
                 .pos = pos, .tiles = tiles, .n_tiles = n_tiles, .n_heads = n_heads, .n_kv = n_kv, .D = D,
                 .qkv_dim = qkv_dim, .max_blocks = max_blocks, .shift = shift, .window = window};
    pool_run(tiles_task, &a, n_tiles * n_kv, 1);
}
