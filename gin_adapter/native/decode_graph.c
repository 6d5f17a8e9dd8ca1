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
 * scalars: scaling. One thread, one head at a time (a decoded token's layer is some 10,000 multiply-adds a head
 * over 128 keys: products written out, an sgemm call would cost more than its work). Returns 0, 1 for bad
 * arguments (nothing written) or 2 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "row_topk.h"
#include "tiles.h"
#include "vectors.h"
#include "weighted_rows.h"

/* s[j] = scaling q . k_j for the `keys` rows of k (stride k_l): 16-float products, summed at the end of each row */
MULTIVERSION
static void scores_row(const float *restrict q, const float *restrict k, int64_t k_l, int64_t keys, int64_t dim, float scaling, float *restrict s) {
    int64_t body = dim - dim % LANES;
    for (int64_t j = 0; j < keys; ++j) {
        const float *kr = k + j * k_l;
        vf acc = {0};
        for (int64_t d = 0; d < body; d += LANES) acc += load(q + d) * load(kr + d);
        float dot = lane_sum(acc);
        for (int64_t d = body; d < dim; ++d) dot += q[d] * kr[d];
        s[j] = scaling * dot;
    }
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

int gin_decode_attention_f32(const void *const *tensors, const int64_t *sizes, const float *scalars) {
    const float *q = tensors[0], *k = tensors[1], *v = tensors[2];
    float *out = (float *)tensors[3], *weights = (float *)tensors[4], *sums = (float *)tensors[6];
    int64_t *index = (int64_t *)tensors[5];
    int64_t q_b = sizes[0], q_h = sizes[1], k_b = sizes[2], k_h = sizes[3], k_l = sizes[4], v_b = sizes[5], v_h = sizes[6], v_l = sizes[7];
    int64_t batch = sizes[8], heads = sizes[9], kv_heads = sizes[10], keys = sizes[11], dim = sizes[12], dim_v = sizes[13], top_k = sizes[14];
    float scaling = scalars[0];
    if (!q || !k || !v || !out || !weights || !index || batch < 1 || kv_heads < 1 || heads % kv_heads || keys < 1 || dim < 1 || dim_v < 1
        || top_k < 1 || top_k > keys || top_k > ROW_TOPK_MAX_K)
        return 1;
    int64_t groups = heads / kv_heads;
    float *scores = malloc(sizeof(float) * (size_t)(2 * keys + 8));
    int32_t *picked = malloc(sizeof(int32_t) * (size_t)(keys + 8));
    if (!scores || !picked) {
        free(scores);
        free(picked);
        return 2;
    }
    float *candidates = scores + keys;
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t h = 0; h < heads; ++h) {
            int64_t row = b * heads + h, kv = h / groups;
            const float *vb = v + b * v_b + kv * v_h;
            head_attention(q + b * q_b + h * q_h, k + b * k_b + kv * k_h, k_l, vb, v_l, keys, dim, dim_v, scaling, scores, out + row * dim_v);
            gin_topk_rows_buffered(scores, 1, keys, keys, (int)top_k, weights + row * top_k, index + row * top_k, candidates, picked);
            if (sums) sum_value_rows(vb, v_l, weights + row * top_k, index + row * top_k, top_k, dim_v, sums + row * dim_v);
        }
    }
    free(scores);
    free(picked);
    return 0;
}

/* tensors: q, k, v, out, adjacency (B, Lk); sizes as gin_decode_attention_f32's first 14; scalars: scaling, alpha,
   tau, threshold. adjacency[b, j] = S [S > threshold], S = sigmoid(alpha (min(1, sum_h P[b, h, j]) - tau)). */
int gin_decode_threshold_f32(const void *const *tensors, const int64_t *sizes, const float *scalars) {
    const float *q = tensors[0], *k = tensors[1], *v = tensors[2];
    float *out = (float *)tensors[3], *adjacency = (float *)tensors[4];
    int64_t q_b = sizes[0], q_h = sizes[1], k_b = sizes[2], k_h = sizes[3], k_l = sizes[4], v_b = sizes[5], v_h = sizes[6], v_l = sizes[7];
    int64_t batch = sizes[8], heads = sizes[9], kv_heads = sizes[10], keys = sizes[11], dim = sizes[12], dim_v = sizes[13];
    float scaling = scalars[0], alpha = scalars[1], tau = scalars[2], threshold = scalars[3];
    if (!q || !k || !v || !out || !adjacency || batch < 1 || kv_heads < 1 || heads % kv_heads || keys < 1 || dim < 1 || dim_v < 1)
        return 1;
    int64_t groups = heads / kv_heads;
    float *scores = malloc(sizeof(float) * (size_t)keys);
    if (!scores) return 2;
    for (int64_t b = 0; b < batch; ++b) {
        float *summed = adjacency + b * keys;
        for (int64_t j = 0; j < keys; ++j) summed[j] = 0.0f;
        for (int64_t h = 0; h < heads; ++h) {
            int64_t kv = h / groups;
            head_attention(q + b * q_b + h * q_h, k + b * k_b + kv * k_h, k_l, v + b * v_b + kv * v_h, v_l, keys, dim, dim_v, scaling, scores,
                           out + (b * heads + h) * dim_v);
            for (int64_t j = 0; j < keys; ++j) summed[j] += scores[j];
        }
        for (int64_t j = 0; j < keys; ++j) {
            float w = summed[j] < 1.0f ? summed[j] : 1.0f;
            float sharpened = 1.0f / (1.0f + expf(-(alpha * (w - tau))));
            summed[j] = sharpened > threshold ? sharpened : 0.0f;
        }
    }
    free(scores);
    return 0;
}
