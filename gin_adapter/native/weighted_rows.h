/* A weighted sum of rows, out = sum_m w[m] x[at[m]] (or x[m] without `at`), shared by graph_sum.c (the top-k
 * graph's neighbour sum) and decode_graph.c (a decoded token's P V and its neighbour sum). Inlined into each caller's
 * vectorised clones. */
#ifndef GIN_ADAPTER_WEIGHTED_ROWS_H
#define GIN_ADAPTER_WEIGHTED_ROWS_H

#include <stdint.h>

#include "vectors.h"

/* one strip of `blocks` (a constant after inlining) vectors of out: the accumulators stay in registers while the n
   rows are added, independent FMAs side by side */
static inline __attribute__((always_inline)) void weighted_strip(const float *x, int64_t stride, const float *w, const int64_t *at, int64_t n,
                                                                 int64_t e0, const int blocks, float *out) {
    vf acc[8] = {{0}};
    for (int64_t m = 0; m < n; ++m) {
        const float *xr = x + (at ? at[m] : m) * stride + e0;
        for (int b = 0; b < blocks; ++b) acc[b] += w[m] * load(xr + b * LANES);
    }
    for (int b = 0; b < blocks; ++b) store(out + e0 + b * LANES, acc[b]);
}

/* out (width floats) = sum_m w[m] x[at ? at[m] : m] over n rows of x (row stride `stride`): strips of up to 8
   vectors, then the features left over one at a time */
static inline __attribute__((always_inline)) void weighted_row(const float *x, int64_t stride, const float *w, const int64_t *at, int64_t n,
                                                               int64_t width, float *out) {
    int64_t body = width - width % LANES;
    for (int64_t e0 = 0; e0 < body; e0 += 8 * LANES) {
        switch ((body - e0) / LANES) {
            case 1: weighted_strip(x, stride, w, at, n, e0, 1, out); break;
            case 2: weighted_strip(x, stride, w, at, n, e0, 2, out); break;
            case 3: weighted_strip(x, stride, w, at, n, e0, 3, out); break;
            case 4: weighted_strip(x, stride, w, at, n, e0, 4, out); break;
            case 5: weighted_strip(x, stride, w, at, n, e0, 5, out); break;
            case 6: weighted_strip(x, stride, w, at, n, e0, 6, out); break;
            case 7: weighted_strip(x, stride, w, at, n, e0, 7, out); break;
            default: weighted_strip(x, stride, w, at, n, e0, 8, out); break;
        }
    }
    for (int64_t e = body; e < width; ++e) {
        float acc = 0.0f;
        for (int64_t m = 0; m < n; ++m) acc += w[m] * x[(at ? at[m] : m) * stride + e];
        out[e] = acc;
    }
}

#endif
