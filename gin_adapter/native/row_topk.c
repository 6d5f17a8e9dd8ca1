/* Per-row top-k of float32 rows on the CPU: gin_adapter's compiled kernel (see gin_adapter/native_top_k.py).
 *
 *   gin_row_topk_f32(x, rows, n, stride, k, values, index, threads)
 *
 * For each of `rows` rows of `n` floats (row r starts at x + r * stride), writes the k largest values in
 * descending order to values[r * k ...] and their positions to index[r * k ...]: exactly torch.topk's values;
 * positions by the order (larger value, NaN first, then lower position), so ties go to the lowest position.
 * Returns 0, 1 for bad arguments (k < 1, k > 64, n < k, rows < 0, n >= 2^31), 2 when memory ran out.
 *
 * Why: torch.topk on the CPU costs a partial sort per row. On a query chunk's rows of 128-2,048 attention
 * probabilities this kernel takes 0.14-0.22 of its time for k = 8 on one thread of an Intel Xeon; it stays
 * faster than ATen up to k = 24 and is slower from k = 32, so Python hands it k <= 24 only
 * (`run_benchmarks.py --suite top_k`, docs/benchmarks.md).
 *
 * How, per row (exact): the row is viewed as s slabs of c columns (n = s c + rest, c a power of two near
 * sqrt(k n)). The column maxima are one vectorised pass; t, the k-th largest column maximum, is found by a
 * branch-free sorted insertion (kth[p] = max(kth[p], min(kth[p-1], y))). k distinct entries are >= t, so the
 * row's top k are among the entries >= t, each in a column whose maximum is >= t or in the rest: only those
 * columns are read again. Up to 32 such candidates (usually about k + 1) are ranked: each one's rank is the
 * number of candidates that rank before it (8 at a time, with GCC vector extensions), and rank < k places it.
 * Rows with more candidates (many ties with t: mostly-zero rows, as thresholded graphs), rows holding NaN and
 * rows shorter than 4 k go through a sorted insertion over the row in position order instead, which skips an
 * entry equal to the k-th largest so far (in position order it cannot rank before it).
 *
 * Threads: rows are split into `threads` parts by OpenMP when the call holds at least 65,536 elements. Built
 * with -fopenmp, the library takes the libgomp.so.1 that PyTorch's wheel has already loaded, so these parts run
 * on PyTorch's own (already spinning) OpenMP threads rather than on new ones competing with them; per-call
 * POSIX threads, tried first, were slower at 2 threads than one. Without OpenMP it runs on the calling thread.
 * On x86-64 Linux with GCC the row loop is compiled for AVX2 and for the baseline, chosen when the library
 * loads (target_clones).
 */
#include <stdint.h>
#include <stdlib.h>

#include "row_topk.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

#define MAX_K ROW_TOPK_MAX_K
#define MAX_COLUMNS 1024
#define PARALLEL_MIN_ELEMENTS 65536
#define RANKED_CANDIDATES 32

/* (a, ia) ranks before (b, ib): larger value (NaN largest, as in torch.topk), then lower index */
static inline int ranks_before(float a, int64_t ia, float b, int64_t ib) {
    if (a > b) return 1;
    if (a != a) return b == b || ia < ib;
    if (b != b) return 0;
    return a == b && ia < ib;
}

static inline void insert(float *v, int64_t *ix, int filled, float y, int64_t iy) {
    int p = filled;
    while (p > 0 && ranks_before(y, iy, v[p - 1], ix[p - 1])) { v[p] = v[p - 1]; ix[p] = ix[p - 1]; --p; }
    v[p] = y; ix[p] = iy;
}

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* the top k of m (value, index) pairs cv, ci (padded to a multiple of 8 with (-inf, INT32_MAX)) into v, ix,
   descending: each pair's rank is how many pairs rank before it (unique: ties go by index) */
static inline __attribute__((always_inline))
void select_top(const float *cv, const int32_t *ci, int64_t m, const int k, float *v, int64_t *ix) {
    int64_t blocks = (m + 7) / 8;
    for (int64_t a = 0; a < m; ++a) {
        float y = cv[a]; int32_t iy = ci[a];
        v8f ya = {y, y, y, y, y, y, y, y};
        v8i iya = {iy, iy, iy, iy, iy, iy, iy, iy};
        v8i count = {0};
        for (int64_t b = 0; b < blocks; ++b) {
            v8f vb; v8i ib;
            __builtin_memcpy(&vb, cv + 8 * b, sizeof vb);
            __builtin_memcpy(&ib, ci + 8 * b, sizeof ib);
            count -= (vb > ya) | ((vb == ya) & (ib < iya));
        }
        int32_t rank = count[0] + count[1] + count[2] + count[3] + count[4] + count[5] + count[6] + count[7];
        if (rank < k) { v[rank] = y; ix[rank] = iy; }
    }
}

/* exact top-k of one row by insertion in position order (short rows, rows holding NaN, many ties) */
static void topk_scan(const float *row, int64_t n, int k, float *v, int64_t *ix) {
    for (int64_t j = 0; j < k; ++j) insert(v, ix, (int)j, row[j], j);
    float last = v[k - 1];
    for (int64_t j = k; j < n; ++j) {
        float y = row[j];  /* in position order, an entry equal to the k-th never ranks before it */
        if ((y > last || y != y) && ranks_before(y, j, v[k - 1], ix[k - 1])) { insert(v, ix, k - 1, y, j); last = v[k - 1]; }
    }
}

static inline __attribute__((always_inline))
void topk_rows_impl(const float *x, int64_t rows, int64_t n, int64_t stride, const int k, int64_t columns,
                      float *values, int64_t *index, float *cv, int32_t *ci) {
    float colmax[MAX_COLUMNS], kth[MAX_K];
    int64_t slabs = columns ? n / columns : 0, body = slabs * columns;
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * stride;
        float *v = values + r * k;
        int64_t *ix = index + r * k;
        int nan = 0;
        if (columns) {
            for (int64_t c = 0; c < columns; ++c) { colmax[c] = row[c]; nan |= row[c] != row[c]; }
            for (int64_t s = 1; s < slabs; ++s) {
                const float *slab = row + s * columns;
                for (int64_t c = 0; c < columns; ++c) { float y = slab[c]; colmax[c] = y > colmax[c] ? y : colmax[c]; nan |= y != y; }
            }
            for (int64_t j = body; j < n; ++j) nan |= row[j] != row[j];
        }
        if (!columns || nan) { topk_scan(row, n, k, v, ix); continue; }
        /* t: the k-th largest column maximum. k distinct entries are >= t, so the row's top k are all >= t.
           Sorted insertion of values only, branch-free: kth[p] = max(kth[p], min(kth[p-1], y)). */
        kth[0] = colmax[0];
        for (int j = 1; j < k; ++j) kth[j] = -__builtin_inff();
        for (int64_t c = 1; c < columns; ++c) {
            float y = colmax[c];
            for (int p = k - 1; p > 0; --p) { float lo = kth[p - 1] < y ? kth[p - 1] : y; kth[p] = kth[p] > lo ? kth[p] : lo; }
            kth[0] = kth[0] > y ? kth[0] : y;
        }
        float t = kth[k - 1];
        /* the candidates: entries >= t, in columns whose maximum is >= t or in the rest */
        int64_t m = 0;
        for (int64_t c0 = 0; c0 < columns; c0 += 64) {
            uint64_t qualifies = 0;
            int64_t width = columns - c0 < 64 ? columns - c0 : 64;
            for (int64_t i = 0; i < width; ++i) qualifies |= (uint64_t)(colmax[c0 + i] >= t) << i;
            while (qualifies) {
                int64_t c = c0 + __builtin_ctzll(qualifies);
                qualifies &= qualifies - 1;
                for (int64_t s = 0; s < slabs; ++s) {
                    int64_t j = s * columns + c;
                    float y = row[j];
                    cv[m] = y; ci[m] = (int32_t)j; m += y >= t;
                }
            }
        }
        for (int64_t j = body; j < n; ++j) { float y = row[j]; cv[m] = y; ci[m] = (int32_t)j; m += y >= t; }
        for (int64_t p = m; p < ((m + 7) & ~(int64_t)7); ++p) { cv[p] = -__builtin_inff(); ci[p] = INT32_MAX; }
        if (m <= RANKED_CANDIDATES) select_top(cv, ci, m, k, v, ix);
        else topk_scan(row, n, k, v, ix);  /* many ties with t (rows of zeros, thresholded graphs): in position order */
    }
}

MULTIVERSION
static void topk_rows_k8(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t columns, float *values, int64_t *index, float *cv, int32_t *ci) {
    topk_rows_impl(x, rows, n, stride, 8, columns, values, index, cv, ci);
}

MULTIVERSION
static void topk_rows_any(const float *x, int64_t rows, int64_t n, int64_t stride, int k, int64_t columns, float *values, int64_t *index, float *cv, int32_t *ci) {
    topk_rows_impl(x, rows, n, stride, k, columns, values, index, cv, ci);
}

static void topk_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int k, int64_t columns, float *values, int64_t *index, float *cv, int32_t *ci) {
    if (k == 8) topk_rows_k8(x, rows, n, stride, columns, values, index, cv, ci);
    else topk_rows_any(x, rows, n, stride, k, columns, values, index, cv, ci);
}

static int64_t column_count(int64_t n, int k) {
    if (n < 4 * (int64_t)k) return 0;
    int64_t c = 1;
    while ((c * 2) * (c * 2) <= (int64_t)k * n) c *= 2;
    if (c < 2 * k) c = 2 * k;
    if (c > MAX_COLUMNS) c = MAX_COLUMNS;
    return c;
}

/* the top k of `rows` rows of n floats with the caller's candidate buffers cv, ci (n + 8 entries each), on the
   calling thread; for attention_graph.c, which holds its own buffers (row_topk.h) */
void gin_topk_rows_buffered(const float *x, int64_t rows, int64_t n, int64_t stride, int k, float *values, int64_t *index, float *cv, int32_t *ci) {
    topk_rows(x, rows, n, stride, k, column_count(n, k), values, index, cv, ci);
}

/* rows [r0, r1) with this thread's candidate buffers; 0, or 2 when they could not be allocated */
static int topk_part(const float *x, int64_t r0, int64_t r1, int64_t n, int64_t stride, int k, int64_t columns, float *values, int64_t *index) {
    if (r0 >= r1) return 0;
    float *cv = malloc((n + 8) * sizeof(float));
    int32_t *ci = malloc((n + 8) * sizeof(int32_t));
    int status = cv && ci ? 0 : 2;
    if (!status) topk_rows(x + r0 * stride, r1 - r0, n, stride, k, columns, values + r0 * k, index + r0 * k, cv, ci);
    free(cv); free(ci);
    return status;
}

int gin_row_topk_f32(const float *x, int64_t rows, int64_t n, int64_t stride, int k, float *values, int64_t *index, int threads) {
    if (k < 1 || k > MAX_K || n < k || rows < 0 || n >= INT32_MAX) return 1;
    int64_t columns = column_count(n, k);
    if (threads < 1 || rows * n < PARALLEL_MIN_ELEMENTS) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    int status = 0;
#ifdef _OPENMP
    if (threads > 1) {
        int64_t per = (rows + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : status)
        for (int t = 0; t < threads; ++t) {
            int64_t r0 = t * per, r1 = r0 + per < rows ? r0 + per : rows;
            status |= topk_part(x, r0, r1, n, stride, k, columns, values, index);
        }
        return status;
    }
#endif
    return topk_part(x, 0, rows, n, stride, k, columns, values, index);
}
