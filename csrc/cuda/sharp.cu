/* sharp.cu - dm_cuda_sharp: the sharp operators on the device (dm_sharp in dropmuon.h), as
 * init -> reduce -> finish -> [scale -> Newton-Schulz -> duals] -> store (common.cuh). */
#include "passes.cuh"

namespace {

enum { DMI_KIND_SPECTRAL = 0, DMI_KIND_SIGN, DMI_KIND_COLUMN, DMI_KIND_ROW, DMI_KIND_FROBENIUS };

template <typename S> struct dmi_cuda_sharp_io {
    const S *in[DM_CUDA_TENSORS_PER_LAUNCH];
    S *out[DM_CUDA_TENSORS_PER_LAUNCH];
    int64_t in_ld, out_ld;
};

/* The only pass that writes user memory: out = sharp(M) and the duals, unless the flags (or a
 * caller's nonzero *status) say otherwise. Non-spectral kinds read M again and apply the
 * divisors as sharp.c's DEFINE_APPLY does (in double, rounded to the compute type, then to
 * storage); SPECTRAL converts the final iterate (transposed back through shared memory). An
 * output element is written by the thread that read the same input element, so outputs may
 * alias inputs. */
template <typename S, typename IT, int KIND>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_sharp_store_kernel(const __grid_constant__ dmi_cuda_sharp_io<S> io,
                                const dmi_cuda_pass pass, const dmi_cuda_header *header,
                                const double *scale, const IT *panel, const double *duals_ws,
                                double *duals, int32_t *status) {
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
    const S *in = io.in[b];
    S *out = io.out[b];
#pragma unroll
    for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
        const int64_t i = r0 + ty + DMI_CUDA_TILE_ROWS * k, j = c0 + tx;
        if (i >= pass.rows || j >= pass.cols) continue;
        if constexpr (KIND == DMI_KIND_SPECTRAL) {
            out[i * io.out_ld + j] =
                dmi_cuda_to<S>(dmi_cuda_panel_value(tile, x, pass, i, j, r0, c0));
        } else {
            const CT m = dmi_cuda_value(in[i * io.in_ld + j]);
            CT o;
            if constexpr (KIND == DMI_KIND_SIGN) {
                o = (CT)((m > (CT)0) - (m < (CT)0));
            } else {
                const double s = KIND == DMI_KIND_ROW      ? scale[gb * pass.rows + i]
                                 : KIND == DMI_KIND_COLUMN ? scale[gb * pass.cols + j]
                                                           : scale[gb];
                o = (CT)__dmul_rn((double)m, s);
            }
            out[i * io.out_ld + j] = dmi_cuda_to<S>(o);
        }
    }
    if (duals && lead) duals[gb] = duals_ws[gb];
}

template <typename S, typename IT, int KIND>
dm_status dmi_cuda_store(const dmi_cuda_layout &L, const void *const *inputs, int64_t in_ld,
                         void *const *outputs, int64_t out_ld, unsigned char *ws, const IT *panel,
                         double *duals, int32_t *status, cudaStream_t stream) {
    const int64_t chunks = dmi_cuda_chunks(L.batch);
    for (int64_t c = 0; c < chunks; ++c) {
        const dmi_cuda_pass pass = dmi_cuda_chunk(&L, c);
        dmi_cuda_sharp_io<S> io;
        memset(&io, 0, sizeof io);
        for (int b = 0; b < pass.count; ++b) {
            io.in[b] = (const S *)inputs[pass.first + b];
            io.out[b] = (S *)outputs[pass.first + b];
        }
        io.in_ld = in_ld;
        io.out_ld = out_ld;
        dmi_cuda_sharp_store_kernel<S, IT, KIND>
            <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(
                io, pass, (const dmi_cuda_header *)(ws + L.header), (const double *)(ws + L.scale),
                panel, (const double *)(ws + L.duals), duals, status);
        DMI_CUDA_LAUNCHED();
    }
    return DM_OK;
}

template <typename S>
dm_status dmi_cuda_sharp_typed(const dm_sharp_config *config, const dmi_cuda_layout &L,
                               const void *const *inputs, int64_t in_ld, void *const *outputs,
                               int64_t out_ld, double *duals, unsigned char *ws,
                               const dm_gemm_provider *gemm, int32_t *status,
                               const dm_cuda_tuning *tuning, cudaStream_t stream) {
    using Src = dmi_cuda_input_source<S>;
    auto make_source = [&](const dmi_cuda_pass &pass) {
        Src src;
        memset(&src, 0, sizeof src);
        for (int b = 0; b < pass.count; ++b) src.in[b] = (const S *)inputs[pass.first + b];
        src.ld = in_ld;
        return src;
    };
    const dm_cuda_update_hyperparameters unused = {0.0, 0.0, 0.0, 0.0, 0.0};
    DMI_RETURN_IF_ERROR(
        dmi_cuda_launch_init((dmi_cuda_header *)(ws + L.header), NULL, unused, 0, 0, stream));
    const dmi_cuda_norm_params np = dmi_cuda_norm_constants(config, &L);
    DMI_RETURN_IF_ERROR(dmi_cuda_run_norms<Src>(L, np, ws, make_source, stream));
    const int want_duals = duals != NULL;
    switch (config->norm) {
    case DM_NORM_SPECTRAL:
        if (L.iteration == DM_BFLOAT16) {
            const __nv_bfloat16 *o = NULL;
            DMI_RETURN_IF_ERROR(dmi_cuda_run_spectral<Src>(config, L, ws, make_source, want_duals,
                                                           gemm, tuning, &o, stream));
            return dmi_cuda_store<S, __nv_bfloat16, DMI_KIND_SPECTRAL>(
                L, inputs, in_ld, outputs, out_ld, ws, o, duals, status, stream);
        } else {
            /* native iterates: the compute type (float, or double for float64 data) */
            using IT = typename dmi_cuda_storage<S>::compute;
            const IT *o = NULL;
            DMI_RETURN_IF_ERROR(dmi_cuda_run_spectral<Src>(config, L, ws, make_source, want_duals,
                                                           gemm, tuning, &o, stream));
            return dmi_cuda_store<S, IT, DMI_KIND_SPECTRAL>(L, inputs, in_ld, outputs, out_ld, ws,
                                                            o, duals, status, stream);
        }
    case DM_NORM_SIGN:
        return dmi_cuda_store<S, S, DMI_KIND_SIGN>(L, inputs, in_ld, outputs, out_ld, ws, NULL,
                                                   duals, status, stream);
    case DM_NORM_COLUMN:
        return dmi_cuda_store<S, S, DMI_KIND_COLUMN>(L, inputs, in_ld, outputs, out_ld, ws, NULL,
                                                     duals, status, stream);
    case DM_NORM_ROW:
        return dmi_cuda_store<S, S, DMI_KIND_ROW>(L, inputs, in_ld, outputs, out_ld, ws, NULL,
                                                  duals, status, stream);
    case DM_NORM_FROBENIUS:
        return dmi_cuda_store<S, S, DMI_KIND_FROBENIUS>(L, inputs, in_ld, outputs, out_ld, ws, NULL,
                                                        duals, status, stream);
    }
    return DM_ERR_INVALID_ARG;
}

} // namespace

dm_status dm_cuda_sharp_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                       int64_t rows, int64_t cols, size_t *bytes) {
    size_t cpu_bytes;
    dmi_cuda_layout L;
    if (!bytes) return DM_ERR_INVALID_ARG;
    /* The C core's own checks: the same configs, dtypes and sizes are accepted. */
    DMI_RETURN_IF_ERROR(dm_sharp_workspace_size(config, dtype, batch, rows, cols, &cpu_bytes));
    DMI_RETURN_IF_ERROR(dmi_cuda_plan(config, dtype, batch, rows, cols, &L));
    *bytes = L.total;
    return DM_OK;
}

dm_status dm_cuda_sharp(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                        int64_t cols, const void *const *inputs, int64_t in_ld,
                        void *const *outputs, int64_t out_ld, double *duals, void *workspace,
                        size_t workspace_bytes, const dm_gemm_provider *gemm, int32_t *status,
                        const dm_cuda_tuning *tuning, void *stream_ptr) {
    const cudaStream_t stream = (cudaStream_t)stream_ptr;
    const dm_cuda_tuning defaults = {DM_CUDA_BATCHED_MAX_P, DM_CUDA_SYMMETRIC_MIN_P};
    size_t needed;
    DMI_RETURN_IF_ERROR(dm_cuda_sharp_workspace_size(config, dtype, batch, rows, cols, &needed));
    if (in_ld < cols || out_ld < cols) return DM_ERR_SHAPE;
    if (batch > 0 && (!inputs || !outputs)) return DM_ERR_INVALID_ARG;
    if (rows > 0 && cols > 0)
        for (int64_t b = 0; b < batch; ++b)
            if (!inputs[b] || !outputs[b]) return DM_ERR_INVALID_ARG;
    if (needed > 0 &&
        (!workspace || workspace_bytes < needed || (uintptr_t)workspace % DMI_CUDA_ALIGN != 0))
        return DM_ERR_WORKSPACE;
    if (batch > 0 && rows > 0 && cols > 0 &&
        (rows - 1 > (INT64_MAX - cols) / in_ld || rows - 1 > (INT64_MAX - cols) / out_ld))
        return DM_ERR_SHAPE;
    if (!status) DMI_RETURN_IF_ERROR(dmi_cuda_require_not_capturing(stream));
    if (batch == 0) return DM_OK;
    if (rows == 0 || cols == 0) {
        if (duals) DMI_CUDA_TRY(cudaMemsetAsync(duals, 0, (size_t)batch * sizeof(double), stream));
        return DM_OK;
    }

    dmi_cuda_layout L;
    DMI_RETURN_IF_ERROR(dmi_cuda_plan(config, dtype, batch, rows, cols, &L));
    DMI_RETURN_IF_ERROR(dmi_cuda_check_grid(L));
    unsigned char *ws = (unsigned char *)workspace;
    const dm_cuda_tuning *t = tuning ? tuning : &defaults;
    dm_status st = DM_ERR_DTYPE;
    switch (dtype) {
    case DM_FLOAT32:
        st = dmi_cuda_sharp_typed<float>(config, L, inputs, in_ld, outputs, out_ld, duals, ws, gemm,
                                         status, t, stream);
        break;
    case DM_FLOAT64:
        st = dmi_cuda_sharp_typed<double>(config, L, inputs, in_ld, outputs, out_ld, duals, ws,
                                          gemm, status, t, stream);
        break;
    case DM_BFLOAT16:
        st = dmi_cuda_sharp_typed<__nv_bfloat16>(config, L, inputs, in_ld, outputs, out_ld, duals,
                                                 ws, gemm, status, t, stream);
        break;
    }
    if (st != DM_OK || status) return st;
    return dmi_cuda_wait_for_status((const dmi_cuda_header *)(ws + L.header), stream);
}
