/* row_topk.c's per-row top-k for other kernels of the library (attention_graph.c). */
#ifndef GIN_ADAPTER_ROW_TOPK_H
#define GIN_ADAPTER_ROW_TOPK_H

#include <stdint.h>

#define ROW_TOPK_MAX_K 64

/* the k (1..64) largest of each of `rows` rows of n >= k floats (row r at x + r * stride), descending, ties to
   the lowest position, into values / index (rows x k); cv, ci: scratch of n + 8 entries each. Calling thread only. */
void gin_topk_rows_buffered(const float *x, int64_t rows, int64_t n, int64_t stride, int k, float *values, int64_t *index, float *cv, int32_t *ci);

#endif
