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
 * Threads: the forward and dW split rows over OpenMP threads (PyTorch's, as row_topk.c) when a call holds at
 * least 65,536 multiply-adds; dX, which several rows add into, splits over the graphs (no two threads write the
 * same graph). Both return 0, or 1 for bad arguments or a key position outside [0, keys) (nothing written then
 * by the forward; the backward may have written part of dW and dX).
 */
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define PARALLEL_MIN_WORK 65536

static int positions_valid(const int64_t *idx, int64_t count, int64_t keys) {
    int64_t bad = 0;
    for (int64_t i = 0; i < count; ++i) bad |= (uint64_t)idx[i] >= (uint64_t)keys;
    return !bad;
}

MULTIVERSION
static void sum_rows(const float *restrict w, const int64_t *restrict idx, const float *restrict x, float *restrict out,
                     int64_t r0, int64_t r1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *graph_x = x + (r / rows) * keys * width;
        float *o = out + r * width;
        for (int64_t e = 0; e < width; ++e) o[e] = 0.0f;
        for (int64_t m = 0; m < k; ++m) {
            float weight = w[r * k + m];
            const float *xr = graph_x + idx[r * k + m] * width;
            for (int64_t e = 0; e < width; ++e) o[e] += weight * xr[e];
        }
    }
}

MULTIVERSION
static void weight_grad_rows(const float *restrict grad, const int64_t *restrict idx, const float *restrict x, float *restrict grad_w,
                             int64_t r0, int64_t r1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *graph_x = x + (r / rows) * keys * width, *g = grad + r * width;
        for (int64_t m = 0; m < k; ++m) {
            const float *xr = graph_x + idx[r * k + m] * width;
            float dot = 0.0f;
            for (int64_t e = 0; e < width; ++e) dot += g[e] * xr[e];
            grad_w[r * k + m] = dot;
        }
    }
}

MULTIVERSION
static void feature_grad_graphs(const float *restrict grad, const float *restrict w, const int64_t *restrict idx, float *restrict grad_x,
                                int64_t b0, int64_t b1, int64_t rows, int64_t k, int64_t keys, int64_t width) {
    for (int64_t b = b0; b < b1; ++b) {
        float *graph_dx = grad_x + b * keys * width;
        for (int64_t r = b * rows; r < (b + 1) * rows; ++r) {
            const float *g = grad + r * width;
            for (int64_t m = 0; m < k; ++m) {
                float weight = w[r * k + m];
                float *dxr = graph_dx + idx[r * k + m] * width;
                for (int64_t e = 0; e < width; ++e) dxr[e] += weight * g[e];
            }
        }
    }
}

static int thread_count(int threads, int64_t parts, int64_t work) {
    if (threads < 1 || work < PARALLEL_MIN_WORK) return 1;
    return threads > parts ? (int)(parts > 0 ? parts : 1) : threads;
}

/* run body(part0, part1) over [0, parts) split into `threads` contiguous ranges */
#ifdef _OPENMP
#define SPLIT(parts, threads, body)                                                           \
    do {                                                                                      \
        int threads_ = (threads);                                                             \
        int64_t per_ = ((parts) + threads_ - 1) / threads_;                                   \
        _Pragma("omp parallel for num_threads(threads_) schedule(static, 1)")                 \
        for (int t_ = 0; t_ < threads_; ++t_) {                                               \
            int64_t p0 = t_ * per_, p1 = p0 + per_ < (parts) ? p0 + per_ : (parts);           \
            if (p0 < p1) body;                                                                \
        }                                                                                     \
    } while (0)
#else
#define SPLIT(parts, threads, body) do { int64_t p0 = 0, p1 = (parts); (void)(threads); body; } while (0)
#endif

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
    int64_t total = mats * rows;
    if (grad_w) {
        int split = thread_count(threads, total, total * k * width);
        SPLIT(total, split, weight_grad_rows(grad, idx, x, grad_w, p0, p1, rows, k, keys, width));
    }
    if (grad_x) {
        int split = thread_count(threads, mats, total * k * width);
        SPLIT(mats, split, feature_grad_graphs(grad, w, idx, grad_x, p0, p1, rows, k, keys, width));
    }
    return 0;
}
