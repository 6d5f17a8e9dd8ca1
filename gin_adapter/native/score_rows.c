/* Two passes over a query chunk's rows of scores, compiled: the causal mask and the softmax backward of the graph
 * built with the attention (gin_adapter/native_score_rows.py; the chunks of gin_adapter/topk_sum.py).
 *
 * A chunk holds `mats` matrices of R = G * rows rows and n key columns, contiguous: row r of a matrix is query
 * position q0 + r % rows (the G query heads of one key/value head stacked), column j is key k0 + j, visible
 * when k0 + j <= q0 + r % rows.
 *
 *   gin_hide_future_f32(s, mats, R, n, rows, q0, k0, value, threads)
 *       s[r, j] = value where key k0 + j comes after query q0 + r % rows (the rest untouched)
 *
 * what ATen's masked_fill_ with a broadcast (rows, keys) mask does, writing only the entries it changes.
 *
 *   gin_softmax_grad_f32(d, p, mats, R, n, rows, q0, grad, out, q_len, dv, kept, weights, index, k0, k, threads)
 *
 * turns dP (d: the attention output's gradient dO v^T) into the scores' gradient dS in place: with the top-k
 * picks idx (absolute key positions), their weights W = P[idx] and the graph's gradient dW (kept),
 *     c_r = sum_e dO[r, e] O[r, e] + sum_m dW[r, m] W[r, m]                (the softmax backward's row term)
 *     dS[r, j] = P[r, j] (dP[r, j] - c_r) + sum_{m: idx_m = k0 + j} W[r, m] dW[r, m]
 * grad: the chunk's dO rows (mats, R, dv); out: the whole output O (mats, G, q_len, dv), row r of matrix b at
 * out[b][r / rows][q0 + r % rows]; kept, weights, index: (mats * R, k) (k = 0: no gradient reaches the graph).
 * One pass where ATen takes five operators (mul, sum, scatter_add_, sub_, mul_).
 *
 * Threads: rows split over OpenMP threads (PyTorch's, as row_topk.c) when a call holds >= 65,536 entries.
 * Both return 0, or 1 for bad arguments.
 */
#include <stddef.h>
#include <stdint.h>

#include "parallel.h"
#include "softmax_grad.h"
#include "vectors.h"

/* the first column of row r that its query cannot see (n when it sees them all) */
static inline __attribute__((always_inline)) int64_t first_hidden(int64_t r, int64_t n, int64_t rows, int64_t q0, int64_t k0) {
    int64_t v = q0 + r % rows - k0 + 1;
    return v < 0 ? 0 : v > n ? n : v;
}

static void hide_rows(float *s, int64_t r0, int64_t r1, int64_t R, int64_t n, int64_t rows, int64_t q0, int64_t k0, float value) {
    for (int64_t r = r0; r < r1; ++r) {
        float *row = s + r * n;
        for (int64_t j = first_hidden(r % R, n, rows, q0, k0); j < n; ++j) row[j] = value;
    }
}

MULTIVERSION
static void softmax_grad_rows(float *restrict d, const float *restrict p, int64_t r0, int64_t r1, int64_t R, int64_t n, int64_t rows, int64_t q0,
                              const float *restrict grad, const float *restrict out, int64_t q_len, int64_t dv,
                              const float *restrict kept, const float *restrict weights, const int64_t *restrict index, int64_t k0, int64_t k) {
    int64_t groups = R / rows;
    for (int64_t r = r0; r < r1; ++r) {
        int64_t b = r / R, within = r % R;
        const float *o = out + ((b * groups + within / rows) * q_len + q0 + within % rows) * dv;
        softmax_grad_row(d + r * n, p + r * n, n, grad + r * dv, o, dv, kept + r * k, weights + r * k, index + r * k, k, k0);
    }
}

static int bad_geometry(int64_t mats, int64_t R, int64_t n, int64_t rows, int64_t q0, int64_t k0) {
    return mats < 0 || R < 1 || n < 0 || rows < 1 || R % rows || q0 < 0 || k0 < 0;
}

int gin_hide_future_f32(float *s, int64_t mats, int64_t R, int64_t n, int64_t rows, int64_t q0, int64_t k0, float value, int threads) {
    if (bad_geometry(mats, R, n, rows, q0, k0)) return 1;
    int64_t total = mats * R;
    SPLIT(total, thread_count(threads, total, total * n), hide_rows(s, p0, p1, R, n, rows, q0, k0, value));
    return 0;
}

int gin_softmax_grad_f32(float *d, const float *p, int64_t mats, int64_t R, int64_t n, int64_t rows, int64_t q0,
                         const float *grad, const float *out, int64_t q_len, int64_t dv,
                         const float *kept, const float *weights, const int64_t *index, int64_t k0, int64_t k, int threads) {
    if (bad_geometry(mats, R, n, rows, q0, k0) || q_len < q0 + rows || dv < 0 || k < 0 || (k && !(kept && weights && index))) return 1;
    int64_t total = mats * R;
    SPLIT(total, thread_count(threads, total, total * n),
          softmax_grad_rows(d, p, p0, p1, R, n, rows, q0, grad, out, q_len, dv, kept, weights, index, k0, k));
    return 0;
}
