// cpu.cpp - CPU implementations of the dropmuon operators: checks, then the C core, with
// torch's own BLAS (through ATen) as the matrix-product provider and its thread pool for the rest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/baddbmm_cpu_dispatch.h>
#include <torch/library.h>

#include "update_args.h"

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

// The core's workspace, kept per thread and grown, never shrunk: large buffers from the system
// allocator are fresh pages each time, and faulting them in cost more than the elementwise work
// itself (11 ms of a 2048x2048 call). It holds the largest workspace asked for so far.
void *workspace(size_t bytes) {
    thread_local at::Tensor buffer;
    if (!buffer.defined() || static_cast<size_t>(buffer.numel()) < bytes)
        buffer = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
    return buffer.mutable_data_ptr();
}

std::tuple<at::Tensor, at::Tensor> sharp_cpu(const at::Tensor &input, const std::string &norm,
                                             at::ArrayRef<double> ns_coefficients,
                                             double norm_scale, double norm_offset, double eps,
                                             const std::string &ns_precision, bool with_duals) {
    TORCH_CHECK(input.dim() == 3, "dropmuon.sharp: input must be [batch, rows, cols], got shape ",
                input.sizes());
    TORCH_CHECK(input.device().is_cpu(), "dropmuon.sharp: input is on ", input.device(),
                ", this is the CPU kernel");
    const dm_dtype dtype = to_dm_dtype(input, "input");
    const std::vector<double> coefficients = ns_coefficients.vec();
    const dm_sharp_config config =
        make_sharp_config(norm, coefficients, norm_scale, norm_offset, eps, ns_precision);

    const at::Tensor in = input.contiguous();
    const int64_t batch = in.size(0), rows = in.size(1), cols = in.size(2);
    at::Tensor out = at::empty_like(in);
    at::Tensor duals = at::empty({with_duals ? batch : 0}, in.options().dtype(at::kDouble));
    size_t bytes = 0;
    DMI_TORCH_CHECK_STATUS(dm_sharp_workspace_size(&config, dtype, batch, rows, cols, &bytes),
                           "dm_sharp_workspace_size");

    const size_t elem = in.element_size(), stride = static_cast<size_t>(rows * cols) * elem;
    std::vector<const void *> inputs(batch);
    std::vector<void *> outputs(batch);
    for (int64_t i = 0; i < batch; ++i) {
        inputs[i] = static_cast<const char *>(in.const_data_ptr()) + i * stride;
        outputs[i] = static_cast<char *>(out.mutable_data_ptr()) + i * stride;
    }
    DMI_TORCH_CHECK_STATUS(dm_sharp(&config, dtype, batch, rows, cols, inputs.data(), cols,
                                    outputs.data(), cols,
                                    with_duals ? duals.mutable_data_ptr<double>() : nullptr,
                                    workspace(bytes), bytes, &kAtenProvider),
                           "dm_sharp");
    return {out, duals};
}

// dm_update on checked lists, with the thread's workspace; the caller raises or reports the
// status.
dm_status run_update(const dm_update_config &config, const UpdateArgs &args, at::Tensor &duals) {
    size_t bytes = 0;
    DMI_TORCH_CHECK_STATUS(
        dm_update_workspace_size(&config, args.dtype, args.batch, args.rows, args.cols, &bytes),
        "dm_update_workspace_size");
    return dm_update(&config, args.dtype, args.batch, args.rows, args.cols, args.params.data(),
                     args.grads.data(), args.momentum_buffers.data(), duals_or_null(duals),
                     workspace(bytes), bytes, &kAtenProvider);
}

at::Tensor muon_update_cpu(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, double lr, double weight_decay,
                           double momentum, bool nesterov, const std::string &norm,
                           at::ArrayRef<double> ns_coefficients, double norm_scale,
                           double norm_offset, double eps, const std::string &ns_precision,
                           const std::string &adjust_lr_fn, const std::string &radius, double L0,
                           double L1, bool with_duals) {
    if (!check_update_lists(params, grads, momentum_buffers, "dropmuon.muon_update_", at::kCPU))
        return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
    const std::vector<double> coefficients = ns_coefficients.vec();
    const dm_update_config config =
        make_update_config(coefficients, lr, weight_decay, momentum, nesterov, norm, norm_scale,
                           norm_offset, eps, ns_precision, adjust_lr_fn, radius, L0, L1);

    const UpdateArgs args = gather_update_args(params, grads, momentum_buffers);
    at::Tensor duals = update_duals(params[0], args.batch, with_duals, false);
    DMI_TORCH_CHECK_STATUS(run_update(config, args, duals), "dm_update");
    return duals;
}

// muon_update_ with lr, weight_decay, momentum, L0 and L1 read from a float64 [5] tensor, and
// NaN/Inf or out-of-range values reported into `status` (int32 [1]) instead of raised: the CPU
// twin of the CUDA-graph-capturable kernel (cuda.cu), so that the same optimizer code runs on
// both. Nothing is written when status is nonzero on entry or an error is found.
at::Tensor muon_update_capturable_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
    const at::Tensor &hyperparameters, const at::Tensor &status, bool nesterov,
    const std::string &norm, at::ArrayRef<double> ns_coefficients, double norm_scale,
    double norm_offset, double eps, const std::string &ns_precision,
    const std::string &adjust_lr_fn, const std::string &radius, bool with_duals) {
    const char *op = "dropmuon._muon_update_capturable_";
    TORCH_CHECK(hyperparameters.device().is_cpu() && status.device().is_cpu(), op,
                ": hyperparameters and status are on ", hyperparameters.device(), " and ",
                status.device(), ", this is the CPU kernel");
    check_capturable_tensors(hyperparameters, status, op, false);
    if (!check_update_lists(params, grads, momentum_buffers, op, at::kCPU))
        return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
    const std::vector<double> coefficients = ns_coefficients.vec();
    dm_update_config config =
        make_capturable_update_config(coefficients, nesterov, norm, norm_scale, norm_offset, eps,
                                      ns_precision, adjust_lr_fn, radius);

    const UpdateArgs args = gather_update_args(params, grads, momentum_buffers);
    size_t bytes = 0; // everything but the five values is checked here, and raises
    DMI_TORCH_CHECK_STATUS(
        dm_update_workspace_size(&config, args.dtype, args.batch, args.rows, args.cols, &bytes),
        "dm_update_workspace_size");
    at::Tensor duals = update_duals(params[0], args.batch, with_duals, true);
    int32_t *flag = status.mutable_data_ptr<int32_t>();
    if (*flag != 0) return duals;
    const at::Tensor values = hyperparameters.contiguous();
    const double *h = values.const_data_ptr<double>();
    config.lr = h[0];
    config.weight_decay = h[1];
    config.momentum = h[2];
    config.radius_l0 = h[3];
    config.radius_l1 = h[4];
    if (dm_update_workspace_size(&config, args.dtype, args.batch, args.rows, args.cols, &bytes) !=
        DM_OK) {
        *flag = DM_ERR_INVALID_ARG; // only the five values can be wrong by now
        return duals;
    }
    const dm_status st = run_update(config, args, duals);
    if (st == DM_ERR_NONFINITE) {
        *flag = st;
        return duals;
    }
    DMI_TORCH_CHECK_STATUS(st, "dm_update");
    return duals;
}

} // namespace

TORCH_LIBRARY_IMPL(dropmuon, CPU, m) {
    m.impl("sharp", &sharp_cpu);
    m.impl("muon_update_", &muon_update_cpu);
    m.impl("_muon_update_capturable_", &muon_update_capturable_cpu);
}

} // namespace dropmuon
