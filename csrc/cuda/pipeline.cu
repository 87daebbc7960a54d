/* pipeline.cu - the pieces every CUDA call shares (see common.cuh): the workspace layout, the
 * init pass (flags and hyperparameters), the fixed-order sum of partials, and the synchronous
 * ending. */
#include "common.cuh"

dm_status dmi_cuda_ws_add(size_t *total, size_t *offset, size_t count, size_t elem) {
    size_t bytes;
    if (dmi_mul_overflows(count, elem, &bytes)) return DM_ERR_SHAPE;
    if (bytes > SIZE_MAX - DMI_CUDA_ALIGN || *total > SIZE_MAX - dmi_cuda_align_up(bytes))
        return DM_ERR_SHAPE;
    *offset = *total;
    *total += dmi_cuda_align_up(bytes);
    return DM_OK;
}

dm_status dmi_cuda_ns_scratch_bytes(int64_t batch, int64_t p, int64_t q, size_t elem,
                                    size_t *bytes) {
    size_t pq, pp, offset, total = 0;
    if (dmi_mul_overflows((size_t)p, (size_t)q, &pq) || dmi_mul_overflows(pq, (size_t)batch, &pq))
        return DM_ERR_SHAPE;
    if (dmi_mul_overflows((size_t)p, (size_t)p, &pp) || dmi_mul_overflows(pp, (size_t)batch, &pp))
        return DM_ERR_SHAPE;
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &offset, pq, elem));
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &offset, pq, elem));
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &offset, pp, elem));
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &offset, pp, elem));
    *bytes = total;
    return DM_OK;
}

dm_status dmi_cuda_plan(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                        int64_t cols, dmi_cuda_layout *layout) {
    dmi_cuda_layout L;
    memset(&L, 0, sizeof L);
    L.norm = config->norm;
    L.dtype = dtype;
    L.iteration = dmi_ns_iteration_dtype(config, dtype);
    L.batch = batch;
    L.rows = rows;
    L.cols = cols;
    /* Newton-Schulz runs on the wide orientation: its cost is 4 p^2 q + 2 p^3 with p <= q. */
    L.transposed = config->norm == DM_NORM_SPECTRAL && rows > cols;
    L.p = L.transposed ? cols : rows;
    L.q = L.transposed ? rows : cols;
    L.tiles_r = dmi_cuda_ceil_div(rows, DMI_CUDA_TILE);
    L.tiles_c = dmi_cuda_ceil_div(cols, DMI_CUDA_TILE);
    L.tiles = L.tiles_r * L.tiles_c;
    switch (config->norm) {
    case DM_NORM_ROW:
        L.group = DMI_CUDA_GROUP_ROW;
        L.groups = rows;
        L.parts = L.tiles_c;
        break;
    case DM_NORM_COLUMN:
        L.group = DMI_CUDA_GROUP_COLUMN;
        L.groups = cols;
        L.parts = L.tiles_r;
        break;
    default:
        L.group = DMI_CUDA_GROUP_MATRIX;
        L.groups = 1;
        L.parts = L.tiles;
        break;
    }
    const int spectral = config->norm == DM_NORM_SPECTRAL;
    const int per_group_duals = L.group != DMI_CUDA_GROUP_MATRIX;
    size_t groups, partials, tiles, total = 0;
    if (dmi_mul_overflows((size_t)batch, (size_t)L.groups, &groups) ||
        dmi_mul_overflows(groups, (size_t)L.parts, &partials) ||
        dmi_mul_overflows((size_t)batch, (size_t)L.tiles, &tiles))
        return DM_ERR_SHAPE;
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &L.header, 1, sizeof(dmi_cuda_header)));
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &L.partials, partials, sizeof(dmi_cuda_partial)));
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &L.scale, groups, sizeof(double)));
    DMI_RETURN_IF_ERROR(
        dmi_cuda_ws_add(&total, &L.group_duals, per_group_duals ? groups : 0, sizeof(double)));
    DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &L.duals, (size_t)batch, sizeof(double)));
    DMI_RETURN_IF_ERROR(
        dmi_cuda_ws_add(&total, &L.dual_parts, spectral ? tiles : 0, sizeof(double)));
    if (spectral) {
        size_t scratch;
        DMI_RETURN_IF_ERROR(
            dmi_cuda_ns_scratch_bytes(batch, L.p, L.q, dmi_dtype_size(L.iteration), &scratch));
        DMI_RETURN_IF_ERROR(dmi_cuda_ws_add(&total, &L.scratch, scratch, 1));
    }
    L.total = total;
    *layout = L;
    return DM_OK;
}

int64_t dmi_cuda_chunks(int64_t batch) {
    return dmi_cuda_ceil_div(batch, DM_CUDA_TENSORS_PER_LAUNCH);
}

dmi_cuda_pass dmi_cuda_chunk(const dmi_cuda_layout *layout, int64_t chunk) {
    dmi_cuda_pass pass;
    pass.rows = layout->rows;
    pass.cols = layout->cols;
    pass.tiles_r = layout->tiles_r;
    pass.tiles_c = layout->tiles_c;
    pass.first = chunk * DM_CUDA_TENSORS_PER_LAUNCH;
    pass.count = (int)dmi_cuda_min64(DM_CUDA_TENSORS_PER_LAUNCH, layout->batch - pass.first);
    pass.transposed = layout->transposed;
    return pass;
}

dmi_cuda_norm_params dmi_cuda_norm_constants(const dm_sharp_config *config,
                                             const dmi_cuda_layout *layout) {
    dmi_cuda_norm_params np;
    const int spectral = config->norm == DM_NORM_SPECTRAL;
    np.mode = config->norm == DM_NORM_SIGN                   ? DMI_CUDA_ABS
              : spectral && layout->iteration == DM_BFLOAT16 ? DMI_CUDA_SQUARES_BF16
                                                             : DMI_CUDA_SQUARES;
    np.spectral = spectral;
    np.float64 = layout->dtype == DM_FLOAT64;
    np.norm_scale = spectral ? config->norm_scale : 1.0;
    np.norm_offset = spectral ? config->norm_offset : 0.0;
    np.eps = config->eps;
    return np;
}

int dmi_cuda_multiprocessors(void) {
    int device = 0, count = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        return 0;
    return count;
}

dm_status dmi_cuda_require_not_capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    DMI_CUDA_TRY(cudaStreamIsCapturing(stream, &capture));
    return capture == cudaStreamCaptureStatusNone ? DM_OK : DM_ERR_INVALID_ARG;
}

/* update.c's check_update_config for the five values that may come from the device. */
__device__ static bool dmi_cuda_hyper_valid(const dm_cuda_update_hyperparameters &h, int adaptive) {
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

__global__ void dmi_cuda_init_kernel(dmi_cuda_header *header,
                                     const dm_cuda_update_hyperparameters *device_values,
                                     const dm_cuda_update_hyperparameters values, int check,
                                     int adaptive) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const dm_cuda_update_hyperparameters h = device_values ? *device_values : values;
    header->hyper = h;
    header->decay = __dsub_rn(1.0, __dmul_rn(h.lr, h.weight_decay));
    header->flags = check && !dmi_cuda_hyper_valid(h, adaptive) ? DMI_CUDA_FLAG_INVALID : 0u;
}

dm_status dmi_cuda_launch_init(dmi_cuda_header *header,
                               const dm_cuda_update_hyperparameters *device_values,
                               dm_cuda_update_hyperparameters values, int check, int adaptive,
                               cudaStream_t stream) {
    dmi_cuda_init_kernel<<<1, 32, 0, stream>>>(header, device_values, values, check, adaptive);
    DMI_CUDA_LAUNCHED();
    return DM_OK;
}

/* A warp per group, lanes striding over its parts, then the butterfly: a fixed order. */
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_sum_parts_kernel(const double *parts, int64_t per_group, int64_t groups, double *out) {
    const int lane = threadIdx.x & 31;
    const int64_t group = ((int64_t)blockIdx.x * DMI_CUDA_BLOCK + threadIdx.x) >> 5;
    if (group >= groups) return; /* the whole warp leaves together */
    const double *p = parts + group * per_group;
    double sum = 0.0;
    for (int64_t k = lane; k < per_group; k += 32) sum += p[k];
    sum = dmi_cuda_warp_sum(sum);
    if (lane == 0) out[group] = sum;
}

dm_status dmi_cuda_launch_sum_parts(const double *parts, int64_t per_group, int64_t groups,
                                    double *out, cudaStream_t stream) {
    if (groups <= 0) return DM_OK;
    const int64_t blocks = dmi_cuda_ceil_div(groups, DMI_CUDA_WARPS);
    dmi_cuda_sum_parts_kernel<<<(unsigned)blocks, DMI_CUDA_BLOCK, 0, stream>>>(parts, per_group,
                                                                               groups, out);
    DMI_CUDA_LAUNCHED();
    return DM_OK;
}

dm_status dmi_cuda_wait_for_status(const dmi_cuda_header *header, cudaStream_t stream) {
    unsigned flags = 0;
    DMI_CUDA_TRY(
        cudaMemcpyAsync(&flags, &header->flags, sizeof flags, cudaMemcpyDeviceToHost, stream));
    DMI_CUDA_TRY(cudaStreamSynchronize(stream));
    return (dm_status)dmi_cuda_flag_status(flags);
}
