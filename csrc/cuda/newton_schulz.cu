/* newton_schulz.cu - the Newton-Schulz iterations of the spectral sharp operator on the device.
 *
 * Each step maps X (p x q, p <= q, already divided by its norm) to X' in torch.optim.Muon's order
 * of operations (the bfloat16 iterates then round where torch's do; for float32/float64 the
 * order does not matter beyond rounding):
 *     A = X X^T;   P = c A A + b A   (C_in = A);   X' = P X + a X   (C_in = X)
 * three products, 4 p^2 q + 2 p^3 flops, on one of two routes chosen once per call so that all
 * products of a call see the same kind of A:
 *   - batched (p <= tuning->batched_max_p, or no provider): gemm_batched.cu, one launch per
 *     product for the whole batch; A and P are computed by upper-triangle tiles and are exactly
 *     symmetric, so A A is taken as A A^T (both operands read along rows).
 *   - provider (cuBLAS through ATen in the torch shim): plain products, except that for
 *     p >= tuning->symmetric_min_p the two symmetric ones are split into 2x2 blocks: the
 *     diagonal blocks and the upper block are three provider calls of (p/2)^2 k each (3/4 of
 *     the flops of the full product), and the lower block is mirrored by a transpose kernel
 *     (O(p^2) bytes, negligible next to O(p^2 q) flops at these sizes). Then A is exactly
 *     symmetric and A A = A A^T is split the same way. Only two blocks: finer splits save
 *     little more (k blocks: (k+1)/2k of the flops) and give cuBLAS smaller, slower products.
 */
#include "common.cuh"

namespace {

/* C[i][j] = C[j][i] for h <= i < p, j < h (the lower-left block from the upper-right one), per
 * matrix; 32x32 tiles through shared memory so that reads and writes are both coalesced. */
template <typename T>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_mirror_kernel(T *c, int64_t p, int64_t h, int64_t stride, int64_t batch) {
    __shared__ T tile[DMI_CUDA_TILE][DMI_CUDA_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t rows = p - h, tiles_c = dmi_cuda_ceil_div(h, DMI_CUDA_TILE);
    const int64_t r0 = (blockIdx.x / tiles_c) * DMI_CUDA_TILE; /* within the lower block */
    const int64_t c0 = (blockIdx.x % tiles_c) * DMI_CUDA_TILE;
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
        T *m = c + b * stride;
        /* tile[a][e] = C[c0 + a][h + r0 + e]: rows of the upper-right block, read along rows. */
#pragma unroll
        for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
            const int64_t src_row = c0 + ty + DMI_CUDA_TILE_ROWS * k, src_col = r0 + tx;
            if (src_row < h && src_col < rows)
                tile[ty + DMI_CUDA_TILE_ROWS * k][tx] = m[src_row * p + h + src_col];
        }
        __syncthreads();
        /* C[h + r0 + a][c0 + e] = C[c0 + e][h + r0 + a] = tile[e][a]. */
#pragma unroll
        for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
            const int64_t dst_row = r0 + ty + DMI_CUDA_TILE_ROWS * k, dst_col = c0 + tx;
            if (dst_row < rows && dst_col < h)
                m[(h + dst_row) * p + dst_col] = tile[tx][ty + DMI_CUDA_TILE_ROWS * k];
        }
        __syncthreads(); /* before the next matrix overwrites the tile */
    }
}

template <typename T>
dm_status dmi_cuda_mirror(void *c, int64_t p, int64_t h, int64_t stride, int64_t batch,
                          cudaStream_t stream) {
    const int64_t tiles =
        dmi_cuda_ceil_div(p - h, DMI_CUDA_TILE) * dmi_cuda_ceil_div(h, DMI_CUDA_TILE);
    if (tiles == 0 || batch == 0) return DM_OK;
    if (tiles > (int64_t)INT32_MAX) return DM_ERR_SHAPE;
    const dim3 grid((unsigned)tiles, (unsigned)dmi_cuda_min64(batch, DMI_CUDA_MAX_GRID_Y), 1);
    dmi_cuda_mirror_kernel<T><<<grid, dim3(DMI_CUDA_TILE, DMI_CUDA_TILE_ROWS, 1), 0, stream>>>(
        (T *)c, p, h, stride, batch);
    DMI_CUDA_LAUNCHED();
    return DM_OK;
}

dm_status dmi_cuda_mirror_typed(dm_dtype dtype, void *c, int64_t p, int64_t h, int64_t stride,
                                int64_t batch, cudaStream_t stream) {
    switch (dtype) {
    case DM_FLOAT32: return dmi_cuda_mirror<float>(c, p, h, stride, batch, stream);
    case DM_FLOAT64: return dmi_cuda_mirror<double>(c, p, h, stride, batch, stream);
    case DM_BFLOAT16: return dmi_cuda_mirror<__nv_bfloat16>(c, p, h, stride, batch, stream);
    }
    return DM_ERR_DTYPE;
}

/* The split point of a symmetric product: half, rounded up to a multiple of 64 so that the
 * blocks keep cuBLAS's tile alignment, and plain half where that leaves no lower block. */
int64_t dmi_cuda_split_point(int64_t p) {
    int64_t h = (p / 2 + 63) / 64 * 64;
    if (h >= p) h = p / 2;
    return h;
}

/* C = alpha X X^T + beta Cin for batch p x p results (ldc p, stride_c), X p x k with leading
 * dimension k (stride_x); split: by blocks, then mirrored (see the file's comment). */
dm_status dmi_cuda_provider_gram(const dm_gemm_provider *gemm, dm_dtype dtype, int64_t batch,
                                 int64_t p, int64_t k, double alpha, const void *x,
                                 int64_t stride_x, double beta, const void *c_in, void *c,
                                 int64_t stride_c, int split, cudaStream_t stream) {
    if (!split) {
        return gemm->gemm(gemm->ctx, dtype, 0, 1, batch, p, p, k, alpha, x, k, stride_x, x, k,
                          stride_x, beta, c_in, c, p, stride_c) == DM_OK
                   ? DM_OK
                   : DM_ERR_GEMM;
    }
    const size_t elem = dmi_dtype_size(dtype);
    const int64_t h = dmi_cuda_split_point(p);
    const int64_t start[2] = {0, h}, size[2] = {h, p - h};
    const int blocks[3][2] = {{0, 0}, {1, 1}, {0, 1}};
    for (int n = 0; n < 3; ++n) {
        const int I = blocks[n][0], J = blocks[n][1];
        const unsigned char *xi = (const unsigned char *)x + (size_t)(start[I] * k) * elem;
        const unsigned char *xj = (const unsigned char *)x + (size_t)(start[J] * k) * elem;
        const size_t offset = (size_t)(start[I] * p + start[J]) * elem;
        const void *cin = beta != 0.0 ? (const unsigned char *)c_in + offset : NULL;
        if (gemm->gemm(gemm->ctx, dtype, 0, 1, batch, size[I], size[J], k, alpha, xi, k, stride_x,
                       xj, k, stride_x, beta, cin, (unsigned char *)c + offset, p,
                       stride_c) != DM_OK)
            return DM_ERR_GEMM;
    }
    return dmi_cuda_mirror_typed(dtype, c, p, h, stride_c, batch, stream);
}

} // namespace

dm_status dmi_cuda_ns_iterate(const dm_sharp_config *config, dm_dtype iteration, int64_t batch,
                              int64_t p, int64_t q, void *scratch, void **result,
                              const dm_gemm_provider *gemm, const dm_cuda_tuning *tuning,
                              cudaStream_t stream) {
    const size_t elem = dmi_dtype_size(iteration);
    const int64_t pq = p * q, pp = p * p;
    unsigned char *x = (unsigned char *)scratch;
    unsigned char *x_next = x + dmi_cuda_align_up((size_t)(batch * pq) * elem);
    unsigned char *a_mat = x_next + dmi_cuda_align_up((size_t)(batch * pq) * elem);
    unsigned char *p_mat = a_mat + dmi_cuda_align_up((size_t)(batch * pp) * elem);
    const int has_provider = gemm != NULL && gemm->gemm != NULL;
    const int batched = !has_provider || p <= tuning->batched_max_p;
    const int split =
        !batched && tuning->symmetric_min_p > 0 && p >= tuning->symmetric_min_p && p >= 2;

    for (int64_t j = 0; j < config->ns_steps && batch > 0 && p > 0; ++j) {
        const double a = config->ns_coefficients[3 * j];
        const double b = config->ns_coefficients[3 * j + 1];
        const double c = config->ns_coefficients[3 * j + 2];
        if (batched) {
            const dmi_cuda_gemm_args gram = {1, 1,  batch, p, p,  q,    1.0,   0.0, x,
                                             q, pq, x,     q, pq, NULL, a_mat, p,   pp};
            const dmi_cuda_gemm_args poly = {1, 1,  batch, p, p,  p,     c,     b, a_mat,
                                             p, pp, a_mat, p, pp, a_mat, p_mat, p, pp};
            const dmi_cuda_gemm_args next = {0, 0,  batch, p, q,  p, 1.0,    a, p_mat,
                                             p, pp, x,     q, pq, x, x_next, q, pq};
            DMI_RETURN_IF_ERROR(dmi_cuda_gemm_batched(iteration, &gram, stream));
            DMI_RETURN_IF_ERROR(dmi_cuda_gemm_batched(iteration, &poly, stream));
            DMI_RETURN_IF_ERROR(dmi_cuda_gemm_batched(iteration, &next, stream));
        } else {
            DMI_RETURN_IF_ERROR(dmi_cuda_provider_gram(gemm, iteration, batch, p, q, 1.0, x, pq,
                                                       0.0, NULL, a_mat, pp, split, stream));
            if (split) {
                DMI_RETURN_IF_ERROR(dmi_cuda_provider_gram(gemm, iteration, batch, p, p, c, a_mat,
                                                           pp, b, a_mat, p_mat, pp, 1, stream));
            } else if (gemm->gemm(gemm->ctx, iteration, 0, 0, batch, p, p, p, c, a_mat, p, pp,
                                  a_mat, p, pp, b, a_mat, p_mat, p, pp) != DM_OK) {
                return DM_ERR_GEMM;
            }
            if (gemm->gemm(gemm->ctx, iteration, 0, 0, batch, p, q, p, 1.0, p_mat, p, pp, x, q, pq,
                           a, x, x_next, q, pq) != DM_OK)
                return DM_ERR_GEMM;
        }
        unsigned char *t = x;
        x = x_next;
        x_next = t;
    }
    *result = x;
    return DM_OK;
}
