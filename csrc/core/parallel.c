/* parallel.c - the O(mn) passes on the provider's threads (see dm_parallel_for_fn). */
#include "internal.h"

void dmi_parallel_for(const dm_gemm_provider *provider, int64_t n, int64_t grain,
                      dm_parallel_body body, void *arg) {
    if (n <= 0) return;
    if (provider && provider->parallel_for && n > grain)
        provider->parallel_for(provider->ctx, n, grain < 1 ? 1 : grain, body, arg);
    else
        body(arg, 0, n);
}

enum { SUM_CHUNKS_MAX = 64, SUM_BLOCK = 4096 };

typedef struct sum_job {
    dmi_chunk_sum_fn chunk;
    void *arg;
    size_t n, chunk_len;
    double partial[SUM_CHUNKS_MAX];
} sum_job;

static void sum_chunks(void *arg, int64_t begin, int64_t end) {
    sum_job *job = arg;
    for (int64_t c = begin; c < end; ++c) {
        const size_t first = (size_t)c * job->chunk_len;
        const size_t last = job->n - first < job->chunk_len ? job->n : first + job->chunk_len;
        job->partial[c] = job->chunk(job->arg, first, last);
    }
}

double dmi_parallel_sum(const dm_gemm_provider *provider, size_t n, dmi_chunk_sum_fn chunk,
                        void *arg) {
    if (n == 0) return 0.0;
    /* At least a grain per chunk (a chunk is worth a thread), at most SUM_CHUNKS_MAX chunks,
     * whole blocks (the bfloat16 sums are blocked by 4096). */
    size_t len = (n + SUM_CHUNKS_MAX - 1) / SUM_CHUNKS_MAX;
    if (len < (size_t)DMI_PARALLEL_GRAIN) len = (size_t)DMI_PARALLEL_GRAIN;
    len = (len + SUM_BLOCK - 1) / SUM_BLOCK * SUM_BLOCK;
    sum_job job = {.chunk = chunk, .arg = arg, .n = n, .chunk_len = len};
    const int64_t chunks = (int64_t)((n + len - 1) / len);
    dmi_parallel_for(provider, chunks, 1, sum_chunks, &job);
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += job.partial[c];
    return total;
}
