/* What the tiled attention kernels share (tiles.c): the problem's layout, PyTorch's sgemm, the tile softmax and
 * its backward, the cut of a head's tiles into runs of equal causal work and the sum of the runs' gradients.
 * Used by attention_graph.c (the per-head top-k graph) and threshold_graph.c (the published rule's graph).
 *
 * A tile is `tile` query rows r0..r0+rows of one head with the keys 0..n they can see under causal attention
 * (n = r0 + rows); its scores and probabilities are a rows x n row-major matrix.
 */
#ifndef GIN_ADAPTER_TILES_H
#define GIN_ADAPTER_TILES_H

#include <stdint.h>

/* q (B, H, L, D) with element strides q_b, q_h, q_l; k (B, Hkv, L, D) and v (B, Hkv, L, Dv) likewise (last
   dimension contiguous); `segments` runs of tiles per unit of work; top_k: the picks kept per row */
typedef struct {
    const float *q, *k, *v;
    int64_t q_b, q_h, q_l, k_b, k_h, k_l, v_b, v_h, v_l;
    int64_t batch, heads, kv_heads, length, dim, dim_v, tile, segments, top_k;
    float scaling;
} problem;

#define PROBLEM_ARGUMENTS                                                                                                   \
    const float *q, int64_t q_b, int64_t q_h, int64_t q_l, const float *k, int64_t k_b, int64_t k_h, int64_t k_l, const float *v, \
        int64_t v_b, int64_t v_h, int64_t v_l, int64_t batch, int64_t heads, int64_t kv_heads, int64_t length, int64_t dim,      \
        int64_t dim_v, float scaling, int64_t tile, int64_t segments, int64_t top_k
#define PROBLEM_OF_ARGUMENTS {q, k, v, q_b, q_h, q_l, k_b, k_h, k_l, v_b, v_h, v_l, batch, heads, kv_heads, length, dim, dim_v, tile, segments, top_k, scaling}

/* row-major C (m x n, ldc) = alpha op(A) op(B) + beta C on the sgemm set by gin_set_sgemm */
void tiles_gemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

/* softmax of each of `rows` rows of n scores in place, row r over its first `first + r + 1` (at most n) columns, the
   rest set 0 (`first = n - 1`: every column) */
void tiles_softmax(float *s, int64_t rows, int64_t n, int64_t first);

/* 0, 1 for a bad problem (top_k up to 64 and the tile's rows; segments up to the tiles and 64), 3 without an sgemm */
int tiles_check(const problem *p);
int64_t tiles_of(const problem *p);
/* rows and the keys they see of tile t */
void tile_rows(const problem *p, int64_t t, int64_t *r0, int64_t *rows, int64_t *n);
/* the tiles [t0, t1) of run s: cut where the causal work (tile t: t + 1) reaches s / segments of the whole */
void segment_tiles(const problem *p, int64_t s, int64_t *t0, int64_t *t1);
/* OpenMP threads for `units` units of work (see tiles.c) */
int team_size(int threads, int64_t units);

static inline const float *q_rows(const problem *p, int64_t b, int64_t h, int64_t r0) { return p->q + b * p->q_b + h * p->q_h + r0 * p->q_l; }
static inline const float *k_rows(const problem *p, int64_t b, int64_t h) { return p->k + b * p->k_b + (h / (p->heads / p->kv_heads)) * p->k_h; }
static inline const float *v_rows(const problem *p, int64_t b, int64_t h) { return p->v + b * p->v_b + (h / (p->heads / p->kv_heads)) * p->v_h; }

/* one tile's probabilities of head (b, h) into s (rows x n): S = scaling Q K^T, then the causal softmax */
void tile_probabilities(const problem *p, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t n, float *s);

/* dP -> dS in place for one tile: c_r = dO_r . O_r + sum_m dW[r, m] W[r, m],
   dS[r, j] = P[r, j] (dP[r, j] - c_r) + sum_{m: idx_m = j} W[r, m] dW[r, m]   (k = 0: no graph term) */
void softmax_grad_tile(float *d, const float *p, int64_t rows, int64_t n, const float *grad, const float *out, int64_t dv,
                       const float *kept, const float *weights, const int64_t *index, int64_t k);

/* the same with the graph's gradient whole: dW (rows x n), c_r = dO_r . O_r + sum_j dW[r, j] P[r, j],
   dS[r, j] = P[r, j] (dP[r, j] + dW[r, j] - c_r) */
void softmax_grad_dense_tile(float *d, const float *p, int64_t rows, int64_t n, const float *grad, const float *out, int64_t dv, const float *dw);

/* dK (B, Hkv, L, D), dV (B, Hkv, L, Dv) = the sums over the `groups` partial heads of each key/value head, then
   the runs, of partial_k (segments, B, Hkv * groups, L, D) and partial_v (likewise), run s holding the keys its
   tiles see (the rest unwritten); a fixed order of additions, whatever the thread count */
void sum_runs(const problem *p, const float *partial_k, const float *partial_v, int64_t groups, float *grad_k, float *grad_v, int threads);

/* the published rule's graph of one tile from its head-summed probabilities w (rows x n), into a:
   S = sigmoid(alpha (min(1, w) - tau)),   A = S [S > threshold] [j <= first + r]  */
void sharpen_tile(const float *w, float *a, int64_t rows, int64_t n, int64_t first, float alpha, float tau, float threshold);

#endif
