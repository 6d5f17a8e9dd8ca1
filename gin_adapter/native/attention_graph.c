/* Causal attention and its top-k graph, forward and backward, one compiled call per layer and direction
 * (gin_adapter/native_attention_graph.py; the Python form is gin_adapter/joint.py).
 *
 * For query head h of batch b (key/value head h / G), query rows i and keys j <= i:
 *     S = scaling Q K^T,   P[i, j] = exp(S[i, j] - max_j S[i, :]) / sum_j exp(...)      (j <= i; 0 above)
 *     O = P V,   idx[i] = top-k_j P[i, j] (ties to the lower position),   W[i, m] = P[i, idx_m]
 * and backward, with dO and the graph's gradient dW (or none):
 *     c_i = dO_i . O_i + dW_i . W_i,   dS = P (dO V^T - c) + scatter(W dW),
 *     dQ = scaling dS K,   dK = scaling dS^T Q,   dV = P^T dO.
 *
 * Work: the rows of one head go in tiles of `tile` rows; a tile's scores over its keys 0..r1 (at most
 * tile x L floats, 512 KiB at L = 2,048) stay in the thread's cache through the softmax, the products, the top-k
 * and the softmax backward, where ATen's chunked form (joint.py) writes and reads them back once per operator.
 * The products go to the BLAS sgemm PyTorch was built with (passed in by gin_set_sgemm; MKL in PyTorch's x86-64
 * wheels), the rest is vectorised C (GCC vector extensions) with an exp of about 2 ulp (Cephes' polynomial).
 *
 * Threads: each head's tiles are cut into `segments` runs of about equal causal work (a shape-only choice, so the
 * result does not depend on the thread count); the (b, h, segment) units are spread over OpenMP threads
 * (PyTorch's, row_topk.c). Backward writes each unit's dK, dV into its own slice of `partial_k`, `partial_v`
 * (segments, B, H, L, .) and sums the slices in a fixed order (heads of the group, then segments) at the end.
 *
 * Layouts (float32, last dimension contiguous, strides in elements): q (B, H, L, D) with strides q_b, q_h, q_l;
 * k (B, Hkv, L, D) and v (B, Hkv, L, Dv) likewise; out, dO, dQ (B, H, L, .) contiguous; W, idx (B, H, L, K)
 * contiguous (idx: int64 key positions); dK, dV (B, Hkv, L, .) contiguous.
 * Return: 0, 1 for bad arguments, 2 when memory ran out, 3 without an sgemm.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_topk.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *, const float *, const int *,
                         const float *, const int *, const float *, float *, const int *);
static sgemm_fn sgemm;

/* the Fortran-ABI sgemm (LP64) to use, or NULL for none */
void gin_set_sgemm(void *function) { sgemm = (sgemm_fn)function; }

/* row-major C (m x n, ldc) = alpha op(A) op(B) + beta C: the column-major call on the transposes */
static void gemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc) {
    sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

static inline __attribute__((always_inline)) vf load(const float *x) { vf v; __builtin_memcpy(&v, x, sizeof v); return v; }
static inline __attribute__((always_inline)) void store(float *x, vf v) { __builtin_memcpy(x, &v, sizeof v); }
static inline __attribute__((always_inline)) vf splat(float x) { return (vf){0} + x; }

/* exp(x) for x <= 0 (0 below -87.3), Cephes' expf: x = n ln2 + r, exp(r) by a degree-6 polynomial, times 2^n */
static inline __attribute__((always_inline)) vf vexp(vf x) {
    vi under = x < splat(-87.3f);
    vf fx = x * splat(1.44269504088896341f) + splat(0.5f);
    vi n = __builtin_convertvector(fx, vi);
    vf nf = __builtin_convertvector(n, vf);
    vi above = nf > fx;  /* truncation rounded up a negative fx: floor */
    n += above;
    nf = __builtin_convertvector(n, vf);
    vf r = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * r * r + r + splat(1.0f);
    vf two_n = (vf)((n + 127) << 23);  /* 2^n from its exponent bits */
    return (vf)((vi)(y * two_n) & ~under);  /* 0 where x < -87.3 */
}

/* P from S in place for one tile: rows r of n scores, row r sees its first `first + r + 1` columns (the rest set 0) */
MULTIVERSION
static void softmax_rows(float *s, int64_t rows, int64_t n, int64_t first) {
    float tail[LANES];
    for (int64_t r = 0; r < rows; ++r) {
        float *row = s + r * n;
        int64_t seen = first + r + 1;
        if (seen > n) seen = n;
        vf top = splat(-__builtin_inff());
        int64_t j = 0;
        for (; j + LANES <= seen; j += LANES) { vf x = load(row + j); vi gt = x > top; top = (vf)(((vi)x & gt) | ((vi)top & ~gt)); }
        float best = -__builtin_inff();
        for (int i = 0; i < LANES; ++i) best = top[i] > best ? top[i] : best;
        for (; j < seen; ++j) best = row[j] > best ? row[j] : best;
        vf sum = {0};
        for (j = 0; j + LANES <= seen; j += LANES) { vf e = vexp(load(row + j) - best); store(row + j, e); sum += e; }
        if (j < seen) {
            for (int i = 0; i < LANES; ++i) tail[i] = j + i < seen ? row[j + i] - best : -100.0f;
            vf e = vexp(load(tail));
            for (int i = 0; i < seen - j; ++i) { row[j + i] = e[i]; sum[i] += e[i]; }
        }
        float total = 0.0f;
        for (int i = 0; i < LANES; ++i) total += sum[i];
        vf inverse = splat(1.0f / total);
        for (j = 0; j + LANES <= seen; j += LANES) store(row + j, load(row + j) * inverse);
        for (; j < seen; ++j) row[j] *= inverse[0];
        if (seen < n) memset(row + seen, 0, (n - seen) * sizeof(float));
    }
}

/* dP -> dS in place for one tile (the module's formula); dW, W, idx: the tile's rows (k = 0: no graph gradient) */
MULTIVERSION
static void softmax_grad_tile(float *d, const float *p, int64_t rows, int64_t n, const float *grad, const float *out, int64_t dv,
                              const float *kept, const float *weights, const int64_t *index, int64_t k) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = grad + r * dv, *o = out + r * dv;
        vf partial = {0};
        int64_t e = 0;
        for (; e + LANES <= dv; e += LANES) partial += load(g + e) * load(o + e);
        float c = 0.0f;
        for (int i = 0; i < LANES; ++i) c += partial[i];
        for (; e < dv; ++e) c += g[e] * o[e];
        for (int64_t m = 0; m < k; ++m) c += kept[r * k + m] * weights[r * k + m];
        float *dr = d + r * n;
        const float *pr = p + r * n;
        vf cv = splat(c);
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) store(dr + j, load(pr + j) * (load(dr + j) - cv));
        for (; j < n; ++j) dr[j] = pr[j] * (dr[j] - c);
        for (int64_t m = 0; m < k; ++m) {
            int64_t col = index[r * k + m];
            if (col >= 0 && col < n) dr[col] += weights[r * k + m] * kept[r * k + m];
        }
    }
}

typedef struct {
    const float *q, *k, *v;
    int64_t q_b, q_h, q_l, k_b, k_h, k_l, v_b, v_h, v_l;
    int64_t batch, heads, kv_heads, length, dim, dim_v, tile, segments, top_k;
    float scaling;
} problem;

static int64_t tiles_of(const problem *p) { return (p->length + p->tile - 1) / p->tile; }

/* the tiles [t0, t1) of segment s: cut where the causal work (tile t: t + 1 units) reaches s / segments */
static void segment_tiles(const problem *p, int64_t s, int64_t *t0, int64_t *t1) {
    int64_t tiles = tiles_of(p), total = tiles * (tiles + 1) / 2;
    int64_t bounds[2];
    for (int e = 0; e < 2; ++e) {
        int64_t goal = total * (s + e) / p->segments, t = 0;
        while (t < tiles && t * (t + 1) / 2 < goal) ++t;
        bounds[e] = (s + e == p->segments) ? tiles : t;
    }
    *t0 = bounds[0]; *t1 = bounds[1];
}

static const float *q_rows(const problem *p, int64_t b, int64_t h, int64_t r0) { return p->q + b * p->q_b + h * p->q_h + r0 * p->q_l; }
static const float *k_rows(const problem *p, int64_t b, int64_t h) { return p->k + b * p->k_b + (h / (p->heads / p->kv_heads)) * p->k_h; }
static const float *v_rows(const problem *p, int64_t b, int64_t h) { return p->v + b * p->v_b + (h / (p->heads / p->kv_heads)) * p->v_h; }

/* one tile's probabilities: rows r0..r0+rows of head (b, h) over keys 0..n, into s (rows x n) */
static void tile_probabilities(const problem *p, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t n, float *s) {
    gemm(0, 1, (int)rows, (int)n, (int)p->dim, p->scaling, q_rows(p, b, h, r0), (int)p->q_l, k_rows(p, b, h), (int)p->k_l, 0.0f, s, (int)n);
    softmax_rows(s, rows, n, r0);
}

static int check(const problem *p) {
    if (!sgemm) return 3;
    if (p->batch < 1 || p->heads < 1 || p->kv_heads < 1 || p->heads % p->kv_heads || p->length < 1 || p->dim < 1 || p->dim_v < 1 || p->tile < 1
        || p->segments < 1 || p->segments > tiles_of(p) || p->top_k < 1 || p->top_k > ROW_TOPK_MAX_K || p->top_k > p->length
        || p->top_k > p->tile || p->length >= INT32_MAX / (p->tile > p->dim ? p->tile : p->dim))
        return 1;
    return 0;
}

#define UNITS(p) ((p)->batch * (p)->heads * (p)->segments)

/* OpenMP threads for `units` units: at most one each, but two where `threads` allows, even for one unit, so that
   the sgemm always runs inside an active parallel region, on one thread (nested parallelism is off): its sums
   then do not depend on the thread count */
static int team_size(int threads, int64_t units) {
    if (threads < 2) return 1;
    return units < threads ? (units < 2 ? 2 : (int)units) : threads;
}

static void forward_unit(const problem *p, int64_t unit, float *out, float *weights, int64_t *index, float *s, float *cv, int32_t *ci) {
    int64_t s_index = unit % p->segments, bh = unit / p->segments, b = bh / p->heads, h = bh % p->heads, t0, t1;
    segment_tiles(p, s_index, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
        int64_t r0 = t * p->tile, rows = r0 + p->tile < p->length ? p->tile : p->length - r0, n = r0 + rows;
        tile_probabilities(p, b, h, r0, rows, n, s);
        int64_t row0 = bh * p->length + r0;
        gemm(0, 0, (int)rows, (int)p->dim_v, (int)n, 1.0f, s, (int)n, v_rows(p, b, h), (int)p->v_l, 0.0f, out + row0 * p->dim_v, (int)p->dim_v);
        gin_topk_rows_buffered(s, rows, n, n, (int)p->top_k, weights + row0 * p->top_k, index + row0 * p->top_k, cv, ci);
    }
}

int gin_attention_graph_forward_f32(const float *q, int64_t q_b, int64_t q_h, int64_t q_l, const float *k, int64_t k_b, int64_t k_h, int64_t k_l,
                                    const float *v, int64_t v_b, int64_t v_h, int64_t v_l, int64_t batch, int64_t heads, int64_t kv_heads,
                                    int64_t length, int64_t dim, int64_t dim_v, float scaling, int64_t tile, int64_t segments, int64_t top_k,
                                    float *out, float *weights, int64_t *index, int threads) {
    problem p = {q, k, v, q_b, q_h, q_l, k_b, k_h, k_l, v_b, v_h, v_l, batch, heads, kv_heads, length, dim, dim_v, tile, segments, top_k, scaling};
    int status = check(&p);
    if (status) return status;
    int team = team_size(threads, UNITS(&p));
    int64_t units = UNITS(&p);
#pragma omp parallel num_threads(team) reduction(| : status)
    {
        float *s = malloc((tile * length + length + 8) * sizeof(float));  /* the tile's scores, then the top-k's candidates */
        int32_t *ci = malloc((length + 8) * sizeof(int32_t));
        if (!s || !ci) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; ++unit)
            if (s && ci) forward_unit(&p, unit, out, weights, index, s, s + tile * length, ci);
        free(s); free(ci);
    }
    return status;
}

static void backward_unit(const problem *p, int64_t unit, const float *out, const float *grad, const float *kept, const float *weights,
                          const int64_t *index, int64_t k, float *grad_q, float *partial_k, float *partial_v, float *s, float *d) {
    int64_t s_index = unit % p->segments, bh = unit / p->segments, b = bh / p->heads, h = bh % p->heads, t0, t1;
    segment_tiles(p, s_index, &t0, &t1);
    int64_t keys = t1 * p->tile < p->length ? t1 * p->tile : p->length;  /* the keys this unit's tiles see */
    int64_t slice = (s_index * p->batch * p->heads + bh) * p->length;
    float *dk = partial_k + slice * p->dim, *dv = partial_v + slice * p->dim_v;
    memset(dk, 0, keys * p->dim * sizeof(float));
    memset(dv, 0, keys * p->dim_v * sizeof(float));
    const float *kh = k_rows(p, b, h), *vh = v_rows(p, b, h);
    for (int64_t t = t0; t < t1; ++t) {
        int64_t r0 = t * p->tile, rows = r0 + p->tile < p->length ? p->tile : p->length - r0, n = r0 + rows;
        int64_t row0 = bh * p->length + r0;
        const float *g = grad + row0 * p->dim_v, *qt = q_rows(p, b, h, r0);
        tile_probabilities(p, b, h, r0, rows, n, s);
        gemm(1, 0, (int)n, (int)p->dim_v, (int)rows, 1.0f, s, (int)n, g, (int)p->dim_v, 1.0f, dv, (int)p->dim_v);  /* dV += P^T dO */
        gemm(0, 1, (int)rows, (int)n, (int)p->dim_v, 1.0f, g, (int)p->dim_v, vh, (int)p->v_l, 0.0f, d, (int)n);  /* dP = dO V^T */
        softmax_grad_tile(d, s, rows, n, g, out + row0 * p->dim_v, p->dim_v, k ? kept + row0 * k : NULL, k ? weights + row0 * k : NULL,
                          k ? index + row0 * k : NULL, k);
        gemm(0, 0, (int)rows, (int)p->dim, (int)n, p->scaling, d, (int)n, kh, (int)p->k_l, 0.0f, grad_q + row0 * p->dim, (int)p->dim);  /* dQ */
        gemm(1, 0, (int)n, (int)p->dim, (int)rows, p->scaling, d, (int)n, qt, (int)p->q_l, 1.0f, dk, (int)p->dim);  /* dK += s dS^T Q */
    }
}

/* dst (B, Hkv, L, width) = the sum over the G query heads of each key/value head and the segments, in that order */
static void sum_partials(const problem *p, const float *partial, int64_t width, float *dst, int threads) {
    int64_t groups = p->heads / p->kv_heads, rows = p->batch * p->kv_heads * p->length;
    int64_t seg_tiles_end[64];
    int64_t segments = p->segments;
    for (int64_t s = 0; s < segments; ++s) {
        int64_t t0, t1;
        segment_tiles(p, s, &t0, &t1);
        seg_tiles_end[s] = t1 * p->tile;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        int64_t j = row % p->length, bk = row / p->length, b = bk / p->kv_heads, kh = bk % p->kv_heads;
        float *out = dst + row * width;
        memset(out, 0, width * sizeof(float));
        for (int64_t g = 0; g < groups; ++g) {
            int64_t h = kh * groups + g;
            for (int64_t s = 0; s < segments; ++s) {
                if (j >= seg_tiles_end[s]) continue;
                const float *x = partial + (((s * p->batch + b) * p->heads + h) * p->length + j) * width;
                for (int64_t e = 0; e < width; ++e) out[e] += x[e];
            }
        }
    }
}

int gin_attention_graph_backward_f32(const float *q, int64_t q_b, int64_t q_h, int64_t q_l, const float *k, int64_t k_b, int64_t k_h, int64_t k_l,
                                     const float *v, int64_t v_b, int64_t v_h, int64_t v_l, int64_t batch, int64_t heads, int64_t kv_heads,
                                     int64_t length, int64_t dim, int64_t dim_v, float scaling, int64_t tile, int64_t segments, int64_t top_k,
                                     const float *out, const float *grad, const float *kept, const float *weights, const int64_t *index,
                                     float *grad_q, float *grad_k, float *grad_v, float *partial_k, float *partial_v, int threads) {
    problem p = {q, k, v, q_b, q_h, q_l, k_b, k_h, k_l, v_b, v_h, v_l, batch, heads, kv_heads, length, dim, dim_v, tile, segments, top_k, scaling};
    int status = check(&p);
    if (status) return status;
    if (segments > 64) return 1;
    int64_t units = UNITS(&p), graph_k = kept ? top_k : 0;
    int team = team_size(threads, units);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(team) reduction(| : status)
    {
        float *s = malloc(2 * tile * length * sizeof(float));
        if (!s) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; ++unit)
            if (s) backward_unit(&p, unit, out, grad, kept, weights, index, graph_k, grad_q, partial_k, partial_v, s, s + tile * length);
        free(s);
    }
    if (status) return status;
    sum_partials(&p, partial_k, dim, grad_k, threads);
    sum_partials(&p, partial_v, dim_v, grad_v, threads);
    return 0;
}

/* row-major C = alpha op(A) op(B) + beta C through the sgemm set, for the check at load time (native_attention_graph.py) */
int gin_gemm_f32(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    if (!sgemm) return 3;
    gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return 0;
}
