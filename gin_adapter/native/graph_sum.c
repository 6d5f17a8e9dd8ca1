/* The top-k graph's neighbour sum and its backward on the CPU: gin_adapter's compiled kernels behind
 * gin_adapter/native_graph_sum.py.
 *
 * `mats` independent graphs (one per batch element and key/value head), each with `rows` query rows that picked
 * k keys among `keys`: weights W (mats, rows, k), key positions idx (mats, rows, k) in [0, keys), node features
 * X (mats, keys, F); all contiguous.
 *
 *   gin_graph_sum_f32(W, idx, X, N, mats, rows, k, keys, F, threads)
 *       N[b, r, :] = sum_m W[b, r, m] X[b, idx[b, r, m], :]                                  (mats, rows, F)
 *
 *   gin_graph_sum_grad_f32(dN, W, idx, X, dW, dX, mats, rows, k, keys, F, threads)
 *       dW[b, r, m] = dN[b, r, :] . X[b, idx[b, r, m], :]         (written, when dW is not NULL)
 *       dX[b, idx[b, r, m], :] += W[b, r, m] dN[b, r, :]          (added, when dX is not NULL)
 *
 * Why: the ATen way either scatters W into a dense (rows, keys) adjacency and multiplies it with X (three
 * products of the attention's size per layer, forward and backward, for 8 non-zeros a row), or gathers the k
 * feature rows through index_select and copies. Here each row costs k F multiply-adds and nothing is copied.
 * Threads: the forward splits rows; the backward splits graphs (several rows add into one graph's dX, so no two
 * threads write the same graph) or, with fewer graphs than threads (shared node features of one sequence: one
 * graph), dW by rows and dX by bands of features; over OpenMP threads (PyTorch's, as row_topk.c) when a call
 * holds at least 65,536 multiply-adds. The additions into each dX entry run in row order whatever the split, so
 * the results do not depend on the thread count. Each row's accumulators (forward) or a strip of up to 8 vectors
 * of its gradient (backward; wider rows, such as the published preset's 155 features, go strip by strip) stay
 * in registers while its k picked feature rows are visited. Both return 0, or 1 for bad arguments or a key
 * position outside [0, keys) (nothing written then by the forward; the backward may have written part of dW and
 * dX).
 */
#include <stddef.h>
#include <stdint.h>

#include "parallel.h"
#include "vectors.h"
#include "weighted_rows.h"

static int positions_valid(const int64_t *idx, int64_t count, int64_t keys) {
    int64_t bad = 0;
    for (int64_t i = 0; i < count; ++i) bad |= (uint64_t)idx[i] >= (uint64_t)keys;
    return !bad;
}

/* N rows [r0, r1) (weighted_rows.h: strips of up to 8 vectors of features, then the features left over one at a time) */
MULTIVERSION
static void sum_rows(const float *restrict w, const int64_t *restrict idx, const float *restrict x, float *restrict out,
                     int64_t r0, int64_t r1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *graph_x = x + (r / rows) * keys * width, *wr = w + r * k;
        const int64_t *ir = idx + r * k;
        weighted_row(graph_x, width, wr, ir, k, width, out + r * width);
    }
}

/* dW of one row over the feature strip [e0, e0 + blocks * LANES) (`blocks` a constant after inlining): the strip
   of dN stays in registers while the k picked rows are visited; `first` writes dW, later strips add to it */
static inline __attribute__((always_inline)) void dot_strip(const float *g, const float *graph_x, const int64_t *ir, int64_t k, int64_t width,
                                                            int64_t e0, const int blocks, int first, float *dwr) {
    vf gv[8];
    for (int b = 0; b < blocks; ++b) gv[b] = load(g + e0 + b * LANES);
    for (int64_t m = 0; m < k; ++m) {
        const float *xr = graph_x + ir[m] * width + e0;
        vf partial = {0};
        for (int b = 0; b < blocks; ++b) partial += gv[b] * load(xr + b * LANES);
        dwr[m] = (first ? 0.0f : dwr[m]) + lane_sum(partial);
    }
}

/* dX of one row over the feature strip [e0, e0 + blocks * LANES): dX[idx[m]] += W[m] dN, the strip of dN in registers */
static inline __attribute__((always_inline)) void scatter_strip(const float *g, float *graph_dx, const float *wr, const int64_t *ir, int64_t k,
                                                                int64_t width, int64_t e0, const int blocks) {
    vf gv[8];
    for (int b = 0; b < blocks; ++b) gv[b] = load(g + e0 + b * LANES);
    for (int64_t m = 0; m < k; ++m) {
        float *dxr = graph_dx + ir[m] * width + e0;
        for (int b = 0; b < blocks; ++b) store(dxr + b * LANES, load(dxr + b * LANES) + wr[m] * gv[b]);
    }
}

#define STRIPS(count, call)                                                                   \
    switch (count) {                                                                          \
        case 1: call(1); break; case 2: call(2); break; case 3: call(3); break;               \
        case 4: call(4); break; case 5: call(5); break; case 6: call(6); break;               \
        case 7: call(7); break; default: call(8); break;                                      \
    }

/* dW of rows [r0, r1) (of all graphs), strip by strip of up to 8 vectors, then the features left over */
MULTIVERSION
static void grad_weight_rows(const float *restrict grad, const int64_t *restrict idx, const float *restrict x, float *restrict grad_w,
                             int64_t r0, int64_t r1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    int64_t body = width - width % LANES;
    for (int64_t r = r0; r < r1; ++r) {
        const float *g = grad + r * width, *graph_x = x + (r / rows) * keys * width;
        const int64_t *ir = idx + r * k;
        float *dwr = grad_w + r * k;
        for (int64_t m = 0; m < k && body == 0; ++m) dwr[m] = 0.0f;
        for (int64_t e0 = 0; e0 < body; e0 += 8 * LANES) {
#define DOT(n) dot_strip(g, graph_x, ir, k, width, e0, n, e0 == 0, dwr)
            STRIPS((body - e0) / LANES, DOT)
#undef DOT
        }
        for (int64_t m = 0; m < k && body < width; ++m) {
            const float *xr = graph_x + ir[m] * width;
            float dot = 0.0f;
            for (int64_t e = body; e < width; ++e) dot += g[e] * xr[e];
            dwr[m] += dot;
        }
    }
}

/* dX of graphs [b0, b1) over the features [c0, c1) (c0 a multiple of LANES; every row of those graphs adds into
   them, so a thread owns whole graphs or a band of features) */
MULTIVERSION
static void grad_feature_band(const float *restrict grad, const float *restrict w, const int64_t *restrict idx, float *restrict grad_x,
                              int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    if (c0 >= c1) return;
    int64_t body = c1 - (c1 - c0) % LANES;
    for (int64_t b = b0; b < b1; ++b) {
        float *graph_dx = grad_x + b * keys * width;
        for (int64_t r = b * rows; r < (b + 1) * rows; ++r) {
            const float *g = grad + r * width, *wr = w + r * k;
            const int64_t *ir = idx + r * k;
            for (int64_t e0 = c0; e0 < body; e0 += 8 * LANES) {
#define SCATTER(n) scatter_strip(g, graph_dx, wr, ir, k, width, e0, n)
                STRIPS((body - e0) / LANES, SCATTER)
#undef SCATTER
            }
            for (int64_t m = 0; m < k && body < c1; ++m) {
                float *dxr = graph_dx + ir[m] * width;
                for (int64_t e = body; e < c1; ++e) dxr[e] += wr[m] * g[e];
            }
        }
    }
}

/* dW and dX of graphs [b0, b1), one graph at a time (a thread owns whole graphs; a graph's rows, features and
   gradients stay in cache between the two passes) */
static void grad_graphs(const float *grad, const float *w, const int64_t *idx, const float *x, float *grad_w, float *grad_x,
                        int64_t b0, int64_t b1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    for (int64_t b = b0; b < b1; ++b) {
        if (grad_w) grad_weight_rows(grad, idx, x, grad_w, b * rows, (b + 1) * rows, rows, k, keys, width);
        if (grad_x) grad_feature_band(grad, w, idx, grad_x, b, b + 1, 0, width, rows, k, keys, width);
    }
}

static int bad_arguments(int64_t mats, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    return mats < 0 || rows < 0 || k < 0 || keys < 1 || width < 0;
}

int gin_graph_sum_f32(const float *w, const int64_t *idx, const float *x, float *out, int64_t mats, int64_t rows, int64_t k,
                      int64_t keys, int64_t width, int threads) {
    if (bad_arguments(mats, rows, k, keys, width) || !positions_valid(idx, mats * rows * k, keys)) return 1;
    int64_t total = mats * rows;
    threads = thread_count(threads, total, total * k * width);
    SPLIT(total, threads, sum_rows(w, idx, x, out, p0, p1, rows, k, keys, width));
    return 0;
}

int gin_graph_sum_grad_f32(const float *grad, const float *w, const int64_t *idx, const float *x, float *grad_w, float *grad_x,
                           int64_t mats, int64_t rows, int64_t k, int64_t keys, int64_t width, int threads) {
    if (bad_arguments(mats, rows, k, keys, width) || !positions_valid(idx, mats * rows * k, keys)) return 1;
    int64_t total = mats * rows, work = total * k * width;
    if (total == 0) return 0;
    int parts = thread_count(threads, total, work);
    if (parts <= mats || width <= LANES) {  /* whole graphs per thread */
        parts = parts < mats ? parts : (int)mats;
        SPLIT(mats, parts, grad_graphs(grad, w, idx, x, grad_w, grad_x, p0, p1, rows, k, keys, width));
        return 0;
    }
    /* fewer graphs than threads (one sequence of shared node features): dW split by rows, dX by bands of features */
    if (grad_w) SPLIT(total, parts, grad_weight_rows(grad, idx, x, grad_w, p0, p1, rows, k, keys, width));
    if (grad_x) {
        int64_t vectors = (width + LANES - 1) / LANES;
        int bands = vectors < parts ? (int)vectors : parts;
        int64_t per = (vectors + bands - 1) / bands * LANES;
        SPLIT(bands, bands, grad_feature_band(grad, w, idx, grad_x, 0, mats, p0 * per, p1 * per < width ? p1 * per : width, rows, k, keys, width));
    }
    return 0;
}
