/* Causal attention and the published rule's graph, forward and backward, one compiled call per layer and
 * direction (gin_adapter/native_threshold_graph.py; the Python form is gin_adapter/joint_threshold.py).
 *
 * With every head's causal probabilities P_h of a batch row (attention_graph.c's P, keys j <= i):
 *     O_h = P_h V,   w = sum_h P_h,   S = sigmoid(alpha (min(1, w) - tau)),   A = S [S > threshold] [j <= i]
 * kept whole ("dense", A (B, L, L)) or as each row's K largest entries ("top_k": weights (B, L, K), key
 * positions idx). Backward, with dO and the graph's gradient dA (or none):
 *     dW = dA [A > 0] alpha A (1 - A) [w <= 1]                    (the same for every head; on the K entries for top_k)
 *     c_h = dO_h . O_h + sum_j dW_j P_h,j,   dS_h = P_h (dO_h V^T + dW - c_h),
 *     dQ_h = scaling dS_h K,   dK += scaling dS_h^T Q_h,   dV += P_h^T dO_h.
 *
 * Work: tiles of query rows of one batch row (tiles.h) with every head's probabilities of the tile in the
 * thread's buffer (H x tile x L floats: 4.5 MiB for 9 heads at L = 2,048), cut into `segments` runs of equal
 * causal work per batch row (a shape-only choice); the (b, run) units go over OpenMP threads. Backward writes each
 * unit's dK, dV into its own slice of partial_k, partial_v (segments, B, Hkv, L, .) and sums the slices in run
 * order at the end, so the result does not depend on the thread count.
 *
 * Layouts (float32): q, k, v as in tiles.h; out, dO, dQ (B, H, L, .) contiguous; the graph and its gradient
 * (B, L, L) or (B, L, K) contiguous, idx (B, L, K) int64; dK, dV (B, Hkv, L, .) contiguous.
 * Return: 0, 1 for bad arguments, 2 when memory ran out, 3 without an sgemm.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_topk.h"
#include "tiles.h"

typedef struct {
    float alpha, tau, threshold;
    int top_k_form;  /* 1: the K largest entries of each row; 0: the graph whole */
} rule;

static int bad_rule(const problem *p, const rule *g) { return g->alpha <= 0 || (g->top_k_form && p->top_k < 1); }

static void forward_unit(const problem *p, const rule *g, int64_t unit, float *out, float *graph, int64_t *index, float *s, float *w, float *a,
                         float *cv, int32_t *ci) {
    int64_t run = unit % p->segments, b = unit / p->segments, t0, t1, r0, rows, n;
    segment_tiles(p, run, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
        tile_rows(p, t, &r0, &rows, &n);
        memset(w, 0, rows * n * sizeof(float));
        for (int64_t h = 0; h < p->heads; ++h) {
            tile_probabilities(p, b, h, r0, rows, n, s);
            int64_t row0 = (b * p->heads + h) * p->length + r0;
            tiles_gemm(0, 0, (int)rows, (int)p->dim_v, (int)n, 1.0f, s, (int)n, v_rows(p, b, h), (int)p->v_l, 0.0f, out + row0 * p->dim_v, (int)p->dim_v);
            for (int64_t e = 0; e < rows * n; ++e) w[e] += s[e];
        }
        sharpen_tile(w, a, rows, n, r0, g->alpha, g->tau, g->threshold);
        int64_t row0 = b * p->length + r0;
        if (g->top_k_form) {
            gin_topk_rows_buffered(a, rows, n, n, (int)p->top_k, graph + row0 * p->top_k, index + row0 * p->top_k, cv, ci);
        } else {
            for (int64_t r = 0; r < rows; ++r) {
                memcpy(graph + (row0 + r) * p->length, a + r * n, n * sizeof(float));
                memset(graph + (row0 + r) * p->length + n, 0, (p->length - n) * sizeof(float));
            }
        }
    }
}

int gin_threshold_graph_forward_f32(PROBLEM_ARGUMENTS, float alpha, float tau, float threshold, int top_k_form, float *out, float *graph,
                                    int64_t *index, int threads) {
    problem p = PROBLEM_OF_ARGUMENTS;
    rule g = {alpha, tau, threshold, top_k_form};
    int status = tiles_check(&p);
    if (status) return status;
    if (bad_rule(&p, &g) || (top_k_form && !index)) return 1;
    int64_t units = batch * segments, area = tile * length;
#pragma omp parallel num_threads(team_size(threads, units)) reduction(| : status)
    {
        float *s = malloc((3 * area + length + 8) * sizeof(float));  /* P_h, w, A, the top-k's candidates */
        int32_t *ci = malloc((length + 8) * sizeof(int32_t));
        if (!s || !ci) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; ++unit)
            if (s && ci) forward_unit(&p, &g, unit, out, graph, index, s, s + area, s + 2 * area, s + 3 * area, ci);
        free(s); free(ci);
    }
    return status;
}

/* dW of one tile's rows: on the K kept entries (top_k form: dw rows x K) or whole (dw rows x n) */
static void graph_grad(const problem *p, const rule *g, const float *grad_graph, const float *graph, const int64_t *index, const float *w,
                       float *a, int64_t b, int64_t r0, int64_t rows, int64_t n, float *dw) {
    int64_t row0 = b * p->length + r0;
    if (g->top_k_form) {
        int64_t k = p->top_k;
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t m = 0; m < k; ++m) {
                float weight = graph[(row0 + r) * k + m];
                int64_t j = index[(row0 + r) * k + m];
                int under_one = j >= 0 && j < n && w[r * n + j] <= 1.0f;
                dw[r * k + m] = weight > 0 && under_one ? grad_graph[(row0 + r) * k + m] * weight * (1.0f - weight) * g->alpha : 0.0f;
            }
        return;
    }
    sharpen_tile(w, a, rows, n, r0, g->alpha, g->tau, g->threshold);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j) {
            float weight = a[r * n + j];
            dw[r * n + j] = weight > 0 && w[r * n + j] <= 1.0f ? grad_graph[(row0 + r) * p->length + j] * weight * (1.0f - weight) * g->alpha : 0.0f;
        }
}

static void backward_unit(const problem *p, const rule *g, int64_t unit, const float *out, const float *grad, const float *grad_graph,
                          const float *graph, const int64_t *index, float *grad_q, float *partial_k, float *partial_v, float *probs, float *w,
                          float *a, float *d, float *dw, float *picked) {
    int64_t run = unit % p->segments, b = unit / p->segments, t0, t1, r0, rows, n, area = p->tile * p->length, k = p->top_k;
    segment_tiles(p, run, &t0, &t1);
    int64_t keys = t1 * p->tile < p->length ? t1 * p->tile : p->length;  /* the keys this unit's tiles see */
    int64_t slice = (run * p->batch + b) * p->kv_heads * p->length;
    for (int64_t kh = 0; kh < p->kv_heads; ++kh) {
        memset(partial_k + (slice + kh * p->length) * p->dim, 0, keys * p->dim * sizeof(float));
        memset(partial_v + (slice + kh * p->length) * p->dim_v, 0, keys * p->dim_v * sizeof(float));
    }
    int64_t groups = p->heads / p->kv_heads;
    for (int64_t t = t0; t < t1; ++t) {
        tile_rows(p, t, &r0, &rows, &n);
        memset(w, 0, rows * n * sizeof(float));
        for (int64_t h = 0; h < p->heads; ++h) {
            float *s = probs + h * area;
            tile_probabilities(p, b, h, r0, rows, n, s);
            for (int64_t e = 0; e < rows * n; ++e) w[e] += s[e];
        }
        if (grad_graph) graph_grad(p, g, grad_graph, graph, index, w, a, b, r0, rows, n, dw);
        for (int64_t h = 0; h < p->heads; ++h) {
            const float *s = probs + h * area;
            int64_t row0 = (b * p->heads + h) * p->length + r0, kh = h / groups;
            const float *gr = grad + row0 * p->dim_v, *o = out + row0 * p->dim_v, *qt = q_rows(p, b, h, r0);
            float *dk = partial_k + (slice + kh * p->length) * p->dim, *dv = partial_v + (slice + kh * p->length) * p->dim_v;
            tiles_gemm(1, 0, (int)n, (int)p->dim_v, (int)rows, 1.0f, s, (int)n, gr, (int)p->dim_v, 1.0f, dv, (int)p->dim_v);  /* dV += P^T dO */
            tiles_gemm(0, 1, (int)rows, (int)n, (int)p->dim_v, 1.0f, gr, (int)p->dim_v, v_rows(p, b, h), (int)p->v_l, 0.0f, d, (int)n);  /* dP */
            if (!grad_graph) {
                softmax_grad_tile(d, s, rows, n, gr, o, p->dim_v, NULL, NULL, NULL, 0);
            } else if (g->top_k_form) {
                const int64_t *ix = index + (b * p->length + r0) * k;
                for (int64_t r = 0; r < rows; ++r)
                    for (int64_t m = 0; m < k; ++m) {
                        int64_t j = ix[r * k + m];
                        picked[r * k + m] = j >= 0 && j < n ? s[r * n + j] : 0.0f;
                    }
                softmax_grad_tile(d, s, rows, n, gr, o, p->dim_v, dw, picked, ix, k);
            } else {
                softmax_grad_dense_tile(d, s, rows, n, gr, o, p->dim_v, dw);
            }
            tiles_gemm(0, 0, (int)rows, (int)p->dim, (int)n, p->scaling, d, (int)n, k_rows(p, b, h), (int)p->k_l, 0.0f, grad_q + row0 * p->dim,
                       (int)p->dim);  /* dQ */
            tiles_gemm(1, 0, (int)n, (int)p->dim, (int)rows, p->scaling, d, (int)n, qt, (int)p->q_l, 1.0f, dk, (int)p->dim);  /* dK += s dS^T Q */
        }
    }
}

int gin_threshold_graph_backward_f32(PROBLEM_ARGUMENTS, float alpha, float tau, float threshold, int top_k_form, const float *out, const float *grad,
                                     const float *grad_graph, const float *graph, const int64_t *index, float *grad_q, float *grad_k, float *grad_v,
                                     float *partial_k, float *partial_v, int threads) {
    problem p = PROBLEM_OF_ARGUMENTS;
    rule g = {alpha, tau, threshold, top_k_form};
    int status = tiles_check(&p);
    if (status) return status;
    if (bad_rule(&p, &g) || (grad_graph && top_k_form && !(graph && index))) return 1;
    int64_t units = batch * segments, area = tile * length;
#pragma omp parallel num_threads(team_size(threads, units)) reduction(| : status)
    {
        /* every head's P, w, A, dS, dW (tile x L or tile x K), each head's P at the kept entries (tile x K) */
        float *s = malloc(((heads + 4) * area + tile * top_k) * sizeof(float));
        if (!s) status |= 2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; ++unit)
            if (s) backward_unit(&p, &g, unit, out, grad, grad_graph, graph, index, grad_q, partial_k, partial_v, s, s + heads * area,
                                 s + (heads + 1) * area, s + (heads + 2) * area, s + (heads + 3) * area, s + (heads + 4) * area);
        free(s);
    }
    if (!status) sum_runs(&p, partial_k, partial_v, 1, grad_k, grad_v, threads);
    return status;
}
