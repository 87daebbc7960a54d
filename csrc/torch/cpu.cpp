// cpu.cpp - CPU implementations of the dropmuon operators: checks, then the C core, with
// torch's own BLAS (through ATen) as the matrix-product provider and its thread pool for the rest
// (cpu_provider.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_provider.h"
#include "update_args.h"

namespace dropmuon {
namespace {
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
                                    cpu_workspace(bytes), bytes, cpu_provider()),
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
                     cpu_workspace(bytes), bytes, cpu_provider());
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
