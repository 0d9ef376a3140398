/* Gathered FFN rows on the CPU: the one thing torch has no op for.
 *
 * A gathered dot product (gate/up of the active neurons) in torch has to copy the rows out first
 * (index_select) and read them again (matmul); here each active row is streamed once from memory, dotted
 * with every token of the batch while it sits in L1, and rows further on are prefetched meanwhile.
 * The down projection is the mirror image: y[b] += h[b,k] * row_k, the row read once for all tokens.
 *
 * Weights are fp32 or bf16 (read as uint16 and widened by a shift); accumulation is fp32. Written with
 * GCC vector extensions, so the compiler emits AVX-512 / AVX2 / SSE / NEON for the ISA level it is built
 * for (kernels/native.py builds one library per level and loads the best the CPU has). Rows (dots) or
 * columns (axpy) are split over the thread pool (pool.c); each output is summed by one thread in a fixed
 * order, so results do not depend on the thread count or on the other tokens of the batch.
 */
#include "native.h"

#include <string.h>

#define V 16
typedef float vf __attribute__((vector_size(V * 4), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(V * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(V * 4), aligned(4)));

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf load_bf16(const uint16_t *p) {
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f; memcpy(&f, &u, sizeof f); return f;
}
static inline float bf16_scalar(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < V; i++) s += v[i]; return s; }
static inline void store_add(float *p, vf v) { vf o = load_f32(p); o += v; memcpy(p, &o, sizeof o); }

/* A row further on has its lines requested as the current row's same lines are consumed: a steady stream
 * the memory system can overlap (requesting a whole row at once overflows the fill buffers). Rows shorter
 * than AHEAD_BYTES are prefetched that many bytes ahead: at the default model's shape (2.3 KB bf16 rows)
 * 8 KB ahead reads 1.6x faster than one row ahead; rows of 16 KB and more gain nothing from going further. */
#define AHEAD_BYTES 8192
static inline int64_t rows_ahead(int64_t row_bytes) {
    int64_t a = AHEAD_BYTES / (row_bytes > 0 ? row_bytes : 1);
    return a < 1 ? 1 : a;
}

/* out[b, k, p] = sum_j W[idx[k] * stride + p * H + j] * x[b, j]   for p < parts (2: gate, up; 1: up),
 * for k in [k0, k1). idx == NULL means row k itself (a dense product). */
#define DOTS(NAME, T, LOAD, SCALAR)                                                                        \
static void NAME##_range(const T *W, int64_t stride, int64_t parts, const int64_t *idx, int64_t K,         \
                         const float *x, int64_t B, int64_t H, float *out, int64_t k0, int64_t k1) {      \
    int64_t H4 = H - H % (4 * V), H1 = H - H % V, ahead = rows_ahead(parts * H * (int64_t)sizeof(T));     \
    for (int64_t k = k0; k < k1; k++) {                                                                    \
        const T *row = W + (idx ? idx[k] : k) * stride;                                                    \
        const T *next = k + ahead < k1 ? W + (idx ? idx[k + ahead] : k + ahead) * stride : 0;              \
        for (int64_t p = 0; p < parts; p++) {                                                              \
            const T *r = row + p * H;                                                                      \
            for (int64_t b = 0; b < B; b++) {                                                              \
                const float *xb = x + b * H;                                                               \
                vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                 \
                int64_t j = 0;                                                                             \
                for (; j < H4; j += 4 * V) {                                                               \
                    if (next && b == 0) prefetch_span(next + p * H + j, 4 * V * (int64_t)sizeof(T));       \
                    a0 += LOAD(r + j) * load_f32(xb + j);                                                  \
                    a1 += LOAD(r + j + V) * load_f32(xb + j + V);                                          \
                    a2 += LOAD(r + j + 2 * V) * load_f32(xb + j + 2 * V);                                  \
                    a3 += LOAD(r + j + 3 * V) * load_f32(xb + j + 3 * V);                                  \
                }                                                                                          \
                if (next && b == 0) prefetch_span(next + p * H + j, (H - j) * (int64_t)sizeof(T));         \
                for (; j < H1; j += V) a0 += LOAD(r + j) * load_f32(xb + j);                               \
                float s = hsum((a0 + a1) + (a2 + a3));                                                     \
                for (; j < H; j++) s += SCALAR(r[j]) * xb[j];                                              \
                out[(b * K + k) * parts + p] = s;                                                          \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
}

/* y[b, c0:c1] += sum_k h[b, k] * W[idx[k] * stride + c0:c1]   (y fp32, zeroed by the caller). Threads split
 * the columns (in whole vectors), so each y element sums its rows in k order whatever the split. */
#define AXPY(NAME, T, LOAD, SCALAR)                                                                        \
static void NAME##_range(const T *W, int64_t stride, const int64_t *idx, int64_t K, const float *h,        \
                         int64_t B, int64_t H, float *y, int64_t c0, int64_t c1) {                         \
    int64_t span = c1 - c0, v1 = c0 + (span - span % V), ahead = rows_ahead(span * (int64_t)sizeof(T));  \
    if (c1 < H) v1 = c1; /* only the last range has a scalar tail: H % V columns, the same for any split */ \
    for (int64_t k = 0; k < K; k++) {                                                                      \
        const T *r = W + idx[k] * stride;                                                                  \
        const T *next = k + ahead < K ? W + idx[k + ahead] * stride : 0;                                   \
        int first = 1;                                                                                     \
        for (int64_t b = 0; b < B; b++) {                                                                  \
            float c = h[b * K + k];                                                                        \
            if (c == 0.0f) continue;                                                                       \
            float *yb = y + b * H;                                                                         \
            vf cv = {0};                                                                                   \
            cv += c;                                                                                       \
            int64_t j = c0;                                                                                \
            for (; j < v1; j += V) {                                                                       \
                if (next && first) prefetch_span(next + j, V * (int64_t)sizeof(T));                        \
                store_add(yb + j, cv * LOAD(r + j));                                                       \
            }                                                                                              \
            first = 0;                                                                                     \
            for (; j < c1; j++) yb[j] += c * SCALAR(r[j]);                                                 \
        }                                                                                                  \
    }                                                                                                      \
}

static inline float f32_scalar(float v) { return v; }

DOTS(dots_f32, float, load_f32, f32_scalar)
DOTS(dots_bf16, uint16_t, load_bf16, bf16_scalar)
AXPY(axpy_f32, float, load_f32, f32_scalar)
AXPY(axpy_bf16, uint16_t, load_bf16, bf16_scalar)

/* The arguments of one call, shared with the pool's workers. */
typedef struct {
    const void *W, *Wd;
    int64_t stride, stride_d, parts, K, B, H, Hd;
    const int64_t *idx;
    const float *x, *up_bias, *gate_bias;
    const uint8_t *mask;
    int gate_fn, up_fn, round_h, bf16;
    float threshold; /* FATReLU's t */
    float *out, *y;
} call_t;

static void activate_range(const call_t *c, int64_t k0, int64_t k1);

static void dots_task(void *p, int64_t k0, int64_t k1) {
    const call_t *c = p;
    if (c->bf16) dots_bf16_range(c->W, c->stride, c->parts, c->idx, c->K, c->x, c->B, c->H, c->out, k0, k1);
    else dots_f32_range(c->W, c->stride, c->parts, c->idx, c->K, c->x, c->B, c->H, c->out, k0, k1);
    if (c->y) activate_range(c, k0, k1);
}

static void axpy_task(void *p, int64_t c0, int64_t c1) {
    const call_t *c = p;
    if (c->bf16) axpy_bf16_range(c->Wd, c->stride_d, c->idx, c->K, c->out, c->B, c->Hd, c->y, c0, c1);
    else axpy_f32_range(c->Wd, c->stride_d, c->idx, c->K, c->out, c->B, c->Hd, c->y, c0, c1);
}

#define ENTRY(SUFFIX, T, IS_BF16)                                                                          \
int gathered_dots_##SUFFIX(const T *W, int64_t n_rows, int64_t stride, int64_t parts, const int64_t *idx, \
                           int64_t K, const float *x, int64_t B, int64_t H, float *out) {                   \
    if (idx && check_ids(idx, K, n_rows)) return -1;                                                       \
    call_t c = {.W = W, .stride = stride, .parts = parts, .idx = idx, .K = K, .x = x, .B = B, .H = H,      \
                .out = out, .bf16 = IS_BF16};                                                              \
    pool_run(dots_task, &c, K, 8);                                                                         \
    return 0;                                                                                              \
}                                                                                                          \
int gathered_axpy_##SUFFIX(const T *W, int64_t n_rows, int64_t stride, const int64_t *idx, int64_t K,    \
                           const float *h, int64_t B, int64_t H, float *y) {                              \
    if (check_ids(idx, K, n_rows)) return -1;                                                              \
    call_t c = {.Wd = W, .stride_d = stride, .idx = idx, .K = K, .out = (float *)h, .B = B, .Hd = H,       \
                .y = y, .bf16 = IS_BF16};                                                                  \
    pool_run(axpy_task, &c, H, V);                                                                         \
    return 0;                                                                                              \
}

ENTRY(f32, float, 0)
ENTRY(bf16, uint16_t, 1)

#include <math.h>


static inline float round_bf16(float v) {
    uint32_t u; memcpy(&u, &v, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&v, &u, 4); return v;
}

/* h[b, k] for k in [k0, k1), from the dots z = c->out of the same rows (written by the same thread). */
static void activate_range(const call_t *c, int64_t k0, int64_t k1) {
    int64_t parts = c->parts, K = c->K;
    float *h = c->out + c->B * K * parts;
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t k = k0; k < k1; k++) {
            const float *z = c->out + (b * K + k) * parts;
            int64_t id = c->idx[k];
            float v = act(c->up_fn, z[parts - 1] + (c->up_bias ? c->up_bias[id] : 0.0f), c->threshold);
            if (parts == 2)
                v *= act(c->gate_fn, z[0] + (c->gate_bias ? c->gate_bias[id] : 0.0f), c->threshold);
            if (c->mask && !c->mask[b * K + k]) v = 0.0f;
            h[b * K + k] = c->round_h ? round_bf16(v) : v;
        }
}

/* The whole gathered FFN of a few tokens in one call (no Python between the two products):
 * h[b,k] = gate_fn(g + gate_bias) * up_fn(u + up_bias)  (parts 2)  or  up_fn(u + up_bias)  (parts 1),
 * zero where mask[b,k] == 0, rounded to bf16 when round_h (as the two-call path rounds h to the weights'
 * dtype), then y[b] += sum_k h[b,k] * Wd[idx[k]]. Function codes are kernels.reference.FUNCTIONS
 * (threshold: FATReLU's t).
 * Biases are fp32 over all n_rows neurons (or NULL); scratch holds B*K*(parts + 1) floats (the dots,
 * then h); y is zeroed. */
#define FFN(SUFFIX, T, IS_BF16)                                                                            \
int gathered_ffn_##SUFFIX(const T *Wgu, int64_t n_rows, int64_t stride_gu, int64_t parts, const T *Wd,    \
                          int64_t stride_d, const int64_t *idx, int64_t K, const float *x, int64_t B,      \
                          int64_t H, const float *up_bias, const float *gate_bias, const uint8_t *mask,    \
                          int gate_fn, int up_fn, int round_h, float *scratch, float *y, float threshold) { \
    if (check_ids(idx, K, n_rows)) return -1;                                                              \
    call_t c = {.W = Wgu, .stride = stride_gu, .parts = parts, .idx = idx, .K = K, .x = x, .B = B, .H = H, \
                .up_bias = up_bias, .gate_bias = gate_bias, .mask = mask, .gate_fn = gate_fn,              \
                .up_fn = up_fn, .round_h = round_h, .out = scratch, .y = y, .bf16 = IS_BF16,              \
                .threshold = threshold};                                                                   \
    pool_run(dots_task, &c, K, 8);                                                                         \
    c.out = scratch + B * K * parts; /* h */                                                               \
    c.Wd = Wd; c.stride_d = stride_d; c.Hd = H;                                                            \
    pool_run(axpy_task, &c, H, V);                                                                         \
    return 0;                                                                                              \
}

FFN(f32, float, 0)
FFN(bf16, uint16_t, 1)
