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
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "vectors.h"

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

/* tensors: x, n, add_to (or NULL), out, eps, W1, b1 (or NULL), W2, b2 (or NULL), slope (or NULL), W_out, b_out (or
 * NULL), w_norm, scale; sizes: x's strides (b, h, l), n's strides (b, h, l; h 0 for one shared graph), batch,
 * length, Hs, heads, F, hidden, d, skip, act, threads; scalars: offset, eps_norm. Arrays, not arguments: the Python side
 * keeps them per block and rewrites only what changes between calls. */
int gin_block_forward_f32(const float *const *tensors, const int64_t *sizes, const float *scalars) {
    const float *x = tensors[0], *n = tensors[1], *add_to = tensors[2], *eps = tensors[4], *w1 = tensors[5], *b1 = tensors[6],
                *w2 = tensors[7], *b2 = tensors[8], *slope = tensors[9], *w_out = tensors[10], *b_out = tensors[11],
                *norm_weight = tensors[12], *scale = tensors[13];
    float *out = (float *)tensors[3];
    int64_t x_b = sizes[0], x_h = sizes[1], x_l = sizes[2], n_b = sizes[3], n_h = sizes[4], n_l = sizes[5], batch = sizes[6],
            length = sizes[7], self_heads = sizes[8], heads = sizes[9], width = sizes[10], hidden = sizes[11], d = sizes[12];
    int skip = (int)sizes[13], act = (int)sizes[14], threads = (int)sizes[15];
    float offset = scalars[0], norm_eps = scalars[1];
    int64_t inputs = heads * width;
    if (!x || !n || !eps || !w1 || !w2 || !w_out || !norm_weight || !scale || !out || batch < 0 || length < 0
        || self_heads < 1 || heads % self_heads || width < 1 || hidden < 1 || d < 1 || act < 0 || act > 4
        || (act == 4 && !slope) || (skip && inputs != hidden))
        return 1;
    float *z = malloc(sizeof(float) * (size_t)(inputs + 2 * hidden));
    if (!z) return 2;
    float *h1 = z + inputs, *h2 = h1 + hidden;
    float c = offset + *eps, a = act == 4 ? *slope : 0.0f, g = *scale;
    int64_t groups = heads / self_heads;
    /* the weights come from memory (decoding streams the whole model between two calls of one layer's block):
       more threads read them faster, each its share of each layer's output rows */
    int team = threads > 1 && (inputs + hidden + d) * hidden >= PARALLEL_BLOCK_MIN ? threads : 1;
    (void)team;  /* without OpenMP: one thread */
#ifdef _OPENMP
#pragma omp parallel num_threads(team) if (team > 1)
#endif
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t l = 0; l < length; ++l) {
#ifdef _OPENMP
#pragma omp single
#endif
            for (int64_t h = 0; h < heads; ++h) {  /* the implicit barrier after `single`: z whole for every thread */
                const float *xr = x + b * x_b + (h / groups) * x_h + l * x_l, *nr = n + b * n_b + h * n_h + l * n_l;
                float *zr = z + h * width;
                for (int64_t f = 0; f < width; ++f) zr[f] = nr[f] + c * xr[f];
            }
            int64_t row = b * length + l;
            float *y = out + row * d;
            dense_shared(w1, b1, NULL, z, inputs, hidden, act, a, h1);
            dense_shared(w2, b2, skip ? z : NULL, h1, hidden, hidden, act, a, h2);
            dense_shared(w_out, b_out, NULL, h2, hidden, d, 0, 0.0f, y);
#ifdef _OPENMP
#pragma omp single
#endif
            scaled_rms_norm(y, add_to ? add_to + row * d : NULL, norm_weight, g, norm_eps, d);
        }
    }
    free(z);
    return 0;
}
