/* update.cu - dm_cuda_update: the fused Muon / Drop-Muon update on the device (dm_update in
 * dropmuon.h), as init -> reduce -> finish -> [scale -> Newton-Schulz -> duals] -> final
 * (common.cuh). The direction D is recomputed from G and M by each pass that reads it
 * (dmi_cuda_direction_source); only the final pass writes M and X, and only when neither NaN/Inf
 * nor bad device hyperparameters were seen, so an error leaves every tensor untouched. The
 * hyperparameters are read on the device (the init pass resolves them into the workspace), so a
 * captured step follows changes to the caller's device struct between replays. */
#include "passes.cuh"

namespace {

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
    const dmi_cuda_out_tile<IT> t = dmi_cuda_out_begin<IT, KIND>(tile, pass, header, panel, status);
    if (!t.write) return;

    const dm_cuda_update_hyperparameters h = header->hyper;
    const CT w = (CT)(1.0 - h.momentum), mu = (CT)h.momentum, decay = (CT)header->decay;
    double step;
    if (sp.adaptive) {
        const double dual = duals_ws[t.gb];
        /* A zero direction has dual 0 and moves nothing (also when L0 = 0: no 0 / 0). */
        step = dual > 0.0 ? __ddiv_rn(__dmul_rn(h.lr, dual),
                                      __dadd_rn(h.radius_l0, __dmul_rn(h.radius_l1, dual)))
                          : 0.0;
    } else {
        step = __dmul_rn(h.lr, sp.ratio);
    }
    const CT step_c = (CT)step;
    S *param = io.param[blockIdx.y];
    const S *grad = io.grad[blockIdx.y];
    S *buf = io.buf[blockIdx.y];
    t.for_each(pass, [&](int64_t i, int64_t j) {
        const int64_t e = i * pass.cols + j;
        const CT g = dmi_cuda_value(grad[e]);
        const CT m = dmi_cuda_round<S>(dmi_cuda_lerp(dmi_cuda_value(buf[e]), g, w));
        buf[e] = dmi_cuda_to<S>(m);
        const CT o = t.template sharp<KIND, CT>(pass, scale, i, j, [&] {
            return sp.nesterov ? dmi_cuda_lerp(g, m, mu) : m; /* the direction D */
        });
        const CT decayed = dmi_cuda_round<S>(dmi_cuda_mul(dmi_cuda_value(param[e]), decay));
        param[e] = dmi_cuda_to<S>(dmi_cuda_sub(decayed, dmi_cuda_mul(step_c, o)));
    });
    if (duals && t.lead) duals[t.gb] = duals_ws[t.gb];
}

template <typename S, int KIND, typename IT>
dm_status dmi_cuda_final(const dmi_cuda_layout &L, void *const *params, const void *const *grads,
                         void *const *momentum_buffers, const dmi_cuda_step_params &sp,
                         unsigned char *ws, const IT *panel, double *duals, int32_t *status,
                         cudaStream_t stream) {
    return dmi_cuda_for_chunks(L, [&](const dmi_cuda_pass &pass) {
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
    });
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
        return Src::chunk(pass, grads, momentum_buffers, config->nesterov);
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
    return dmi_cuda_run_sharp<S, Src>(&config->sharp, L, ws, make_source, duals != NULL || adaptive,
                                      gemm, tuning, stream, [&](auto kind, const auto *panel) {
                                          return dmi_cuda_final<S, decltype(kind)::value>(
                                              L, params, grads, momentum_buffers, sp, ws, panel,
                                              duals, status, stream);
                                      });
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
    size_t needed;
    DMI_RETURN_IF_ERROR(dm_cuda_update_workspace_size(config, dtype, batch, rows, cols, &needed));
    DMI_RETURN_IF_ERROR(
        dmi_check_update_pointers(batch, rows, cols, params, grads, momentum_buffers));
    DMI_RETURN_IF_ERROR(dmi_cuda_check_workspace(needed, workspace, workspace_bytes));
    return dmi_cuda_call(
        &config->sharp, dtype, batch, rows, cols, duals, workspace, status, tuning, stream,
        [&](auto type, const dmi_cuda_layout &L, unsigned char *ws, const dm_cuda_tuning *t) {
            return dmi_cuda_update_typed<typename decltype(type)::type>(
                config, L, params, grads, momentum_buffers, duals, ws, gemm, hyperparameters,
                status, t, stream);
        });
}
