/* The pieces the tiled attention kernels share (declared and explained in tiles.h).
 *
 * The products go to the BLAS sgemm PyTorch was built with (passed in by gin_set_sgemm; MKL in PyTorch's x86-64
 * wheels), the rest is vectorised C (GCC vector extensions) with Cephes' exp polynomial (vexp below).
 */
#include <stdint.h>
#include <string.h>

#include "row_topk.h"
#include "tiles.h"
#include "softmax_grad.h"
#include "vectors.h"

#define MAX_SEGMENTS 64

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *, const float *, const int *,
                         const float *, const int *, const float *, float *, const int *);
static sgemm_fn sgemm;

/* the Fortran-ABI sgemm to use, or NULL for none */
void gin_set_sgemm(void *function) { sgemm = (sgemm_fn)function; }

/* The sgemm's integer arguments: 64-bit on little-endian machines, so that both a 32-bit (LP64) and a 64-bit
   (ILP64) BLAS read the right value (the low half comes first); a wrong result is then caught by the check at
   load time rather than a read past a 32-bit integer. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
typedef int64_t blas_int;
#else
typedef int blas_int;
#endif

/* row-major C = op(A) op(B): the column-major call on the transposes */
void tiles_gemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    blas_int rows = n, columns = m, inner = k, ld_b = ldb, ld_a = lda, ld_c = ldc;
    sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", (const int *)&rows, (const int *)&columns, (const int *)&inner, &alpha, b, (const int *)&ld_b, a,
          (const int *)&ld_a, &beta, c, (const int *)&ld_c);
}

/* row-major C = alpha op(A) op(B) + beta C through the sgemm set, for the check at load time (native_attention_graph.py) */
int gin_gemm_f32(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
    if (!sgemm) return 3;
    tiles_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return 0;
}

int64_t tiles_of(const problem *p) { return (p->length + p->tile - 1) / p->tile; }

void tile_rows(const problem *p, int64_t t, int64_t *r0, int64_t *rows, int64_t *n) {
    *r0 = t * p->tile;
    *rows = *r0 + p->tile < p->length ? p->tile : p->length - *r0;
    *n = *r0 + *rows;
}

int tiles_check(const problem *p) {
    if (!sgemm) return 3;
    if (p->batch < 1 || p->heads < 1 || p->kv_heads < 1 || p->heads % p->kv_heads || p->length < 1 || p->dim < 1 || p->dim_v < 1 || p->tile < 1
        || p->segments < 1 || p->segments > tiles_of(p) || p->segments > MAX_SEGMENTS || p->top_k < 1 || p->top_k > ROW_TOPK_MAX_K
        || p->top_k > p->length || p->top_k > p->tile || p->length >= INT32_MAX / (p->tile > p->dim ? p->tile : p->dim))
        return 1;
    return 0;
}

void segment_tiles(const problem *p, int64_t s, int64_t *t0, int64_t *t1) {
    int64_t tiles = tiles_of(p), total = tiles * (tiles + 1) / 2;
    int64_t bounds[2];
    for (int e = 0; e < 2; ++e) {
        int64_t goal = total * (s + e) / p->segments, t = 0;
        while (t < tiles && t * (t + 1) / 2 < goal) ++t;
        bounds[e] = (s + e == p->segments) ? tiles : t;
    }
    *t0 = bounds[0]; *t1 = bounds[1];
}

/* At most one thread a unit, but two where `threads` allows, even for one unit, so that the sgemm always runs
   inside an active parallel region, on one thread (nested parallelism is off): its sums then do not depend on
   the thread count. */
int team_size(int threads, int64_t units) {
    if (threads < 2) return 1;
    return units < threads ? (units < 2 ? 2 : (int)units) : threads;
}

static inline __attribute__((always_inline)) vf splat(float x) { return (vf){0} + x; }

/* exp(x) for x <= 0 (0 below -87.3), Cephes' expf: x = n ln2 + r, exp(r) by a degree-6 polynomial, times 2^n */
static inline __attribute__((always_inline)) vf vexp(vf x) {
    vi under = x < splat(-87.3f);
    x = (vf)(((vi)x & ~under) | ((vi)splat(-87.3f) & under));  /* in range, so 2^n below stays finite */
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
    return y * two_n * (vf)((vi)splat(1.0f) & ~under);  /* 0 where x < -87.3 (a product: GCC 12 fails on the bitwise form
                                                             in the AVX2 clone under -march=native) */
}

/* P from S in place: row r sees its first `first + r + 1` columns (the rest set 0) */
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

void tiles_softmax(float *s, int64_t rows, int64_t n, int64_t first) { softmax_rows(s, rows, n, first); }

void tile_probabilities(const problem *p, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t n, float *s) {
    tiles_gemm(0, 1, (int)rows, (int)n, (int)p->dim, p->scaling, q_rows(p, b, h, r0), (int)p->q_l, k_rows(p, b, h), (int)p->k_l, 0.0f, s, (int)n);
    softmax_rows(s, rows, n, r0);
}

MULTIVERSION
void softmax_grad_tile(float *d, const float *p, int64_t rows, int64_t n, const float *grad, const float *out, int64_t dv,
                       const float *kept, const float *weights, const int64_t *index, int64_t k) {
    for (int64_t r = 0; r < rows; ++r)
        softmax_grad_row(d + r * n, p + r * n, n, grad + r * dv, out + r * dv, dv, kept + r * k, weights + r * k, index + r * k, k, 0);
}

MULTIVERSION
void softmax_grad_dense_tile(float *d, const float *p, int64_t rows, int64_t n, const float *grad, const float *out, int64_t dv, const float *dw) {
    for (int64_t r = 0; r < rows; ++r) {
        float *dr = d + r * n;
        const float *pr = p + r * n, *wr = dw + r * n;
        vf cv = splat(dot(grad + r * dv, out + r * dv, dv) + dot(wr, pr, n));
        int64_t j = 0;
        for (; j + LANES <= n; j += LANES) store(dr + j, load(pr + j) * (load(dr + j) + load(wr + j) - cv));
        for (; j < n; ++j) dr[j] = pr[j] * (dr[j] + wr[j] - cv[0]);
    }
}

static void sum_partials(const problem *p, const float *partial, int64_t groups, const int64_t *keys_end, int64_t width, float *dst, int threads) {
    int64_t rows = p->batch * p->kv_heads * p->length, heads = p->kv_heads * groups;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        int64_t j = row % p->length, bk = row / p->length, b = bk / p->kv_heads, kh = bk % p->kv_heads;
        float *out = dst + row * width;
        memset(out, 0, width * sizeof(float));
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t s = 0; s < p->segments; ++s) {
                if (j >= keys_end[s]) continue;
                const float *x = partial + (((s * p->batch + b) * heads + kh * groups + g) * p->length + j) * width;
                for (int64_t e = 0; e < width; ++e) out[e] += x[e];
            }
    }
}

MULTIVERSION
void sharpen_tile(const float *w, float *a, int64_t rows, int64_t n, int64_t first, float alpha, float tau, float threshold) {
    float tail[LANES];
    for (int64_t r = 0; r < rows; ++r) {
        const float *wr = w + r * n;
        float *ar = a + r * n;
        int64_t seen = first + r + 1;
        if (seen > n) seen = n;
        for (int64_t j = 0; j < seen; j += LANES) {
            int full = j + LANES <= seen;
            vf x;
            if (full) x = load(wr + j);
            else { for (int i = 0; i < LANES; ++i) tail[i] = j + i < seen ? wr[j + i] : 0.0f; x = load(tail); }
            vi over = x > splat(1.0f);
            x = (vf)(((vi)x & ~over) | ((vi)splat(1.0f) & over));
            vf z = splat(alpha) * (x - splat(tau));
            vi positive = z >= splat(0.0f);
            vf e = vexp((vf)((vi)z | ((vi){0} + INT32_MIN)));  /* exp(-|z|): the sign bit set */
            vf numerator = (vf)(((vi)splat(1.0f) & positive) | ((vi)e & ~positive));
            vf s = numerator / (splat(1.0f) + e);  /* sigmoid(z) */
            vf kept = (vf)((vi)s & (s > splat(threshold)));
            if (full) store(ar + j, kept);
            else { store(tail, kept); for (int i = 0; i < seen - j; ++i) ar[j + i] = tail[i]; }
        }
        if (seen < n) memset(ar + seen, 0, (n - seen) * sizeof(float));
    }
}

void sum_runs(const problem *p, const float *partial_k, const float *partial_v, int64_t groups, float *grad_k, float *grad_v, int threads) {
    int64_t keys_end[MAX_SEGMENTS];
    for (int64_t run = 0; run < p->segments; ++run) {
        int64_t t0, t1;
        segment_tiles(p, run, &t0, &t1);
        keys_end[run] = t1 * p->tile;
    }
    sum_partials(p, partial_k, groups, keys_end, p->dim, grad_k, threads);
    sum_partials(p, partial_v, groups, keys_end, p->dim_v, grad_v, threads);
}
