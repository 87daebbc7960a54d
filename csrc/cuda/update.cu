/* update.cu - dm_cuda_update: the fused Muon / Drop-Muon update on the device (dm_update in
 * dropmuon.h), as init -> reduce -> finish -> [scale -> Newton-Schulz -> duals] -> final
 * (common.cuh). The direction D is recomputed from G and M by each pass that reads it
 * (dmi_cuda_direction_source); only the final pass writes M and X, and only when neither NaN/Inf
 * nor bad device hyperparameters were seen, so an error leaves every tensor untouched. The
 * hyperparameters are read on the device (the init pass resolves them into the workspace), so a
 * captured step follows changes to the caller's device struct between replays. */
#include "passes.cuh"

namespace {

enum { DMI_KIND_SPECTRAL = 0, DMI_KIND_SIGN, DMI_KIND_COLUMN, DMI_KIND_ROW, DMI_KIND_FROBENIUS };

template <typename S> struct dmi_cuda_update_io {
    S *param[DM_CUDA_TENSORS_PER_LAUNCH];
    const S *grad[DM_CUDA_TENSORS_PER_LAUNCH];
    S *buf[DM_CUDA_TENSORS_PER_LAUNCH];
};

struct dmi_cuda_step_params {
    int nesterov;
    int adaptive; /* DM_RADIUS_ADAPTIVE */
    double ratio; /* FIXED: the lr adjustment of the shape (update.c's lr_ratio) */
};

/* M <- lerp(M, G, 1 - mu) and X <- round(X (1 - lr wd)) - t O, with update.c's arithmetic and
 * roundings; t = lr * ratio, or lr <D,O> / (L0 + L1 <D,O>) (0 when <D,O> = 0). */
template <typename S, typename IT, int KIND>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_update_final_kernel(const __grid_constant__ dmi_cuda_update_io<S> io,
                                 const dmi_cuda_pass pass, const dmi_cuda_header *header,
                                 const dmi_cuda_step_params sp, const double *scale,
                                 const IT *panel, const double *duals_ws, double *duals,
                                 int32_t *status) {
    using CT = typename dmi_cuda_storage<S>::compute;
    __shared__ IT tile[DMI_CUDA_TILE][DMI_CUDA_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, b = blockIdx.y;
    const bool lead = tx == 0 && ty == 0 && blockIdx.x == 0;
    const unsigned flags = header->flags;
    if (flags != 0u) {
        if (status && lead && b == 0) atomicCAS(status, 0, dmi_cuda_flag_status(flags));
        return;
    }
    if (status && *status != 0) return;
    const int64_t gb = pass.first + b, t = blockIdx.x;
    const int64_t r0 = (t / pass.tiles_c) * DMI_CUDA_TILE, c0 = (t % pass.tiles_c) * DMI_CUDA_TILE;
    const IT *x = KIND == DMI_KIND_SPECTRAL ? panel + gb * pass.rows * pass.cols : panel;
    if (KIND == DMI_KIND_SPECTRAL && pass.transposed)
        dmi_cuda_load_transposed_tile(tile, x, pass, r0, c0);

    const dm_cuda_update_hyperparameters h = header->hyper;
    const CT w = (CT)(1.0 - h.momentum), mu = (CT)h.momentum, decay = (CT)header->decay;
    double step;
    if (sp.adaptive) {
        const double dual = duals_ws[gb];
        /* A zero direction has dual 0 and moves nothing (also when L0 = 0: no 0 / 0). */
        step = dual > 0.0 ? __ddiv_rn(__dmul_rn(h.lr, dual),
                                      __dadd_rn(h.radius_l0, __dmul_rn(h.radius_l1, dual)))
                          : 0.0;
    } else {
        step = __dmul_rn(h.lr, sp.ratio);
    }
    const CT step_c = (CT)step;
    S *param = io.param[b];
    const S *grad = io.grad[b];
    S *buf = io.buf[b];
#pragma unroll
    for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
        const int64_t i = r0 + ty + DMI_CUDA_TILE_ROWS * k, j = c0 + tx;
        if (i >= pass.rows || j >= pass.cols) continue;
        const int64_t e = i * pass.cols + j;
        const CT g = dmi_cuda_value(grad[e]);
        const CT m = dmi_cuda_round<S>(dmi_cuda_lerp(dmi_cuda_value(buf[e]), g, w));
        buf[e] = dmi_cuda_to<S>(m);
        CT o;
        if constexpr (KIND == DMI_KIND_SPECTRAL) {
            o = (CT)dmi_cuda_panel_value(tile, x, pass, i, j, r0, c0);
        } else {
            const CT d = sp.nesterov ? dmi_cuda_lerp(g, m, mu) : m;
            if constexpr (KIND == DMI_KIND_SIGN) {
                o = (CT)((d > (CT)0) - (d < (CT)0));
            } else {
                const double s = KIND == DMI_KIND_ROW      ? scale[gb * pass.rows + i]
                                 : KIND == DMI_KIND_COLUMN ? scale[gb * pass.cols + j]
                                                           : scale[gb];
                o = (CT)__dmul_rn((double)d, s);
            }
        }
        const CT decayed = dmi_cuda_round<S>(dmi_cuda_mul(dmi_cuda_value(param[e]), decay));
        param[e] = dmi_cuda_to<S>(dmi_cuda_sub(decayed, dmi_cuda_mul(step_c, o)));
    }
    if (duals && lead) duals[gb] = duals_ws[gb];
}

template <typename S, typename IT, int KIND>
dm_status dmi_cuda_final(const dmi_cuda_layout &L, void *const *params, const void *const *grads,
                         void *const *momentum_buffers, const dmi_cuda_step_params &sp,
                         unsigned char *ws, const IT *panel, double *duals, int32_t *status,
                         cudaStream_t stream) {
    const int64_t chunks = dmi_cuda_chunks(L.batch);
    for (int64_t c = 0; c < chunks; ++c) {
        const dmi_cuda_pass pass = dmi_cuda_chunk(&L, c);
        dmi_cuda_update_io<S> io;
        memset(&io, 0, sizeof io);
        for (int b = 0; b < pass.count; ++b) {
            io.param[b] = (S *)params[pass.first + b];
            io.grad[b] = (const S *)grads[pass.first + b];
            io.buf[b] = (S *)momentum_buffers[pass.first + b];
        }
        dmi_cuda_update_final_kernel<S, IT, KIND>
            <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(
                io, pass, (const dmi_cuda_header *)(ws + L.header), sp,
                (const double *)(ws + L.scale), panel, (const double *)(ws + L.duals), duals,
                status);
        DMI_CUDA_LAUNCHED();
    }
    return DM_OK;
}

template <typename S>
dm_status
dmi_cuda_update_typed(const dm_update_config *config, const dmi_cuda_layout &L, void *const *params,
                      const void *const *grads, void *const *momentum_buffers, double *duals,
                      unsigned char *ws, const dm_gemm_provider *gemm,
                      const dm_cuda_update_hyperparameters *hyperparameters, int32_t *status,
                      const dm_cuda_tuning *tuning, cudaStream_t stream) {
    using Src = dmi_cuda_direction_source<S>;
    auto make_source = [&](const dmi_cuda_pass &pass) {
        Src src;
        memset(&src, 0, sizeof src);
        for (int b = 0; b < pass.count; ++b) {
            src.grad[b] = (const S *)grads[pass.first + b];
            src.buf[b] = (const S *)momentum_buffers[pass.first + b];
        }
        src.cols = L.cols;
        src.nesterov = config->nesterov;
        return src;
    };
    const int adaptive = config->radius == DM_RADIUS_ADAPTIVE;
    const dm_cuda_update_hyperparameters values = {
        config->lr, config->weight_decay, config->momentum, config->radius_l0, config->radius_l1};
    DMI_RETURN_IF_ERROR(dmi_cuda_launch_init((dmi_cuda_header *)(ws + L.header), hyperparameters,
                                             values, 1, adaptive, stream));
    const dmi_cuda_norm_params np = dmi_cuda_norm_constants(&config->sharp, &L);
    DMI_RETURN_IF_ERROR(dmi_cuda_run_norms<Src>(L, np, ws, make_source, stream));
    dmi_cuda_step_params sp;
    sp.nesterov = config->nesterov;
    sp.adaptive = adaptive;
    sp.ratio = dmi_lr_ratio(config->lr_adjust, L.rows, L.cols);
    const int want_duals = duals != NULL || adaptive;
    switch (config->sharp.norm) {
    case DM_NORM_SPECTRAL:
        if (L.iteration == DM_BFLOAT16) {
            const __nv_bfloat16 *o = NULL;
            DMI_RETURN_IF_ERROR(dmi_cuda_run_spectral<Src>(&config->sharp, L, ws, make_source,
                                                           want_duals, gemm, tuning, &o, stream));
            return dmi_cuda_final<S, __nv_bfloat16, DMI_KIND_SPECTRAL>(
                L, params, grads, momentum_buffers, sp, ws, o, duals, status, stream);
        } else {
            using IT = typename dmi_cuda_storage<S>::compute;
            const IT *o = NULL;
            DMI_RETURN_IF_ERROR(dmi_cuda_run_spectral<Src>(&config->sharp, L, ws, make_source,
                                                           want_duals, gemm, tuning, &o, stream));
            return dmi_cuda_final<S, IT, DMI_KIND_SPECTRAL>(L, params, grads, momentum_buffers, sp,
                                                            ws, o, duals, status, stream);
        }
    case DM_NORM_SIGN:
        return dmi_cuda_final<S, S, DMI_KIND_SIGN>(L, params, grads, momentum_buffers, sp, ws, NULL,
                                                   duals, status, stream);
    case DM_NORM_COLUMN:
        return dmi_cuda_final<S, S, DMI_KIND_COLUMN>(L, params, grads, momentum_buffers, sp, ws,
                                                     NULL, duals, status, stream);
    case DM_NORM_ROW:
        return dmi_cuda_final<S, S, DMI_KIND_ROW>(L, params, grads, momentum_buffers, sp, ws, NULL,
                                                  duals, status, stream);
    case DM_NORM_FROBENIUS:
        return dmi_cuda_final<S, S, DMI_KIND_FROBENIUS>(L, params, grads, momentum_buffers, sp, ws,
                                                        NULL, duals, status, stream);
    }
    return DM_ERR_INVALID_ARG;
}

} // namespace

dm_status dm_cuda_update_workspace_size(const dm_update_config *config, dm_dtype dtype,
                                        int64_t batch, int64_t rows, int64_t cols, size_t *bytes) {
    size_t cpu_bytes;
    dmi_cuda_layout L;
    if (!bytes) return DM_ERR_INVALID_ARG;
    /* The C core's own checks: the same configs, dtypes and sizes are accepted. */
    DMI_RETURN_IF_ERROR(dm_update_workspace_size(config, dtype, batch, rows, cols, &cpu_bytes));
    DMI_RETURN_IF_ERROR(dmi_cuda_plan(&config->sharp, dtype, batch, rows, cols, &L));
    *bytes = L.total;
    return DM_OK;
}

dm_status dm_cuda_update(const dm_update_config *config, dm_dtype dtype, int64_t batch,
                         int64_t rows, int64_t cols, void *const *params, const void *const *grads,
                         void *const *momentum_buffers, double *duals, void *workspace,
                         size_t workspace_bytes, const dm_gemm_provider *gemm,
                         const dm_cuda_update_hyperparameters *hyperparameters, int32_t *status,
                         const dm_cuda_tuning *tuning, void *stream_ptr) {
    const cudaStream_t stream = (cudaStream_t)stream_ptr;
    const dm_cuda_tuning defaults = {DM_CUDA_BATCHED_MAX_P, DM_CUDA_SYMMETRIC_MIN_P};
    size_t needed;
    DMI_RETURN_IF_ERROR(dm_cuda_update_workspace_size(config, dtype, batch, rows, cols, &needed));
    if (batch > 0 && (!params || !grads || !momentum_buffers)) return DM_ERR_INVALID_ARG;
    if (rows > 0 && cols > 0)
        for (int64_t b = 0; b < batch; ++b)
            if (!params[b] || !grads[b] || !momentum_buffers[b]) return DM_ERR_INVALID_ARG;
    if (needed > 0 &&
        (!workspace || workspace_bytes < needed || (uintptr_t)workspace % DMI_CUDA_ALIGN != 0))
        return DM_ERR_WORKSPACE;
    if (!status) DMI_RETURN_IF_ERROR(dmi_cuda_require_not_capturing(stream));
    if (batch == 0) return DM_OK;
    if (rows == 0 || cols == 0) {
        if (duals) DMI_CUDA_TRY(cudaMemsetAsync(duals, 0, (size_t)batch * sizeof(double), stream));
        return DM_OK;
    }

    dmi_cuda_layout L;
    DMI_RETURN_IF_ERROR(dmi_cuda_plan(&config->sharp, dtype, batch, rows, cols, &L));
    DMI_RETURN_IF_ERROR(dmi_cuda_check_grid(L));
    unsigned char *ws = (unsigned char *)workspace;
    const dm_cuda_tuning *t = tuning ? tuning : &defaults;
    dm_status st = DM_ERR_DTYPE;
    switch (dtype) {
    case DM_FLOAT32:
        st = dmi_cuda_update_typed<float>(config, L, params, grads, momentum_buffers, duals, ws,
                                          gemm, hyperparameters, status, t, stream);
        break;
    case DM_FLOAT64:
        st = dmi_cuda_update_typed<double>(config, L, params, grads, momentum_buffers, duals, ws,
                                           gemm, hyperparameters, status, t, stream);
        break;
    case DM_BFLOAT16:
        st = dmi_cuda_update_typed<__nv_bfloat16>(config, L, params, grads, momentum_buffers, duals,
                                                  ws, gemm, hyperparameters, status, t, stream);
        break;
    }
    if (st != DM_OK || status) return st;
    return dmi_cuda_wait_for_status((const dmi_cuda_header *)(ws + L.header), stream);
}
