/* Causal attention and its per-head top-k graph, forward and backward, one compiled call per layer and direction
 * (gin_adapter/native_attention_graph.py; the Python form is gin_adapter/joint.py).
 *
 * For query head h of batch b (key/value head h / G), query rows i and keys j <= i:
 *     S = scaling Q K^T,   P[i, j] = exp(S[i, j] - max_j S[i, :]) / sum_j exp(...)      (j <= i; 0 above)
 *     O = P V,   idx[i] = top-k_j P[i, j] (ties to the lower position),   W[i, m] = P[i, idx_m]
 * and backward, with dO and the graph's gradient dW (or none):
 *     c_i = dO_i . O_i + dW_i . W_i,   dS = P (dO V^T - c) + scatter(W dW),
 *     dQ = scaling dS K,   dK = scaling dS^T Q,   dV = P^T dO.
 *
 * Work: the rows of one head go in tiles (tiles.h) whose scores, at most tile x L floats (512 KiB at L = 2,048),
 * stay in the thread's cache through the softmax, the products, the top-k and the softmax backward, where ATen's
 * chunked form (joint.py) writes and reads them back once per operator.
 *
 * Threads: each head's tiles are cut into `segments` runs of about equal causal work (a shape-only choice, so the
 * result does not depend on the thread count); the (b, h, run) units are spread over OpenMP threads (PyTorch's,
 * row_topk.c). Backward writes each unit's dK, dV into its own slice of `partial_k`, `partial_v`
 * (segments, B, H, L, .) and sums the slices in a fixed order (heads of the group, then runs) at the end.
 *
 * Layouts (float32): q, k, v as in tiles.h; out, dO, dQ (B, H, L, .) contiguous; W, idx (B, H, L, K) contiguous
 * (idx: int64 key positions); dK, dV (B, Hkv, L, .) contiguous.
 * Return: 0, 1 for bad arguments, 2 when memory ran out, 3 without an sgemm.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_topk.h"
#include "tiles.h"

#define UNITS(p) ((p)->batch * (p)->heads * (p)->segments)

static void forward_unit(const problem *p, int64_t unit, float *out, float *weights, int64_t *index, float *s, float *cv, int32_t *ci) {
    int64_t run = unit % p->segments, bh = unit / p->segments, b = bh / p->heads, h = bh % p->heads, t0, t1, r0, rows, n;
    segment_tiles(p, run, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
        tile_rows(p, t, &r0, &rows, &n);
        tile_probabilities(p, b, h, r0, rows, n, s);
        int64_t row0 = bh * p->length + r0;
        tiles_gemm(0, 0, (int)rows, (int)p->dim_v, (int)n, 1.0f, s, (int)n, v_rows(p, b, h), (int)p->v_l, 0.0f, out + row0 * p->dim_v, (int)p->dim_v);
        gin_topk_rows_buffered(s, rows, n, n, (int)p->top_k, weights + row0 * p->top_k, index + row0 * p->top_k, cv, ci);
    }
}

int gin_attention_graph_forward_f32(PROBLEM_ARGUMENTS, float *out, float *weights, int64_t *index, int threads) {
    problem p = PROBLEM_OF_ARGUMENTS;
    int status = tiles_check(&p);
    if (status) return status;
    int64_t units = UNITS(&p);
#pragma omp parallel num_threads(team_size(threads, units)) reduction(| : status)
    {
        float *s = malloc((tile * length + length + 8) * sizeof(float));  /* the tile's scores, then the top-k's candidates */
        int32_t *ci = malloc((length + 8) * sizeof(int32_t));
        if (!s || !ci) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; ++unit)
            if (s && ci) forward_unit(&p, unit, out, weights, index, s, s + tile * length, ci);
        free(s); free(ci);
    }
    return status;
}

static void backward_unit(const problem *p, int64_t unit, const float *out, const float *grad, const float *kept, const float *weights,
                          const int64_t *index, int64_t k, float *grad_q, float *partial_k, float *partial_v, float *s, float *d) {
    int64_t run = unit % p->segments, bh = unit / p->segments, b = bh / p->heads, h = bh % p->heads, t0, t1, r0, rows, n;
    segment_tiles(p, run, &t0, &t1);
    int64_t keys = t1 * p->tile < p->length ? t1 * p->tile : p->length;  /* the keys this unit's tiles see */
    int64_t slice = (run * p->batch * p->heads + bh) * p->length;
    float *dk = partial_k + slice * p->dim, *dv = partial_v + slice * p->dim_v;
    memset(dk, 0, keys * p->dim * sizeof(float));
    memset(dv, 0, keys * p->dim_v * sizeof(float));
    const float *kh = k_rows(p, b, h), *vh = v_rows(p, b, h);
    for (int64_t t = t0; t < t1; ++t) {
        tile_rows(p, t, &r0, &rows, &n);
        int64_t row0 = bh * p->length + r0;
        const float *g = grad + row0 * p->dim_v, *qt = q_rows(p, b, h, r0);
        tile_probabilities(p, b, h, r0, rows, n, s);
        tiles_gemm(1, 0, (int)n, (int)p->dim_v, (int)rows, 1.0f, s, (int)n, g, (int)p->dim_v, 1.0f, dv, (int)p->dim_v);  /* dV += P^T dO */
        tiles_gemm(0, 1, (int)rows, (int)n, (int)p->dim_v, 1.0f, g, (int)p->dim_v, vh, (int)p->v_l, 0.0f, d, (int)n);  /* dP = dO V^T */
        softmax_grad_tile(d, s, rows, n, g, out + row0 * p->dim_v, p->dim_v, k ? kept + row0 * k : NULL, k ? weights + row0 * k : NULL,
                          k ? index + row0 * k : NULL, k);
        tiles_gemm(0, 0, (int)rows, (int)p->dim, (int)n, p->scaling, d, (int)n, kh, (int)p->k_l, 0.0f, grad_q + row0 * p->dim, (int)p->dim);  /* dQ */
        tiles_gemm(1, 0, (int)n, (int)p->dim, (int)rows, p->scaling, d, (int)n, qt, (int)p->q_l, 1.0f, dk, (int)p->dim);  /* dK += s dS^T Q */
    }
}

int gin_attention_graph_backward_f32(PROBLEM_ARGUMENTS, const float *out, const float *grad, const float *kept, const float *weights,
                                     const int64_t *index, float *grad_q, float *grad_k, float *grad_v, float *partial_k, float *partial_v,
                                     int threads) {
    problem p = PROBLEM_OF_ARGUMENTS;
    int status = tiles_check(&p);
    if (status) return status;
    int64_t units = UNITS(&p), graph_k = kept ? top_k : 0;
#pragma omp parallel num_threads(team_size(threads, units)) reduction(| : status)
    {
        float *s = malloc(2 * tile * length * sizeof(float));  /* P, then dP and dS */
        if (!s) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; ++unit)
            if (s) backward_unit(&p, unit, out, grad, kept, weights, index, graph_k, grad_q, partial_k, partial_v, s, s + tile * length);
        free(s);
    }
    if (!status) sum_runs(&p, partial_k, partial_v, heads / kv_heads, grad_k, grad_v, threads);
    return status;
}
