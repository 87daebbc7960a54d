// cpu.cpp - CPU implementations of the dropmuon operators: checks, then the C core, with
// torch's own BLAS (through ATen) as the matrix-product provider and its thread pool for the rest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/baddbmm_cpu_dispatch.h>
#include <torch/library.h>

#include <limits>

#include "common.h"

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
    DM_TORCH_CHECK_STATUS(dm_sharp_workspace_size(&config, dtype, batch, rows, cols, &bytes),
                          "dm_sharp_workspace_size");

    const size_t elem = in.element_size(), stride = static_cast<size_t>(rows * cols) * elem;
    std::vector<const void *> inputs(batch);
    std::vector<void *> outputs(batch);
    for (int64_t i = 0; i < batch; ++i) {
        inputs[i] = static_cast<const char *>(in.const_data_ptr()) + i * stride;
        outputs[i] = static_cast<char *>(out.mutable_data_ptr()) + i * stride;
    }
    DM_TORCH_CHECK_STATUS(dm_sharp(&config, dtype, batch, rows, cols, inputs.data(), cols,
                                   outputs.data(), cols,
                                   with_duals ? duals.mutable_data_ptr<double>() : nullptr,
                                   workspace(bytes), bytes, &kAtenProvider),
                          "dm_sharp");
    return {out, duals};
}

at::Tensor muon_update_cpu(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, double lr, double weight_decay,
                           double momentum, bool nesterov, const std::string &norm,
                           at::ArrayRef<double> ns_coefficients, double norm_scale,
                           double norm_offset, double eps, const std::string &ns_precision,
                           const std::string &adjust_lr_fn, const std::string &radius, double L0,
                           double L1, bool with_duals) {
    const int64_t batch = static_cast<int64_t>(params.size());
    TORCH_CHECK(grads.size() == params.size() && momentum_buffers.size() == params.size(),
                "dropmuon.muon_update_: params, grads and momentum_buffers must have the same "
                "length, got ",
                params.size(), ", ", grads.size(), ", ", momentum_buffers.size());
    if (batch == 0) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor &first = params[0];
    TORCH_CHECK(first.device().is_cpu(), "dropmuon.muon_update_: params[0] is on ", first.device(),
                ", this is the CPU kernel");
    const dm_dtype dtype = to_dm_dtype(first, "params[0]");
    check_tensor_list(params, first, "params", true);
    check_tensor_list(grads, first, "grads", false);
    check_tensor_list(momentum_buffers, first, "momentum_buffers", true);

    const std::vector<double> coefficients = ns_coefficients.vec();
    dm_update_config config{};
    config.sharp =
        make_sharp_config(norm, coefficients, norm_scale, norm_offset, eps, ns_precision);
    config.lr = lr;
    config.weight_decay = weight_decay;
    config.momentum = momentum;
    config.nesterov = nesterov ? 1 : 0;
    config.lr_adjust = parse_lr_adjust(adjust_lr_fn);
    config.radius = parse_radius(radius);
    config.radius_l0 = L0;
    config.radius_l1 = L1;

    const auto [rows, cols] = matrix_shape(first);
    std::vector<at::Tensor> grads_contiguous;
    std::vector<void *> param_ptrs(batch), buffer_ptrs(batch);
    std::vector<const void *> grad_ptrs(batch);
    for (int64_t i = 0; i < batch; ++i) {
        grads_contiguous.push_back(grads[i].contiguous());
        param_ptrs[i] = params[i].mutable_data_ptr();
        buffer_ptrs[i] = momentum_buffers[i].mutable_data_ptr();
        grad_ptrs[i] = grads_contiguous.back().const_data_ptr();
    }
    size_t bytes = 0;
    DM_TORCH_CHECK_STATUS(dm_update_workspace_size(&config, dtype, batch, rows, cols, &bytes),
                          "dm_update_workspace_size");
    at::Tensor duals = at::empty({with_duals ? batch : 0}, first.options().dtype(at::kDouble));
    DM_TORCH_CHECK_STATUS(dm_update(&config, dtype, batch, rows, cols, param_ptrs.data(),
                                    grad_ptrs.data(), buffer_ptrs.data(),
                                    with_duals ? duals.mutable_data_ptr<double>() : nullptr,
                                    workspace(bytes), bytes, &kAtenProvider),
                          "dm_update");
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
    const char *op = "dropmuon.muon_update_capturable_";
    TORCH_CHECK(hyperparameters.device().is_cpu() && status.device().is_cpu(), op,
                ": hyperparameters and status are on ", hyperparameters.device(), " and ",
                status.device(), ", this is the CPU kernel");
    TORCH_CHECK(hyperparameters.scalar_type() == at::kDouble && hyperparameters.numel() == 5, op,
                ": hyperparameters must be a float64 tensor of 5 values (lr, weight_decay, "
                "momentum, L0, L1), got ",
                hyperparameters.scalar_type(), " ", hyperparameters.sizes());
    TORCH_CHECK(status.scalar_type() == at::kInt && status.numel() == 1, op,
                ": status must be an int32 tensor of one element, got ", status.scalar_type(), " ",
                status.sizes());
    const int64_t batch = static_cast<int64_t>(params.size());
    TORCH_CHECK(grads.size() == params.size() && momentum_buffers.size() == params.size(), op,
                ": params, grads and momentum_buffers must have the same length, got ",
                params.size(), ", ", grads.size(), ", ", momentum_buffers.size());
    if (batch == 0) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor &first = params[0];
    TORCH_CHECK(first.device().is_cpu(), op, ": params[0] is on ", first.device(),
                ", this is the CPU kernel");
    const dm_dtype dtype = to_dm_dtype(first, "params[0]");
    check_tensor_list(params, first, "params", true);
    check_tensor_list(grads, first, "grads", false);
    check_tensor_list(momentum_buffers, first, "momentum_buffers", true);

    const std::vector<double> coefficients = ns_coefficients.vec();
    dm_update_config config{};
    config.sharp =
        make_sharp_config(norm, coefficients, norm_scale, norm_offset, eps, ns_precision);
    config.nesterov = nesterov ? 1 : 0;
    config.lr_adjust = parse_lr_adjust(adjust_lr_fn);
    config.radius = parse_radius(radius);
    config.radius_l0 = 1.0; // valid placeholders: everything but the five values is checked here
    const auto [rows, cols] = matrix_shape(first);
    size_t bytes = 0;
    DM_TORCH_CHECK_STATUS(dm_update_workspace_size(&config, dtype, batch, rows, cols, &bytes),
                          "dm_update_workspace_size");
    at::Tensor duals = at::full({with_duals ? batch : 0}, std::numeric_limits<double>::quiet_NaN(),
                                first.options().dtype(at::kDouble));
    int32_t *flag = status.mutable_data_ptr<int32_t>();
    if (*flag != 0) return duals;
    const at::Tensor values = hyperparameters.contiguous();
    const double *h = values.const_data_ptr<double>();
    config.lr = h[0];
    config.weight_decay = h[1];
    config.momentum = h[2];
    config.radius_l0 = h[3];
    config.radius_l1 = h[4];
    if (dm_update_workspace_size(&config, dtype, batch, rows, cols, &bytes) != DM_OK) {
        *flag = DM_ERR_INVALID_ARG; // only the five values can be wrong by now
        return duals;
    }
    std::vector<at::Tensor> grads_contiguous;
    std::vector<void *> param_ptrs(batch), buffer_ptrs(batch);
    std::vector<const void *> grad_ptrs(batch);
    for (int64_t i = 0; i < batch; ++i) {
        grads_contiguous.push_back(grads[i].contiguous());
        param_ptrs[i] = params[i].mutable_data_ptr();
        buffer_ptrs[i] = momentum_buffers[i].mutable_data_ptr();
        grad_ptrs[i] = grads_contiguous.back().const_data_ptr();
    }
    const dm_status st =
        dm_update(&config, dtype, batch, rows, cols, param_ptrs.data(), grad_ptrs.data(),
                  buffer_ptrs.data(), with_duals ? duals.mutable_data_ptr<double>() : nullptr,
                  workspace(bytes), bytes, &kAtenProvider);
    if (st == DM_ERR_NONFINITE) {
        *flag = st;
        return duals;
    }
    DM_TORCH_CHECK_STATUS(st, "dm_update");
    return duals;
}

} // namespace

TORCH_LIBRARY_IMPL(dropmuon, CPU, m) {
    m.impl("sharp", &sharp_cpu);
    m.impl("muon_update_", &muon_update_cpu);
    m.impl("muon_update_capturable_", &muon_update_capturable_cpu);
}

} // namespace dropmuon
