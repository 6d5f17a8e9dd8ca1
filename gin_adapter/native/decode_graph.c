/* One decoded token's attention with its per-head top-k graph, and the graph's neighbour sum of the values, in one
 * call per layer: gin_adapter's compiled decode step behind gin_adapter/native_decode.py.
 *
 * For each batch element b and key/value head, the G = H / Hkv query heads g of the new token (q (B, H, 1, D)) over
 * the Lk cached keys and values (k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)), every key visible:
 *
 *   S = scaling Q_g K^T                          (G, Lk)
 *   P = softmax over the keys                    (G, Lk)     tiles.c's vectorised exp
 *   out[b, 0, h] = P V                           (G, Dv)     sdpa's layout (B, 1, H, Dv)
 *   weights, index = the top_k largest of P      (G, top_k)  descending, ties to the lower key (row_topk.c)
 *   sums[b, h] = sum_m weights[m] v[index[m]]    (G, Dv)     when sums is not NULL: the values' neighbour sum
 *
 * gin_decode_threshold_f32 does the first three lines and, instead of the top-k, the published rule's graph shared by
 * the heads: A[b, j] = S [S > threshold], S = sigmoid(alpha (min(1, sum_h P[b, h, j]) - tau)), (B, Lk).
 *
 * tensors: q, k, v, out, weights (B, H, top_k), index (B, H, top_k) int64, sums (B, H, Dv) or NULL; sizes: q's
 * strides (b, h), k's (b, h, l), v's (b, h, l) (last dimensions contiguous), B, H, Hkv, Lk, D, Dv, top_k;
 * scalars: scaling; sizes[15]: threads. One head at a time (a decoded token's layer is some 16,000 multiply-adds a
 * head over 128 keys: products written out, an sgemm call would cost more than its work), the heads split over
 * PyTorch's OpenMP threads from 65,536 multiply-adds a call (parallel.h); each head's results are one thread's, so
 * they do not depend on the thread count. Returns 0, 1 for bad
 * arguments (nothing written) or 2 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "parallel.h"
#include "row_topk.h"
#include "tiles.h"
#include "vectors.h"
#include "weighted_rows.h"

/* s[j] = scaling q . k_j for the `keys` rows of k (stride k_l) */
MULTIVERSION
static void scores_row(const float *restrict q, const float *restrict k, int64_t k_l, int64_t keys, int64_t dim, float scaling, float *restrict s) {
    dot_rows(k, k_l, q, dim, keys, scaling, s);
}

/* out = sum_j w[j] v[at ? at[j] : j] over n rows of v (stride v_l), width dim_v: weighted_rows.h in this file's
   vectorised clones */
MULTIVERSION
static void sum_value_rows(const float *restrict v, int64_t v_l, const float *restrict w, const int64_t *restrict at, int64_t n, int64_t dim_v,
                           float *restrict out) {
    weighted_row(v, v_l, w, at, n, dim_v, out);
}

/* one query head: scores[0, keys) = P = softmax(scaling q K^T) over every key, out (dim_v) = P V */
static void head_attention(const float *q, const float *kb, int64_t k_l, const float *vb, int64_t v_l, int64_t keys, int64_t dim, int64_t dim_v,
                           float scaling, float *scores, float *out) {
    scores_row(q, kb, k_l, keys, dim, scaling, scores);
    tiles_softmax(scores, 1, keys, keys - 1);
    sum_value_rows(vb, v_l, scores, NULL, keys, dim_v, out);
}

/* one call's arguments (the arrays gin_decode_*_f32 take, unpacked) */
typedef struct {
    const float *q, *k, *v;
    float *out, *weights, *sums, *probabilities;
    int64_t *index;
    int64_t q_b, q_h, k_b, k_h, k_l, v_b, v_h, v_l, batch, heads, kv_heads, keys, dim, dim_v, top_k;
    float scaling;
} decode_call;

static decode_call unpack(const void *const *tensors, const int64_t *sizes, const float *scalars) {
    decode_call c = {tensors[0], tensors[1], tensors[2], (float *)tensors[3], NULL, NULL, NULL, NULL,
                     sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7],
                     sizes[8], sizes[9], sizes[10], sizes[11], sizes[12], sizes[13], sizes[14], scalars[0]};
    return c;
}

static int bad_sizes(const decode_call *c) {
    return !c->q || !c->k || !c->v || !c->out || c->batch < 1 || c->kv_heads < 1 || c->heads % c->kv_heads || c->keys < 1 || c->dim < 1
           || c->dim_v < 1;
}

/* head rows [r0, r1) (row = b * H + h): attention output and, with weights, the top-k and the values' sums (p, ci:
   this thread's scratch), else the probabilities kept in c->probabilities */
static void decode_rows(const decode_call *c, int64_t r0, int64_t r1, float *p, int32_t *ci) {
    int64_t groups = c->heads / c->kv_heads;
    for (int64_t row = r0; row < r1; ++row) {
        int64_t b = row / c->heads, h = row % c->heads, kv = h / groups;
        const float *vb = c->v + b * c->v_b + kv * c->v_h;
        float *probabilities = c->weights ? p : c->probabilities + row * c->keys;
        head_attention(c->q + b * c->q_b + h * c->q_h, c->k + b * c->k_b + kv * c->k_h, c->k_l, vb, c->v_l, c->keys, c->dim, c->dim_v, c->scaling,
                       probabilities, c->out + row * c->dim_v);
        if (!c->weights) continue;
        float *w = c->weights + row * c->top_k;
        int64_t *at = c->index + row * c->top_k;
        gin_topk_rows_buffered(p, 1, c->keys, c->keys, (int)c->top_k, w, at, p + c->keys, ci);
        if (c->sums) sum_value_rows(vb, c->v_l, w, at, c->top_k, c->dim_v, c->sums + row * c->dim_v);
    }
}

/* threads for one call: parallel.h's rule on its multiply-adds, the heads split */
static int decode_team(const decode_call *c, int64_t threads) {
    int64_t rows = c->batch * c->heads;
    return thread_count((int)threads, rows, rows * c->keys * (c->dim + c->dim_v));
}

int gin_decode_attention_f32(const void *const *tensors, const int64_t *sizes, const float *scalars) {
    decode_call c = unpack(tensors, sizes, scalars);
    c.weights = (float *)tensors[4];
    c.index = (int64_t *)tensors[5];
    c.sums = (float *)tensors[6];
    if (bad_sizes(&c) || !c.weights || !c.index || c.top_k < 1 || c.top_k > c.keys || c.top_k > ROW_TOPK_MAX_K) return 1;
    int team = decode_team(&c, sizes[15]);
    int64_t scratch = 2 * c.keys + 8;  /* floats a thread: the row's probabilities, then the top-k's candidates */
    float *p = malloc(sizeof(float) * (size_t)(team * scratch));
    int32_t *ci = malloc(sizeof(int32_t) * (size_t)(team * (c.keys + 8)));
    if (!p || !ci) {
        free(p);
        free(ci);
        return 2;
    }
    SPLIT(c.batch * c.heads, team, decode_rows(&c, p0, p1, p + t_ * scratch, ci + t_ * (c.keys + 8)));
    free(p);
    free(ci);
    return 0;
}

/* tensors: q, k, v, out, adjacency (B, Lk); sizes as gin_decode_attention_f32's (top_k unused); scalars: scaling,
   alpha, tau, threshold. adjacency[b, j] = S [S > threshold], S = sigmoid(alpha (min(1, sum_h P[b, h, j]) - tau)):
   every head's P first (split over the threads), then the head sums in head order (the same bits on any count). */
int gin_decode_threshold_f32(const void *const *tensors, const int64_t *sizes, const float *scalars) {
    decode_call c = unpack(tensors, sizes, scalars);
    float *adjacency = (float *)tensors[4], alpha = scalars[1], tau = scalars[2], threshold = scalars[3];
    if (bad_sizes(&c) || !adjacency) return 1;
    int team = decode_team(&c, sizes[15]);
    c.probabilities = malloc(sizeof(float) * (size_t)(c.batch * c.heads * c.keys));
    if (!c.probabilities) return 2;
    SPLIT(c.batch * c.heads, team, decode_rows(&c, p0, p1, NULL, NULL));
    int64_t keys = c.keys;
    for (int64_t b = 0; b < c.batch; ++b) {
        float *summed = adjacency + b * keys;
        const float *pb = c.probabilities + b * c.heads * keys;
        for (int64_t j = 0; j < keys; ++j) summed[j] = pb[j];
        for (int64_t h = 1; h < c.heads; ++h)
            for (int64_t j = 0; j < keys; ++j) summed[j] += pb[h * keys + j];
        for (int64_t j = 0; j < keys; ++j) {
            float w = summed[j] > 1.0f ? 1.0f : summed[j];  /* NaN stays NaN, as torch.clamp keeps it */
            float sharpened = 1.0f / (1.0f + expf(-(alpha * (w - tau))));
            summed[j] = sharpened * (float)(sharpened > threshold);  /* S [S > threshold]: NaN * 0 stays NaN, as ATen's */
        }
    }
    free(c.probabilities);
    return 0;
}
