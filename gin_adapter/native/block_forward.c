/* The GIN block's forward for a few token rows in one call, without gradients: gin_adapter's compiled decode step
 * behind gin_adapter/native_block.py (a decoded token runs the block once per layer, and ATen's dozen small calls
 * cost far more than their arithmetic there).
 *
 * For each of the `batch * length` token rows (b, l), with node features of the token itself x (batch, Hs, length, F)
 * and its neighbour sums n (batch, Hn, length, F), Hn = heads or 1 (one graph shared by every head), G = heads / Hs:
 *
 *   z[h F + f] = n[b, h or 0, l, f] + c x[b, h / G, l, f]                 (heads F)   c = offset + eps
 *   h1 = act(W1 z + b1)                                                   (hidden)    W1 (hidden, heads F)
 *   h2 = act(W2 h1 + b2 + [z if skip])                                    (hidden)    W2 (hidden, hidden)
 *   y  = W_out h2 + [b_out]                                               (d)         W_out (d, hidden)
 *   out = [add_to +] y / sqrt(eps_norm + mean_d y^2) * (w_norm * scale)   (d)
 *
 * act: 0 identity, 1 exact GELU x (1 + erf(x / sqrt 2)) / 2, 2 ReLU, 3 SiLU x / (1 + exp(-x)), 4 PReLU with the one
 * slope *slope. skip (the published block) needs heads F == hidden. eps, scale and slope are read through pointers
 * (the parameters' storage: no Python-side conversion per call). The rows of x and n may be strided (a row of the KV
 * cache); every vector's last dimension is contiguous, the weights are contiguous row-major, out (and add_to) are
 * (batch * length, d) contiguous. A decoded token's call holds some 40,000 (default) to 140,000 (the published
 * preset) multiply-adds; from 65,536 each layer's output rows are split over `threads` OpenMP threads (PyTorch's),
 * as its weights come from memory, not cache, while decoding. Each output is one thread's dot product whatever the
 * split: the results do not depend on the thread count. Returns 0, or 1 for bad arguments (nothing written) or 2 when its scratch memory
 * cannot be allocated.
 *
 * gin_decode_update_f32 (at the end) runs a decoded token's whole update with projected node features in one call:
 * the projection into the GIN width written into the feature cache, the neighbour sum over the decode graph, then
 * the block.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "vectors.h"
#include "weighted_rows.h"

/* weights (multiply-adds a token row) from which a block's layers are split over the threads */
#define PARALLEL_BLOCK_MIN 65536

static inline float activate(float v, int act, float slope) {
    switch (act) {
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 2: return v > 0.0f ? v : 0.0f;
    case 3: return v / (1.0f + expf(-v));
    case 4: return v >= 0.0f ? v : slope * v;
    default: return v;
    }
}

/* out[o] = act(W[o] . x + b[o] + skip[o]) for o in [o0, o1); b and skip may be NULL */
MULTIVERSION
static void dense(const float *restrict w, const float *restrict b, const float *restrict skip, const float *restrict x,
                  int64_t inputs, int64_t o0, int64_t o1, int act, float slope, float *restrict out) {
    dot_rows(w + o0 * inputs, inputs, x, inputs, o1 - o0, 1.0f, out + o0);
    for (int64_t o = o0; o < o1; ++o) {
        float v = out[o];
        if (b) v += b[o];
        if (skip) v += skip[o];
        out[o] = activate(v, act, slope);
    }
}

/* dense() over all `outputs`, split in contiguous ranges over the threads of the enclosing parallel region (one
   thread outside one); the barrier at its end makes `out` whole for the next layer */
static void dense_shared(const float *w, const float *b, const float *skip, const float *x, int64_t inputs, int64_t outputs, int act, float slope,
                         float *out) {
#ifdef _OPENMP
    int t = omp_get_thread_num(), team = omp_get_num_threads();
#else
    int t = 0, team = 1;
#endif
    int64_t per = (outputs + team - 1) / team, o0 = t * per, o1 = o0 + per < outputs ? o0 + per : outputs;
    if (o0 < o1) dense(w, b, skip, x, inputs, o0, o1, act, slope, out);
#ifdef _OPENMP
#pragma omp barrier
#endif
}

/* the norm of one row of y, in place: y / sqrt(eps + mean y^2) * (w * scale) [+ add_to] */
MULTIVERSION
static void scaled_rms_norm(float *restrict y, const float *restrict add_to, const float *restrict weight, float scale, float eps, int64_t d) {
    float squares = dot(y, y, d);
    float r = 1.0f / sqrtf(eps + squares / (float)d);
    for (int64_t i = 0; i < d; ++i) {
        float v = y[i] * r * (weight[i] * scale);
        y[i] = add_to ? add_to[i] + v : v;
    }
}

/* one call's arguments, unpacked from the arrays the entry points take (see gin_block_forward_f32) */
typedef struct {
    const float *x, *n, *add_to, *eps, *w1, *b1, *w2, *b2, *slope, *w_out, *b_out, *norm_weight, *scale;
    float *out;
    int64_t x_b, x_h, x_l, n_b, n_h, n_l, batch, length, self_heads, heads, width, hidden, d;
    int skip, act, threads;
    float offset, norm_eps;
} block_call;

static block_call unpack_block(const float *const *tensors, const int64_t *sizes, const float *scalars) {
    block_call c = {tensors[0], tensors[1], tensors[2], tensors[4], tensors[5], tensors[6], tensors[7], tensors[8], tensors[9],
                    tensors[10], tensors[11], tensors[12], tensors[13], (float *)tensors[3],
                    sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7], sizes[8], sizes[9], sizes[10],
                    sizes[11], sizes[12], (int)sizes[13], (int)sizes[14], (int)sizes[15], scalars[0], scalars[1]};
    return c;
}

static int bad_block(const block_call *c) {
    return !c->eps || !c->w1 || !c->w2 || !c->w_out || !c->norm_weight || !c->scale || !c->out || c->batch < 0 || c->length < 0
           || c->self_heads < 1 || c->heads % c->self_heads || c->width < 1 || c->hidden < 1 || c->d < 1 || c->act < 0 || c->act > 4
           || (c->act == 4 && !c->slope) || (c->skip && c->heads * c->width != c->hidden);
}

/* the weights come from memory (decoding streams the whole model between two calls of one layer's block): more
   threads read them faster, each its share of each layer's output rows */
static int block_team(const block_call *c, int64_t extra_weights) {
    int64_t weights = (c->heads * c->width + c->hidden + c->d) * c->hidden + extra_weights;
    return c->threads > 1 && weights >= PARALLEL_BLOCK_MIN ? c->threads : 1;
}

/* z (heads F, whole) -> y = out row `row` (d): the MLP, the output map and the norm [+ add_to's row]; every thread
   of the enclosing parallel region calls it (h1, h2: shared scratch of `hidden` floats each) */
static void block_rest(const block_call *c, const float *z, float *h1, float *h2, int64_t row) {
    float a = c->act == 4 ? *c->slope : 0.0f;
    float *y = c->out + row * c->d;
    dense_shared(c->w1, c->b1, NULL, z, c->heads * c->width, c->hidden, c->act, a, h1);
    dense_shared(c->w2, c->b2, c->skip ? z : NULL, h1, c->hidden, c->hidden, c->act, a, h2);
    dense_shared(c->w_out, c->b_out, NULL, h2, c->hidden, c->d, 0, 0.0f, y);
#ifdef _OPENMP
#pragma omp single
#endif
    scaled_rms_norm(y, c->add_to ? c->add_to + row * c->d : NULL, c->norm_weight, *c->scale, c->norm_eps, c->d);
}

/* z[h F + f] = n[h n_h + f] + c x[(h / G) x_h + f] over the heads, G = heads / Hs (n_h 0: one neighbour sum for
   every head) */
static void gin_input_row(const block_call *c, const float *x, int64_t x_h, const float *n, int64_t n_h, float *z) {
    float weight = c->offset + *c->eps;
    int64_t groups = c->heads / c->self_heads;
    for (int64_t h = 0; h < c->heads; ++h) {
        const float *xr = x + (h / groups) * x_h, *nr = n + h * n_h;
        float *zr = z + h * c->width;
        for (int64_t f = 0; f < c->width; ++f) zr[f] = nr[f] + weight * xr[f];
    }
}

/* tensors: x, n, add_to (or NULL), out, eps, W1, b1 (or NULL), W2, b2 (or NULL), slope (or NULL), W_out, b_out (or
 * NULL), w_norm, scale; sizes: x's strides (b, h, l), n's strides (b, h, l; h 0 for one shared graph), batch,
 * length, Hs, heads, F, hidden, d, skip, act, threads; scalars: offset, eps_norm. Arrays, not arguments: the Python side
 * keeps them per block and rewrites only what changes between calls. */
int gin_block_forward_f32(const float *const *tensors, const int64_t *sizes, const float *scalars) {
    block_call c = unpack_block(tensors, sizes, scalars);
    if (!c.x || !c.n || bad_block(&c)) return 1;
    float *z = malloc(sizeof(float) * (size_t)(c.heads * c.width + 2 * c.hidden));
    if (!z) return 2;
    float *h1 = z + c.heads * c.width, *h2 = h1 + c.hidden;
    int team = block_team(&c, 0);
    (void)team;  /* without OpenMP: one thread */
#ifdef _OPENMP
#pragma omp parallel num_threads(team) if (team > 1)
#endif
    for (int64_t b = 0; b < c.batch; ++b) {
        for (int64_t l = 0; l < c.length; ++l) {
#ifdef _OPENMP
#pragma omp single
#endif
            gin_input_row(&c, c.x + b * c.x_b + l * c.x_l, c.x_h, c.n + b * c.n_b + l * c.n_l, c.n_h, z);  /* single's barrier: z whole */
            block_rest(&c, z, h1, h2, b * c.length + l);
        }
    }
    free(z);
    return 0;
}

/* n_h = sum_m w[m] rows[at ? at[m] : m] for each graph head h: weighted_rows.h in this file's vectorised clones */
MULTIVERSION
static void graph_rows_sum(const float *restrict rows, int64_t stride, const float *restrict w, const int64_t *restrict at, int64_t entries,
                           int64_t width, float *restrict out) {
    weighted_row(rows, stride, w, at, entries, width, out);
}

/* One decoded token's whole adapter update with projected node features (node_features "hidden" or "input"), for
 * each batch row b:
 *
 *   u = u0[b] (+ u1[b])                                      (d_in)   the decoder layer's input + attention output, or
 *                                                                     the attention's input
 *   x = W_in u + b_in, written to the feature cache's new row (F)
 *   n_h = sum_m w[b, h, m] X[b, at[b, h, m] or m]            (F)      over the graph's rows X (the new one among them)
 *   out[b] = block(x, n) as gin_block_forward_f32 (+ add_to[b])
 *
 * tensors: the block's 14 (x: the new feature row of batch 0, written here; n unused) then u0, u1 (or NULL), W_in,
 * b_in (or NULL), X (the graph's first feature row, batch 0), w, at (int64, or NULL: entry m is row m); sizes: the
 * block's 16 (x_b: the feature rows' batch stride; length 1; Hs 1), then u0's and u1's batch strides, X's batch and
 * row strides, w's batch and head strides (0: one graph for every head; at has w's layout), entries per graph row,
 * d_in. Returns 0, 1 for bad arguments (nothing written), 2 without scratch memory. */
int gin_decode_update_f32(const void *const *tensors, const int64_t *sizes, const float *scalars) {
    block_call c = unpack_block((const float *const *)tensors, sizes, scalars);
    const float *u0 = tensors[14], *u1 = tensors[15], *w_in = tensors[16], *b_in = tensors[17], *rows = tensors[18], *gw = tensors[19];
    const int64_t *at = tensors[20];
    int64_t u0_b = sizes[16], u1_b = sizes[17], r_b = sizes[18], r_l = sizes[19], g_b = sizes[20], g_h = sizes[21], entries = sizes[22],
            d_in = sizes[23];
    float *x = (float *)tensors[0];
    if (!x || !u0 || !w_in || !rows || !gw || bad_block(&c) || c.length != 1 || c.self_heads != 1 || entries < 0 || d_in < 1) return 1;
    size_t scratch = (size_t)(c.heads * c.width + 2 * c.hidden + c.heads * c.width + d_in);
    float *z = malloc(sizeof(float) * scratch);
    if (!z) return 2;
    float *h1 = z + c.heads * c.width, *h2 = h1 + c.hidden, *n = h2 + c.hidden, *u = n + c.heads * c.width;
    int64_t graph_heads = g_h ? c.heads : 1;
    int team = block_team(&c, d_in * c.width);
    (void)team;
#ifdef _OPENMP
#pragma omp parallel num_threads(team) if (team > 1)
#endif
    for (int64_t b = 0; b < c.batch; ++b) {
        float *xb = x + b * c.x_b;
#ifdef _OPENMP
#pragma omp single
#endif
        for (int64_t i = 0; i < d_in; ++i) u[i] = u1 ? u0[b * u0_b + i] + u1[b * u1_b + i] : u0[b * u0_b + i];
        dense_shared(w_in, b_in, NULL, u, d_in, c.width, 0, 0.0f, xb);  /* its barrier: the new row whole */
#ifdef _OPENMP
#pragma omp single
#endif
        {
            for (int64_t h = 0; h < graph_heads; ++h)
                graph_rows_sum(rows + b * r_b, r_l, gw + b * g_b + h * g_h, at ? at + b * g_b + h * g_h : NULL, entries, c.width, n + h * c.width);
            gin_input_row(&c, xb, 0, n, graph_heads > 1 ? c.width : 0, z);
        }
        block_rest(&c, z, h1, h2, b);
    }
    free(z);
    return 0;
}
