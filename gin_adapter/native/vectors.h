/* What the vectorised kernels share (graph_sum.c, score_rows.c, tiles.c): 16-float vectors of GCC's vector
 * extensions (one AVX-512 register, two AVX2 ones), unaligned loads and stores, and MULTIVERSION, which on x86-64
 * Linux with GCC compiles a function for AVX-512, for AVX2 and for the baseline, chosen when the library loads. */
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

#endif
