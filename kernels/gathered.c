/* Gathered FFN rows on the CPU: the one thing torch has no op for.
 *
 * A gathered dot product (gate/up of the active neurons) in torch has to copy the rows out first
 * (index_select) and read them again (matmul); here each active row is streamed once from memory, dotted
 * with every token of the batch while it sits in L1, and rows further on are prefetched meanwhile.
 * The down projection is the mirror image: y[b] += h[b,k] * row_k, the row read once for all tokens.
 *
 * Weights are fp32 or bf16 (read as uint16 and widened by a shift); accumulation is fp32. Written with
 * GCC vector extensions, so the compiler emits AVX-512 / AVX2 / NEON for the machine it is built on
 * (kernels/native.py builds it with -march=native on first use). Each function is single-threaded and is
 * called with the GIL released (ctypes), so the executor's CPU worker runs beside the GPU side. (Splitting
 * one layer's rows over the two cores of the development machine was measured slower: one memory path.)
 */
#include <stdint.h>
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

/* 0, or -1 (nothing computed) when an id is outside [0, n_rows): a bad id must not read foreign memory. */
static inline int check_ids(const int64_t *idx, int64_t K, int64_t n_rows) {
    for (int64_t k = 0; k < K; k++) if (idx[k] < 0 || idx[k] >= n_rows) return -1;
    return 0;
}

/* A row further on has its lines requested as the current row's same lines are consumed: a steady stream
 * the memory system can overlap (requesting a whole row at once overflows the fill buffers). Rows shorter
 * than AHEAD_BYTES are prefetched that many bytes ahead: at the default model's shape (2.3 KB bf16 rows)
 * 8 KB ahead reads 1.6x faster than one row ahead; rows of 16 KB and more gain nothing from going further. */
#define AHEAD_BYTES 8192
static inline int64_t rows_ahead(int64_t row_bytes) {
    int64_t a = AHEAD_BYTES / (row_bytes > 0 ? row_bytes : 1);
    return a < 1 ? 1 : a;
}

static inline void prefetch_span(const void *p, int64_t nbytes) {
    for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 0);
}

/* out[b, k, p] = sum_j W[idx[k] * stride + p * H + j] * x[b, j]   for p < parts (2: gate, up; 1: up). */
#define DOTS(NAME, T, LOAD, SCALAR)                                                                        \
int NAME(const T *W, int64_t n_rows, int64_t stride, int64_t parts, const int64_t *idx, int64_t K,         \
         const float *x, int64_t B, int64_t H, float *out) {                                               \
    if (check_ids(idx, K, n_rows)) return -1;                                                              \
    int64_t H4 = H - H % (4 * V), H1 = H - H % V, ahead = rows_ahead(parts * H * (int64_t)sizeof(T));     \
    for (int64_t k = 0; k < K; k++) {                                                                      \
        const T *row = W + idx[k] * stride;                                                                \
        const T *next = k + ahead < K ? W + idx[k + ahead] * stride : 0;                                   \
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
    return 0;                                                                                              \
}

/* y[b, :] += sum_k h[b, k] * W[idx[k] * stride + :H]   (y fp32, zeroed by the caller). */
#define AXPY(NAME, T, LOAD, SCALAR)                                                                        \
int NAME(const T *W, int64_t n_rows, int64_t stride, const int64_t *idx, int64_t K, const float *h,        \
         int64_t B, int64_t H, float *y) {                                                                 \
    if (check_ids(idx, K, n_rows)) return -1;                                                              \
    int64_t H1 = H - H % V, ahead = rows_ahead(H * (int64_t)sizeof(T));                                   \
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
            int64_t j = 0;                                                                                 \
            for (; j < H1; j += V) {                                                                       \
                if (next && first) prefetch_span(next + j, V * (int64_t)sizeof(T));                        \
                store_add(yb + j, cv * LOAD(r + j));                                                       \
            }                                                                                              \
            if (next && first) prefetch_span(next + j, (H - j) * (int64_t)sizeof(T));                     \
            first = 0;                                                                                     \
            for (; j < H; j++) yb[j] += c * SCALAR(r[j]);                                                  \
        }                                                                                                  \
    }                                                                                                      \
    return 0;                                                                                              \
}

static inline float f32_scalar(float v) { return v; }

DOTS(gathered_dots_f32, float, load_f32, f32_scalar)
DOTS(gathered_dots_bf16, uint16_t, load_bf16, bf16_scalar)
AXPY(gathered_axpy_f32, float, load_f32, f32_scalar)
AXPY(gathered_axpy_bf16, uint16_t, load_bf16, bf16_scalar)

/* The whole gathered FFN of a few tokens in one call (no Python between the two products):
 * h[b,k] = gate_fn(g + gate_bias) * up_fn(u + up_bias)  (parts 2)  or  up_fn(u + up_bias)  (parts 1),
 * zero where mask[b,k] == 0, rounded to bf16 when round_h (as the two-call path rounds h to the weights'
 * dtype), then y[b] += sum_k h[b,k] * Wd[idx[k]]. Function codes are kernels.reference.FUNCTIONS.
 * Biases are fp32 over all n_rows neurons (or NULL); h is scratch of B*K*parts floats; y is zeroed. */
#include <math.h>

static inline float act(int fn, float v) {
    switch (fn) {
    case 1: return v / (1.0f + expf(-v));
    case 2: return v > 0.0f ? v : 0.0f;
    case 3: return v > 0.0f ? v * v : 0.0f;
    case 4: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 5: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v;
    }
}

static inline float round_bf16(float v) {
    uint32_t u; memcpy(&u, &v, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&v, &u, 4); return v;
}

#define FFN(NAME, T, DOTS_FN, AXPY_FN)                                                                     \
int NAME(const T *Wgu, int64_t n_rows, int64_t stride_gu, int64_t parts, const T *Wd, int64_t stride_d,    \
         const int64_t *idx, int64_t K, const float *x, int64_t B, int64_t H, const float *up_bias,        \
         const float *gate_bias, const uint8_t *mask, int gate_fn, int up_fn, int round_h, float *h,       \
         float *y) {                                                                                       \
    if (DOTS_FN(Wgu, n_rows, stride_gu, parts, idx, K, x, B, H, h)) return -1;                             \
    for (int64_t b = 0; b < B; b++)                                                                        \
        for (int64_t k = 0; k < K; k++) {                                                                  \
            const float *z = h + (b * K + k) * parts;                                                      \
            float u = z[parts - 1] + (up_bias ? up_bias[idx[k]] : 0.0f);                                   \
            float v = act(up_fn, u);                                                                       \
            if (parts == 2) v *= act(gate_fn, z[0] + (gate_bias ? gate_bias[idx[k]] : 0.0f));              \
            if (mask && !mask[b * K + k]) v = 0.0f;                                                        \
            h[b * K + k] = round_h ? round_bf16(v) : v; /* k-th slot is read before it is overwritten */   \
        }                                                                                                  \
    return AXPY_FN(Wd, n_rows, stride_d, idx, K, h, B, H, y);                                              \
}

FFN(gathered_ffn_f32, float, gathered_dots_f32, gathered_axpy_f32)
FFN(gathered_ffn_bf16, uint16_t, gathered_dots_bf16, gathered_axpy_bf16)
