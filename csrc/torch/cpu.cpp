// cpu.cpp - CPU implementations of the dropmuon operators: checks, then the C core, with
// torch's own BLAS (through ATen) as the matrix-product provider.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace dropmuon {
namespace {

// dm_gemm_fn over ATen: views the caller's buffers as strided tensors and lets baddbmm/addmm
// pick the BLAS path (MKL or OpenBLAS in torch's build, with torch's thread pool).
dm_status aten_gemm(void *, dm_dtype dtype, int trans_a, int trans_b, int64_t batch, int64_t m,
                    int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                    int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b, double beta,
                    void *c, int64_t ldc, int64_t stride_c) {
    try {
        const auto options = at::TensorOptions().dtype(
            dtype == DM_FLOAT64 ? at::kDouble : dtype == DM_BFLOAT16 ? at::kBFloat16 : at::kFloat);
        auto view = [&](const void *p, int64_t rows, int64_t cols, int64_t ld, int64_t stride,
                        bool transpose) {
            at::Tensor t = at::from_blob(const_cast<void *>(p), {batch, rows, cols},
                                         {stride, ld, 1}, options);
            return transpose ? t.transpose(1, 2) : t;
        };
        at::Tensor A = view(a, trans_a ? k : m, trans_a ? m : k, lda, stride_a, trans_a);
        at::Tensor B = view(b, trans_b ? n : k, trans_b ? k : n, ldb, stride_b, trans_b);
        at::Tensor C = view(c, m, n, ldc, stride_c, false);
        if (batch == 1) {
            at::Tensor C0 = C.select(0, 0);
            C0.addmm_(A.select(0, 0), B.select(0, 0), beta, alpha);
        } else {
            C.baddbmm_(A, B, beta, alpha);
        }
        return DM_OK;
    } catch (const std::exception &) {
        return DM_ERR_GEMM;
    }
}

const dm_gemm_provider kAtenGemm = {&aten_gemm, nullptr};

at::Tensor workspace(size_t bytes, const at::Tensor &like) {
    return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> sharp_cpu(const at::Tensor &input, const std::string &norm,
                                             at::ArrayRef<double> ns_coefficients,
                                             double norm_scale, double norm_offset, double eps,
                                             const std::string &ns_precision) {
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
    at::Tensor duals = at::empty({batch}, in.options().dtype(at::kDouble));
    size_t bytes = 0;
    DM_TORCH_CHECK_STATUS(dm_sharp_workspace_size(&config, dtype, batch, rows, cols, &bytes),
                          "dm_sharp_workspace_size");
    at::Tensor ws = workspace(bytes, in);

    const size_t elem = in.element_size(), stride = static_cast<size_t>(rows * cols) * elem;
    std::vector<const void *> inputs(batch);
    std::vector<void *> outputs(batch);
    for (int64_t i = 0; i < batch; ++i) {
        inputs[i] = static_cast<const char *>(in.const_data_ptr()) + i * stride;
        outputs[i] = static_cast<char *>(out.mutable_data_ptr()) + i * stride;
    }
    DM_TORCH_CHECK_STATUS(dm_sharp(&config, dtype, batch, rows, cols, inputs.data(), cols,
                                   outputs.data(), cols, duals.mutable_data_ptr<double>(),
                                   ws.mutable_data_ptr(), bytes, &kAtenGemm),
                          "dm_sharp");
    return {out, duals};
}

at::Tensor muon_update_cpu(at::TensorList params, at::TensorList grads,
                           at::TensorList momentum_buffers, double lr, double weight_decay,
                           double momentum, bool nesterov, const std::string &norm,
                           at::ArrayRef<double> ns_coefficients, double norm_scale,
                           double norm_offset, double eps, const std::string &ns_precision,
                           const std::string &adjust_lr_fn,
                           const std::string &radius, double L0, double L1) {
    const int64_t batch = static_cast<int64_t>(params.size());
    TORCH_CHECK(grads.size() == params.size() && momentum_buffers.size() == params.size(),
                "dropmuon.muon_update_: params, grads and momentum_buffers must have the same "
                "length, got ",
                params.size(), ", ", grads.size(), ", ", momentum_buffers.size());
    if (batch == 0) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor &first = params[0];
    TORCH_CHECK(first.device().is_cpu(), "dropmuon.muon_update_: params[0] is on ",
                first.device(), ", this is the CPU kernel");
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
    at::Tensor ws = workspace(bytes, first);
    at::Tensor duals = at::empty({batch}, first.options().dtype(at::kDouble));
    DM_TORCH_CHECK_STATUS(dm_update(&config, dtype, batch, rows, cols, param_ptrs.data(),
                                    grad_ptrs.data(), buffer_ptrs.data(),
                                    duals.mutable_data_ptr<double>(), ws.mutable_data_ptr(), bytes,
                                    &kAtenGemm),
                          "dm_update");
    return duals;
}

} // namespace

TORCH_LIBRARY_IMPL(dropmuon, CPU, m) {
    m.impl("sharp", &sharp_cpu);
    m.impl("muon_update_", &muon_update_cpu);
}

} // namespace dropmuon
