/* What the vectorised kernels share (graph_sum.c, score_rows.c, tiles.c, decode_graph.c, block_forward.c): 16-float
 * vectors of GCC's vector extensions (one AVX-512 register, two AVX2 ones), unaligned loads and stores, a lane sum
 * and dot products of one or several rows, and MULTIVERSION, which on x86-64 Linux with GCC compiles a function for AVX-512, for AVX2 and
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

/* the lanes of a vector loaded at n - 16 that hold the last `rest` (< 16) numbers: all bits set there, 0 elsewhere */
static inline __attribute__((always_inline)) vi tail_lanes(int64_t rest) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return lane >= (vi){0} + (int32_t)(LANES - rest);
}

#define MAX_DOT_ROWS 4

/* out[r] = sum_i w[r stride + i] x[i] for `rows` (<= MAX_DOT_ROWS, a constant where inlined) rows of w sharing x.
 * Each row: 16-float partial sums in order, the last n % 16 numbers as one vector ending at n with the lanes
 * already counted masked to 0 (n >= 16), the lanes summed as a tree; under 16 numbers one at a time. The same
 * arithmetic for each row whatever `rows` is, so a row's result does not depend on how rows are grouped (threads
 * split them). Several rows at once: independent chains of multiply-adds instead of one waiting on the last. */
static inline __attribute__((always_inline)) void dots(const float *w, int64_t stride, const float *x, int64_t n, int rows, float *out) {
    if (n < LANES) {
        for (int r = 0; r < rows; ++r) {
            float s = 0.0f;
            for (int64_t i = 0; i < n; ++i) s += w[r * stride + i] * x[i];
            out[r] = s;
        }
        return;
    }
    vf acc[MAX_DOT_ROWS];
    for (int r = 0; r < rows; ++r) acc[r] = (vf){0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf xv = load(x + i);
        for (int r = 0; r < rows; ++r) acc[r] += load(w + r * stride + i) * xv;
    }
    if (i < n) {
        vi keep = tail_lanes(n - i);
        vf xv = load(x + n - LANES);
        for (int r = 0; r < rows; ++r) acc[r] += (vf)((vi)(load(w + r * stride + n - LANES) * xv) & keep);
    }
    for (int r = 0; r < rows; ++r) out[r] = lane_sum(acc[r]);
}

/* sum_i w[i] x[i] over n numbers (dots() of one row) */
static inline __attribute__((always_inline)) float dot(const float *w, const float *x, int64_t n) {
    float out;
    dots(w, 0, x, n, 1, &out);
    return out;
}

/* s[j] = scale * (w_j . x) for the `count` rows w_j = w + j stride: dots() four rows at a time */
static inline __attribute__((always_inline)) void dot_rows(const float *w, int64_t stride, const float *x, int64_t n, int64_t count, float scale, float *s) {
    int64_t j = 0;
    for (; j + MAX_DOT_ROWS <= count; j += MAX_DOT_ROWS) {
        float v[MAX_DOT_ROWS];
        dots(w + j * stride, stride, x, n, MAX_DOT_ROWS, v);
        for (int r = 0; r < MAX_DOT_ROWS; ++r) s[j + r] = scale * v[r];
    }
    for (; j < count; ++j) s[j] = scale * dot(w + j * stride, x, n);
}

#endif
