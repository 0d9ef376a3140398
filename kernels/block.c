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

/* The dense FFN of B tokens in one call: y [B, H] = down . act(gate_up . rmsnorm(x)), gate and up rows
 * interleaved in Wgu [I * parts, H], down as GGUF stores it [H, I]; biases of gate/up fp32 [I, parts] or NULL.
 * scratch: B * (I * parts + I) floats and max(H, I) / 32 * 40 * B bytes, passed as one buffer. */
int quant_ffn(const uint8_t *Wgu, int type_gu, int64_t rb_gu, const uint8_t *Wd, int type_d, int64_t rb_d,
              int64_t I, int64_t H, int64_t parts, const float *x, int64_t B, const float *norm, float eps,
              const float *gu_bias, int gate_fn, int up_fn, float *scratch, float *y, float threshold) {
    float *z = scratch, *h = scratch + B * I * parts;
    void *xq = h + B * I;
    int s = quant_dots(Wgu, type_gu, I, rb_gu, H, parts, 0, I, x, B, norm, eps, xq, z);
    if (s) return s;
    act_t a = {.z = z, .bias = gu_bias, .h = h, .I = I, .parts = parts, .gate_fn = gate_fn, .up_fn = up_fn,
               .threshold = threshold};
    pool_run(act_task, &a, B * I, 64);
    return quant_dots(Wd, type_d, H, rb_d, I, 1, 0, H, h, B, 0, 0.0f, xq, y);
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

typedef struct { /* one quantized matrix, as Python passes it */
    const uint8_t *data;
    int64_t type, rows, row_bytes, cols;
} qmat_t;

/* x [B, H] updated in place (gate_up NULL: attention and its residual only). scratch: enough floats for qkv [B, qkv_dim], the attention output [B, nh * D],
 * the projections' [B, max(H, qkv_dim)] and the FFN's scratch (kernels/quant.py sizes it). */
int quant_block(float *x, int64_t B, int64_t H, const float *attn_norm, const float *ffn_norm, float eps,
                const qmat_t *wqkv, const float *bqkv, const qmat_t *wo, const float *bo,
                const qmat_t *gate_up, const qmat_t *down, int64_t parts, const float *gu_bias,
                const float *down_bias, int gate_fn, int up_fn, const float *cos, const float *sin,
                float *k_cache, float *v_cache, const int64_t *tables, const int64_t *seq, const int64_t *pos,
                int64_t max_blocks, int64_t shift, int64_t n_heads, int64_t n_kv, int64_t D, int64_t window,
                float *scratch, float threshold) {
    int64_t qkv_dim = wqkv->rows, I = gate_up ? gate_up->rows / parts : 0, q_size = n_heads * D;
    float *qkv = scratch, *att = qkv + B * qkv_dim, *proj = att + B * q_size, *rest = proj + B * H;
    void *xq = rest;
    int s = quant_dots(wqkv->data, (int)wqkv->type, qkv_dim, wqkv->row_bytes, H, 1, 0, qkv_dim, x, B, attn_norm,
                       eps, xq, qkv);
    if (s) return s;
    if (bqkv)
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < qkv_dim; j++) qkv[b * qkv_dim + j] += bqkv[j];
    rope_and_store(qkv, B, qkv_dim, n_heads, n_kv, D, cos, sin, k_cache, v_cache, tables, seq, pos, max_blocks,
                   shift);
    paged_attention(qkv, qkv_dim, att, k_cache, v_cache, tables, seq, pos, B, n_heads, n_kv, D, max_blocks, shift,
                    window);
    s = quant_dots(wo->data, (int)wo->type, H, wo->row_bytes, q_size, 1, 0, H, att, B, 0, 0.0f, xq, proj);
    if (s) return s;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) x[b * H + j] += proj[b * H + j] + (bo ? bo[j] : 0.0f);
    if (!gate_up) return 0; /* attention alone: the caller runs the FFN */
    s = quant_ffn(gate_up->data, (int)gate_up->type, gate_up->row_bytes, down->data, (int)down->type,
                  down->row_bytes, I, H, parts, x, B, ffn_norm, eps, gu_bias, gate_fn, up_fn, rest, proj,
                  threshold);
    if (s) return s;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) x[b * H + j] += proj[b * H + j] + (down_bias ? down_bias[j] : 0.0f);
    return 0;
}
