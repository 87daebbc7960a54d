/* sharp.cu - dm_cuda_sharp: the sharp operators on the device (dm_sharp in dropmuon.h), as
 * init -> reduce -> finish -> [scale -> Newton-Schulz -> duals] -> store (common.cuh). */
#include "passes.cuh"

namespace {

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
    const dmi_cuda_out_tile<IT> t = dmi_cuda_out_begin<IT, KIND>(tile, pass, header, panel, status);
    if (!t.write) return;
    const S *in = io.in[blockIdx.y];
    S *out = io.out[blockIdx.y];
    t.for_each(pass, [&](int64_t i, int64_t j) {
        const CT o = t.template sharp<KIND, CT>(
            pass, scale, i, j, [&] { return dmi_cuda_value(in[i * io.in_ld + j]); });
        out[i * io.out_ld + j] = dmi_cuda_to<S>(o);
    });
    if (duals && t.lead) duals[t.gb] = duals_ws[t.gb];
}

template <typename S, int KIND, typename IT>
dm_status dmi_cuda_store(const dmi_cuda_layout &L, const void *const *inputs, int64_t in_ld,
                         void *const *outputs, int64_t out_ld, unsigned char *ws, const IT *panel,
                         double *duals, int32_t *status, cudaStream_t stream) {
    return dmi_cuda_for_chunks(L, [&](const dmi_cuda_pass &pass) {
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
    });
}

template <typename S>
dm_status dmi_cuda_sharp_typed(const dm_sharp_config *config, const dmi_cuda_layout &L,
                               const void *const *inputs, int64_t in_ld, void *const *outputs,
                               int64_t out_ld, double *duals, unsigned char *ws,
                               const dm_gemm_provider *gemm, int32_t *status,
                               const dm_cuda_tuning *tuning, cudaStream_t stream) {
    using Src = dmi_cuda_input_source<S>;
    auto make_source = [&](const dmi_cuda_pass &pass) { return Src::chunk(pass, inputs, in_ld); };
    const dm_cuda_update_hyperparameters unused = {0.0, 0.0, 0.0, 0.0, 0.0};
    DMI_RETURN_IF_ERROR(
        dmi_cuda_launch_init((dmi_cuda_header *)(ws + L.header), NULL, unused, 0, 0, stream));
    const dmi_cuda_norm_params np = dmi_cuda_norm_constants(config, &L);
    DMI_RETURN_IF_ERROR(dmi_cuda_run_norms<Src>(L, np, ws, make_source, stream));
    return dmi_cuda_run_sharp<S, Src>(config, L, ws, make_source, duals != NULL, gemm, tuning,
                                      stream, [&](auto kind, const auto *panel) {
                                          return dmi_cuda_store<S, decltype(kind)::value>(
                                              L, inputs, in_ld, outputs, out_ld, ws, panel, duals,
                                              status, stream);
                                      });
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
    size_t needed;
    DMI_RETURN_IF_ERROR(dm_cuda_sharp_workspace_size(config, dtype, batch, rows, cols, &needed));
    DMI_RETURN_IF_ERROR(
        dmi_check_sharp_pointers(batch, rows, cols, inputs, in_ld, outputs, out_ld));
    DMI_RETURN_IF_ERROR(dmi_cuda_check_workspace(needed, workspace, workspace_bytes));
    DMI_RETURN_IF_ERROR(dmi_check_sharp_strides(batch, rows, cols, in_ld, out_ld));
    return dmi_cuda_call(
        config, dtype, batch, rows, cols, duals, workspace, status, tuning, stream,
        [&](auto type, const dmi_cuda_layout &L, unsigned char *ws, const dm_cuda_tuning *t) {
            return dmi_cuda_sharp_typed<typename decltype(type)::type>(
                config, L, inputs, in_ld, outputs, out_ld, duals, ws, gemm, status, t, stream);
        });
}
