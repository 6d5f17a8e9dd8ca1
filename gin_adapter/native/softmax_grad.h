/* One row of the softmax backward with the graph's gradient, shared by score_rows.c (ATen's query chunks) and
 * tiles.c (the compiled attention's tiles); inlined into each caller's MULTIVERSION loop:
 *
 *     c = dO . O + sum_m dW_m W_m,   dS_j = P_j (dP_j - c) + sum_{m: idx_m - k0 = j} W_m dW_m
 *
 * d holds dP on entry and dS on return (n entries); kr, wr, ir: the row's k values of dW, W and key positions. */
#ifndef GIN_ADAPTER_SOFTMAX_GRAD_H
#define GIN_ADAPTER_SOFTMAX_GRAD_H

#include <stdint.h>

#include "vectors.h"  /* dot */

static inline __attribute__((always_inline)) void softmax_grad_row(float *d, const float *p, int64_t n, const float *g, const float *o, int64_t dv,
                                                                   const float *kr, const float *wr, const int64_t *ir, int64_t k, int64_t k0) {
    float c = dot(g, o, dv);
    for (int64_t m = 0; m < k; ++m) c += kr[m] * wr[m];
    vf cv = (vf){0} + c;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) store(d + j, load(p + j) * (load(d + j) - cv));
    for (; j < n; ++j) d[j] = p[j] * (d[j] - c);
    for (int64_t m = 0; m < k; ++m) {
        int64_t col = ir[m] - k0;
        if (col >= 0 && col < n) d[col] += wr[m] * kr[m];
    }
}

#endif
