/* pipeline.cu - the pieces every CUDA call shares (see common.cuh): the workspace layout, the
 * init pass (flags and hyperparameters), the fixed-order sum of partials, and the synchronous
 * ending. */
#include "common.cuh"

dm_status dm_cuda_ws_add(size_t *total, size_t *offset, size_t count, size_t elem) {
    size_t bytes;
    if (dm_mul_overflows(count, elem, &bytes)) return DM_ERR_SHAPE;
    if (bytes > SIZE_MAX - DM_CUDA_ALIGN || *total > SIZE_MAX - dm_cuda_align_up(bytes))
        return DM_ERR_SHAPE;
    *offset = *total;
    *total += dm_cuda_align_up(bytes);
    return DM_OK;
}

dm_status dm_cuda_ns_scratch_bytes(int64_t batch, int64_t p, int64_t q, size_t elem,
                                   size_t *bytes) {
    size_t pq, pp, offset, total = 0;
    if (dm_mul_overflows((size_t)p, (size_t)q, &pq) || dm_mul_overflows(pq, (size_t)batch, &pq))
        return DM_ERR_SHAPE;
    if (dm_mul_overflows((size_t)p, (size_t)p, &pp) || dm_mul_overflows(pp, (size_t)batch, &pp))
        return DM_ERR_SHAPE;
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &offset, pq, elem));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &offset, pq, elem));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &offset, pp, elem));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &offset, pp, elem));
    *bytes = total;
    return DM_OK;
}

dm_status dm_cuda_plan(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                       int64_t cols, dm_cuda_layout *layout) {
    dm_cuda_layout L;
    memset(&L, 0, sizeof L);
    L.norm = config->norm;
    L.dtype = dtype;
    L.iteration = dm_ns_iteration_dtype(config, dtype);
    L.batch = batch;
    L.rows = rows;
    L.cols = cols;
    /* Newton-Schulz runs on the wide orientation: its cost is 4 p^2 q + 2 p^3 with p <= q. */
    L.transposed = config->norm == DM_NORM_SPECTRAL && rows > cols;
    L.p = L.transposed ? cols : rows;
    L.q = L.transposed ? rows : cols;
    L.tiles_r = dm_cuda_ceil_div(rows, DM_CUDA_TILE);
    L.tiles_c = dm_cuda_ceil_div(cols, DM_CUDA_TILE);
    L.tiles = L.tiles_r * L.tiles_c;
    switch (config->norm) {
    case DM_NORM_ROW:
        L.group = DM_CUDA_GROUP_ROW;
        L.groups = rows;
        L.parts = L.tiles_c;
        break;
    case DM_NORM_COLUMN:
        L.group = DM_CUDA_GROUP_COLUMN;
        L.groups = cols;
        L.parts = L.tiles_r;
        break;
    default:
        L.group = DM_CUDA_GROUP_MATRIX;
        L.groups = 1;
        L.parts = L.tiles;
        break;
    }
    const int spectral = config->norm == DM_NORM_SPECTRAL;
    const int per_group_duals = L.group != DM_CUDA_GROUP_MATRIX;
    size_t groups, partials, tiles, total = 0;
    if (dm_mul_overflows((size_t)batch, (size_t)L.groups, &groups) ||
        dm_mul_overflows(groups, (size_t)L.parts, &partials) ||
        dm_mul_overflows((size_t)batch, (size_t)L.tiles, &tiles))
        return DM_ERR_SHAPE;
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &L.header, 1, sizeof(dm_cuda_header)));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &L.partials, partials, sizeof(dm_cuda_partial)));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &L.scale, groups, sizeof(double)));
    DM_RETURN_IF_ERROR(
        dm_cuda_ws_add(&total, &L.group_duals, per_group_duals ? groups : 0, sizeof(double)));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &L.duals, (size_t)batch, sizeof(double)));
    DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &L.dual_parts, spectral ? tiles : 0, sizeof(double)));
    if (spectral) {
        size_t scratch;
        DM_RETURN_IF_ERROR(
            dm_cuda_ns_scratch_bytes(batch, L.p, L.q, dm_dtype_size(L.iteration), &scratch));
        DM_RETURN_IF_ERROR(dm_cuda_ws_add(&total, &L.scratch, scratch, 1));
    }
    L.total = total;
    *layout = L;
    return DM_OK;
}

int64_t dm_cuda_chunks(int64_t batch) {
    return dm_cuda_ceil_div(batch, DM_CUDA_TENSORS_PER_LAUNCH);
}

dm_cuda_pass dm_cuda_chunk(const dm_cuda_layout *layout, int64_t chunk) {
    dm_cuda_pass pass;
    pass.rows = layout->rows;
    pass.cols = layout->cols;
    pass.tiles_r = layout->tiles_r;
    pass.tiles_c = layout->tiles_c;
    pass.first = chunk * DM_CUDA_TENSORS_PER_LAUNCH;
    pass.count = (int)dm_cuda_min64(DM_CUDA_TENSORS_PER_LAUNCH, layout->batch - pass.first);
    pass.transposed = layout->transposed;
    return pass;
}

dm_cuda_norm_params dm_cuda_norm_constants(const dm_sharp_config *config,
                                           const dm_cuda_layout *layout) {
    dm_cuda_norm_params np;
    const int spectral = config->norm == DM_NORM_SPECTRAL;
    np.mode = config->norm == DM_NORM_SIGN                   ? DM_CUDA_ABS
              : spectral && layout->iteration == DM_BFLOAT16 ? DM_CUDA_SQUARES_BF16
                                                             : DM_CUDA_SQUARES;
    np.spectral = spectral;
    np.float64 = layout->dtype == DM_FLOAT64;
    np.norm_scale = spectral ? config->norm_scale : 1.0;
    np.norm_offset = spectral ? config->norm_offset : 0.0;
    np.eps = config->eps;
    return np;
}

int dm_cuda_multiprocessors(void) {
    int device = 0, count = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        return 0;
    return count;
}

dm_status dm_cuda_require_not_capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    DM_CUDA_TRY(cudaStreamIsCapturing(stream, &capture));
    return capture == cudaStreamCaptureStatusNone ? DM_OK : DM_ERR_INVALID_ARG;
}

/* update.c's check_update_config for the five values that may come from the device. */
__device__ static bool dm_cuda_hyper_valid(const dm_cuda_update_hyperparameters &h, int adaptive) {
    if (!isfinite(h.lr) || h.lr < 0.0) return false;
    if (!isfinite(h.weight_decay) || h.weight_decay < 0.0) return false;
    if (!(h.momentum >= 0.0 && h.momentum <= 1.0)) return false;
    if (adaptive) {
        const double l0 = h.radius_l0, l1 = h.radius_l1;
        if (!isfinite(l0) || !isfinite(l1) || l0 < 0.0 || l1 < 0.0 || !(l0 + l1 > 0.0))
            return false;
    }
    return true;
}

__global__ void dm_cuda_init_kernel(dm_cuda_header *header,
                                    const dm_cuda_update_hyperparameters *device_values,
                                    const dm_cuda_update_hyperparameters values, int check,
                                    int adaptive) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const dm_cuda_update_hyperparameters h = device_values ? *device_values : values;
    header->hyper = h;
    header->decay = __dsub_rn(1.0, __dmul_rn(h.lr, h.weight_decay));
    header->flags = check && !dm_cuda_hyper_valid(h, adaptive) ? DM_CUDA_FLAG_INVALID : 0u;
}

dm_status dm_cuda_launch_init(dm_cuda_header *header,
                              const dm_cuda_update_hyperparameters *device_values,
                              dm_cuda_update_hyperparameters values, int check, int adaptive,
                              cudaStream_t stream) {
    dm_cuda_init_kernel<<<1, 32, 0, stream>>>(header, device_values, values, check, adaptive);
    DM_CUDA_LAUNCHED();
    return DM_OK;
}

/* A warp per group, lanes striding over its parts, then the butterfly: a fixed order. */
__global__ void __launch_bounds__(DM_CUDA_BLOCK)
    dm_cuda_sum_parts_kernel(const double *parts, int64_t per_group, int64_t groups, double *out) {
    const int lane = threadIdx.x & 31;
    const int64_t group = ((int64_t)blockIdx.x * DM_CUDA_BLOCK + threadIdx.x) >> 5;
    if (group >= groups) return; /* the whole warp leaves together */
    const double *p = parts + group * per_group;
    double sum = 0.0;
    for (int64_t k = lane; k < per_group; k += 32) sum += p[k];
    sum = dm_cuda_warp_sum(sum);
    if (lane == 0) out[group] = sum;
}

dm_status dm_cuda_launch_sum_parts(const double *parts, int64_t per_group, int64_t groups,
                                   double *out, cudaStream_t stream) {
    if (groups <= 0) return DM_OK;
    const int64_t blocks = dm_cuda_ceil_div(groups, DM_CUDA_WARPS);
    dm_cuda_sum_parts_kernel<<<(unsigned)blocks, DM_CUDA_BLOCK, 0, stream>>>(parts, per_group,
                                                                             groups, out);
    DM_CUDA_LAUNCHED();
    return DM_OK;
}

dm_status dm_cuda_wait_for_status(const dm_cuda_header *header, cudaStream_t stream) {
    unsigned flags = 0;
    DM_CUDA_TRY(
        cudaMemcpyAsync(&flags, &header->flags, sizeof flags, cudaMemcpyDeviceToHost, stream));
    DM_CUDA_TRY(cudaStreamSynchronize(stream));
    return (dm_status)dm_cuda_flag_status(flags);
}
