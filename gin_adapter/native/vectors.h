/* What the vectorised kernels share (graph_sum.c, score_rows.c, tiles.c, decode_graph.c, block_forward.c): 16-float
 * vectors of GCC's vector extensions (one AVX-512 register, two AVX2 ones), unaligned loads and stores, a lane sum
 * and a dot product, and MULTIVERSION, which on x86-64 Linux with GCC compiles a function for AVX-512, for AVX2 and
 * for the baseline, chosen when the library loads. */
#ifndef GIN_ADAPTER_VECTORS_H
#define GIN_ADAPTER_VECTORS_H

#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define LANES 16
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline __attribute__((always_inline)) vf load(const float *x) { vf v; __builtin_memcpy(&v, x, sizeof v); return v; }
static inline __attribute__((always_inline)) void store(float *x, vf v) { __builtin_memcpy(x, &v, sizeof v); }

/* the sum of v's 16 lanes as a tree of halves (a lane-by-lane loop is 15 dependent additions) */
static inline __attribute__((always_inline)) float lane_sum(vf v) {
    typedef float half_vf __attribute__((vector_size(2 * LANES)));
    typedef float quarter_vf __attribute__((vector_size(LANES)));
    half_vf h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    quarter_vf q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* sum_i w[i] x[i] over n numbers: 16-float partial sums, then the rest one at a time */
static inline __attribute__((always_inline)) float dot(const float *w, const float *x, int64_t n) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(w + i) * load(x + i);
    float s = lane_sum(acc);
    for (; i < n; ++i) s += w[i] * x[i];
    return s;
}

#endif
