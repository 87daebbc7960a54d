// cpu_provider.cpp - the C core's matrix products and threads over ATen
// (dropmuon/aten/cpu_provider.h).
#include "dropmuon/aten/cpu_provider.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/baddbmm_cpu_dispatch.h>

namespace dropmuon {
namespace {

// dm_gemm_fn over ATen: views the caller's buffers as strided tensors and lets baddbmm/addmm
// pick the BLAS path (MKL / oneDNN in torch's build, with torch's thread pool). at::cpu:: calls
// the CPU kernels directly: the dispatcher's few microseconds per call add up over the 15
// products of a small layer's Newton-Schulz.
dm_status aten_gemm(void *, dm_dtype dtype, int trans_a, int trans_b, int64_t batch, int64_t m,
                    int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                    int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b, double beta,
                    const void *c_in, void *c, int64_t ldc, int64_t stride_c) {
    try {
        const auto options = at::TensorOptions().dtype(dtype == DM_FLOAT64    ? at::kDouble
                                                       : dtype == DM_BFLOAT16 ? at::kBFloat16
                                                                              : at::kFloat);
        // op(X) of a stored rows x cols matrix (leading dimension ld) as a strided view, built
        // with its final sizes and strides: no select or transpose (a TensorImpl each, which
        // showed in small layers' products).
        auto view = [&](const void *p, int64_t rows, int64_t cols, int64_t ld, int64_t stride,
                        bool transpose) {
            const int64_t r = transpose ? cols : rows, c = transpose ? rows : cols;
            const int64_t row_stride = transpose ? 1 : ld, col_stride = transpose ? ld : 1;
            void *data = const_cast<void *>(p);
            return batch == 1 ? at::from_blob(data, {r, c}, {row_stride, col_stride}, options)
                              : at::from_blob(data, {batch, r, c}, {stride, row_stride, col_stride},
                                              options);
        };
        const at::Tensor A = view(a, trans_a ? k : m, trans_a ? m : k, lda, stride_a, trans_a);
        const at::Tensor B = view(b, trans_b ? n : k, trans_b ? k : n, ldb, stride_b, trans_b);
        at::Tensor C = view(c, m, n, ldc, stride_c, false);
        const at::Tensor C_in =
            beta == 0.0 || c_in == c ? C : view(c_in, m, n, ldc, stride_c, false);
        if (batch == 1)
            at::cpu::addmm_out(C, C_in, A, B, beta, alpha);
        else
            at::cpu::baddbmm_out(C, C_in, A, B, beta, alpha);
        return DM_OK;
    } catch (const std::exception &) {
        return DM_ERR_GEMM;
    }
}

// dm_parallel_for_fn over torch's intra-op thread pool (at::parallel_for): the core's passes
// then use the threads torch.set_num_threads gives, like torch's own elementwise ops. The core's
// bodies never throw, so neither does at::parallel_for here.
void aten_parallel_for(void *, int64_t n, int64_t grain, dm_parallel_body body, void *arg) {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body(arg, begin, end); });
}

const dm_gemm_provider kAtenProvider = {&aten_gemm, nullptr, &aten_parallel_for};

} // namespace

const dm_gemm_provider *cpu_provider() { return &kAtenProvider; }

// The core's workspace, kept per thread and grown, never shrunk: large buffers from the system
// allocator are fresh pages each time, and faulting them in cost more than the elementwise work
// itself (11 ms of a 2048x2048 call). It holds the largest workspace asked for so far.
void *cpu_workspace(size_t bytes) {
    thread_local at::Tensor buffer;
    if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < bytes)
        buffer = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
    return buffer.mutable_data_ptr();
}

dm_status cpu_update(const dm_update_config &config, const UpdateArgs &args, double *duals) {
    size_t bytes = 0;
    DMI_TORCH_CHECK_STATUS(
        dm_update_workspace_size(&config, args.dtype, args.batch, args.rows, args.cols, &bytes),
        "dm_update_workspace_size");
    return dm_update(&config, args.dtype, args.batch, args.rows, args.cols, args.params.data(),
                     args.grads.data(), args.momentum_buffers.data(), duals, cpu_workspace(bytes),
                     bytes, cpu_provider());
}

} // namespace dropmuon
