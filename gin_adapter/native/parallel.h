/* Splitting a kernel's work over OpenMP threads, shared by graph_sum.c and score_rows.c.
 *
 * Built with -fopenmp, the library takes the libgomp.so.1 that PyTorch's wheel has already loaded, so the parts
 * run on PyTorch's own OpenMP threads (row_topk.c explains why not per-call POSIX threads). Calls with less
 * than PARALLEL_MIN_WORK units of work stay on the calling thread. Without OpenMP everything does.
 */
#ifndef GIN_ADAPTER_PARALLEL_H
#define GIN_ADAPTER_PARALLEL_H

#include <stdint.h>

#define PARALLEL_MIN_WORK 65536

/* how many threads to split `parts` parts over, at most `threads`, for `work` units of work in all */
static inline int thread_count(int threads, int64_t parts, int64_t work) {
    if (threads < 1 || work < PARALLEL_MIN_WORK) return 1;
    return threads > parts ? (int)(parts > 0 ? parts : 1) : threads;
}

/* run `body` with p0, p1 set to each of `threads` contiguous ranges of [0, parts), one per thread, t_ the range's number */
#ifdef _OPENMP
#define SPLIT(parts, threads, body)                                                           \
    do {                                                                                      \
        int threads_ = (threads);                                                             \
        int64_t per_ = ((parts) + threads_ - 1) / threads_;                                   \
        _Pragma("omp parallel for num_threads(threads_) schedule(static, 1)")                 \
        for (int t_ = 0; t_ < threads_; ++t_) {                                               \
            int64_t p0 = t_ * per_, p1 = p0 + per_ < (parts) ? p0 + per_ : (parts);           \
            if (p0 < p1) body;                                                                \
        }                                                                                     \
    } while (0)
#else
#define SPLIT(parts, threads, body) do { int t_ = 0; int64_t p0 = 0, p1 = (parts); (void)(threads); (void)t_; body; } while (0)
#endif

#endif
