/* The FFN and the whole pre-norm transformer block over quantized matrices, one native call each: the Python
 * and torch dispatch between a block's ~12 small ops cost as much as reading its weights on a small model.
 * The products are kernels/quant.c's (quant_dots), attention kernels/attention.c's; RoPE is plain fp32 C here. */
#include "native.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *z, *bias;
    float *h;
    int64_t I, parts;
    int gate_fn, up_fn;
    float threshold; /* FATReLU's t */
} act_t;

static void act_task(void *p, int64_t r0, int64_t r1) { /* rows r of z [B*I, parts] -> h [B*I] */
    const act_t *a = p;
    for (int64_t r = r0; r < r1; r++) {
        const float *z = a->z + r * a->parts;
        const float *bias = a->bias ? a->bias + (r % a->I) * a->parts : 0;
        float u = z[a->parts - 1] + (bias ? bias[a->parts - 1] : 0.0f), v = act(a->up_fn, u, a->threshold);
        if (a->parts == 2) v *= act(a->gate_fn, z[0] + (bias ? bias[0] : 0.0f), a->threshold);
        a->h[r] = v;
    }
}

typedef struct { /* one matrix, as Python passes it (kernels/block.py's _QMat) */
    const uint8_t *data;
    int64_t type, rows, row_bytes, cols;
    const uint8_t *scales, *mins; /* input-major (kernels/tsparse.c): data holds the codes; else NULL */
    float threshold;              /* input-major: inputs with |x| <= threshold are dropped by sparse tokens */
} qmat_t;

static void rms_rows(const float *x, int64_t B, int64_t H, const float *w, float eps, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *r = x + b * H;
        float ss = 0.0f;
        for (int64_t j = 0; j < H; j++) ss += r[j] * r[j];
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t j = 0; j < H; j++) out[b * H + j] = w[j] * (r[j] * inv);
    }
}

/* out [B, w->rows] = w . rmsnorm(x) (no norm when NULL): integer dots over row-major blocks, or, for an
 * input-major matrix, the input-sparse product (tokens with sparse[b] != 0 drop inputs under its threshold).
 * normed: B * cols floats of scratch for the latter. */
static int product(const qmat_t *w, const float *x, int64_t B, const float *norm, float eps, void *xq, float *normed,
                   const uint8_t *sparse, float *out) {
    if (!w->scales)
        return quant_dots(w->data, (int)w->type, w->rows, w->row_bytes, w->cols, 1, 0, w->rows, x, B, norm, eps, xq,
                          out);
    if (norm) rms_rows(x, B, w->cols, norm, eps, normed);
    return tsparse_linear(w->data, w->scales, w->mins, (int)w->type, w->rows, w->cols, norm ? normed : x, B,
                          w->threshold, sparse, out);
}

/* The dense FFN of B tokens: y [B, H] = down . act(gate_up . rmsnorm(x)), gate and up rows interleaved in
 * gate_up [I * parts, H], down [H, I] (GGUF's layout, or input-major); biases of gate/up fp32 [I, parts] or NULL.
 * scratch: B * (I * parts + I + max(H, I)) floats and max(H, I) / 32 * 40 * B bytes, passed as one buffer. */
static int ffn(const qmat_t *gu, const qmat_t *down, int64_t parts, const float *x, int64_t B, const float *norm,
               float eps, const float *gu_bias, int gate_fn, int up_fn, float threshold, const uint8_t *sparse,
               float *scratch, float *y) {
    int64_t I = gu->rows / parts, H = gu->cols, wide = H > I ? H : I;
    float *z = scratch, *h = scratch + B * I * parts, *normed = h + B * I;
    void *xq = normed + B * wide;
    int s = product(gu, x, B, norm, eps, xq, normed, sparse, z);
    if (s) return s;
    act_t a = {.z = z, .bias = gu_bias, .h = h, .I = I, .parts = parts, .gate_fn = gate_fn, .up_fn = up_fn,
               .threshold = threshold};
    pool_run(act_task, &a, B * I, 64);
    return product(down, h, B, 0, 0.0f, xq, normed, sparse, y);
}

/* quant_ffn: the same over two row-major matrices, for kernels/quant.py's ffn. */
int quant_ffn(const uint8_t *Wgu, int type_gu, int64_t rb_gu, const uint8_t *Wd, int type_d, int64_t rb_d,
              int64_t I, int64_t H, int64_t parts, const float *x, int64_t B, const float *norm, float eps,
              const float *gu_bias, int gate_fn, int up_fn, float *scratch, float *y, float threshold) {
    qmat_t gu = {.data = Wgu, .type = type_gu, .rows = I * parts, .row_bytes = rb_gu, .cols = H},
           down = {.data = Wd, .type = type_d, .rows = H, .row_bytes = rb_d, .cols = I};
    return ffn(&gu, &down, parts, x, B, norm, eps, gu_bias, gate_fn, up_fn, threshold, 0, scratch, y);
}

/* ---- One pre-norm transformer block over quantized weights, for the tokens of one step ----
 * x [B, H] += o . attn(rope(qkv . rmsnorm(x)));  x += ffn(rmsnorm(x)): the Llama-family block, where each
 * token attends to the cached keys of its own sequence up to its own position. All tokens' keys and values
 * are written first, so prefill chunks are causal too. Attention (kernels/attention.c) runs in fp32.
 * The cache is paged (engine/cache.py): [blocks, block_size, n_kv, D], block_size = 1 << shift; token b's
 * sequence has the block table tables[seq[b] * max_blocks ...], so position p lives in cache row
 * (table[p >> shift] << shift) + (p & mask). */
/* rope (rotate-half, cos/sin [B, D]) on q and k heads, then k and v into each token's cache row. */
static void rope_and_store(float *qkv, int64_t B, int64_t qkv_dim, int64_t n_heads, int64_t n_kv, int64_t D,
                           const float *cos, const float *sin, float *k_cache, float *v_cache,
                           const int64_t *tables, const int64_t *seq, const int64_t *pos, int64_t max_blocks,
                           int64_t shift) {
    int64_t half = D / 2;
    float tmp[D];
    for (int64_t b = 0; b < B; b++) {
        float *t = qkv + b * qkv_dim;
        if (cos)
            for (int64_t h = 0; h < n_heads + n_kv; h++) {
                float *x = t + h * D;
                const float *c = cos + b * D, *sn = sin + b * D;
                for (int64_t e = 0; e < half; e++) {
                    tmp[e] = x[e] * c[e] + (-x[e + half]) * sn[e];
                    tmp[e + half] = x[e + half] * c[e + half] + x[e] * sn[e + half];
                }
                memcpy(x, tmp, sizeof(float) * (size_t)D);
            }
        for (int64_t h = 0; h < n_kv; h++) {
            size_t at = (cache_row(tables + seq[b] * max_blocks, shift, pos[b]) * n_kv + h) * D;
            memcpy(k_cache + at, t + (n_heads + h) * D, sizeof(float) * (size_t)D);
            memcpy(v_cache + at, t + (n_heads + n_kv + h) * D, sizeof(float) * (size_t)D);
        }
    }
}

/* x [B, H] updated in place (gate_up NULL: attention and its residual only). scratch: enough floats for qkv
 * [B, qkv_dim], the attention output [B, nh * D], the projections' [B, max(H, qkv_dim)] and the FFN's scratch
 * (kernels/block.py sizes it). sparse [B] (or NULL: none): the tokens whose input-major matrices drop inputs. */
int quant_block(float *x, int64_t B, int64_t H, const float *attn_norm, const float *ffn_norm, float eps,
                const qmat_t *wqkv, const float *bqkv, const qmat_t *wo, const float *bo,
                const qmat_t *gate_up, const qmat_t *down, int64_t parts, const float *gu_bias,
                const float *down_bias, int gate_fn, int up_fn, const float *cos, const float *sin,
                float *k_cache, float *v_cache, const int64_t *tables, const int64_t *seq, const int64_t *pos,
                int64_t max_blocks, int64_t shift, int64_t n_heads, int64_t n_kv, int64_t D, int64_t window,
                float *scratch, float threshold, const uint8_t *sparse) {
    int64_t qkv_dim = wqkv->rows, I = gate_up ? gate_up->rows / parts : 0, q_size = n_heads * D;
    float *qkv = scratch, *att = qkv + B * qkv_dim, *proj = att + B * q_size, *normed = proj + B * H;
    float *rest = normed + B * (H > q_size ? H : q_size);
    void *xq = rest;
    int s = product(wqkv, x, B, attn_norm, eps, xq, normed, sparse, qkv);
    if (s) return s;
    if (bqkv)
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < qkv_dim; j++) qkv[b * qkv_dim + j] += bqkv[j];
    rope_and_store(qkv, B, qkv_dim, n_heads, n_kv, D, cos, sin, k_cache, v_cache, tables, seq, pos, max_blocks,
                   shift);
    paged_attention(qkv, qkv_dim, att, k_cache, v_cache, tables, seq, pos, B, n_heads, n_kv, D, max_blocks, shift,
                    window);
    s = product(wo, att, B, 0, 0.0f, xq, normed, sparse, proj);
    if (s) return s;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) x[b * H + j] += proj[b * H + j] + (bo ? bo[j] : 0.0f);
    if (!gate_up) return 0; /* attention alone: the caller runs the FFN */
    s = ffn(gate_up, down, parts, x, B, ffn_norm, eps, gu_bias, gate_fn, up_fn, threshold, sparse, rest, proj);
    if (s) return s;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) x[b * H + j] += proj[b * H + j] + (down_bias ? down_bias[j] : 0.0f);
    return 0;
}
