// update_args.h - the device-independent half of the update operators (muon_update_ and the
// capturable one), shared by cpu.cpp and cuda.cu: argument checks, the dm_update_config, and
// the pointer arrays the C API takes. Each device file then does its own part: device guard
// and stream, workspace, the C call, the status.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace dropmuon {

// Checks an update's lists for the kernel of device type `kernel`: one gradient and one
// momentum buffer per parameter, params[0] on that device in a supported dtype, and every
// tensor like params[0] (params and buffers contiguous: they are updated in place). `op` names
// the operator in the messages. Returns false when the lists are empty: nothing to do.
inline bool check_update_lists(at::TensorList params, at::TensorList grads,
                               at::TensorList momentum_buffers, const char *op,
                               at::DeviceType kernel) {
    TORCH_CHECK(grads.size() == params.size() && momentum_buffers.size() == params.size(), op,
                ": params, grads and momentum_buffers must have the same length, got ",
                params.size(), ", ", grads.size(), ", ", momentum_buffers.size());
    if (params.empty()) return false;
    const at::Tensor &first = params[0];
    TORCH_CHECK(first.device().type() == kernel, op, ": params[0] is on ", first.device(),
                ", this is the ", c10::DeviceTypeName(kernel), " kernel");
    to_dm_dtype(first, "params[0]");
    check_tensor_list(params, first, "params", true);
    check_tensor_list(grads, first, "grads", false);
    check_tensor_list(momentum_buffers, first, "momentum_buffers", true);
    return true;
}

// Checks the capturable op's hyperparameters (float64, 5 values: lr, weight_decay, momentum,
// L0, L1) and status (int32, one element); their device is the device file's to check.
// contiguous: the kernel reads the values in place (CUDA) rather than from a contiguous copy.
inline void check_capturable_tensors(const at::Tensor &hyperparameters, const at::Tensor &status,
                                     const char *op, bool contiguous) {
    TORCH_CHECK(hyperparameters.scalar_type() == at::kDouble && hyperparameters.numel() == 5 &&
                    (!contiguous || hyperparameters.is_contiguous()),
                op, ": hyperparameters must be a ", contiguous ? "contiguous " : "",
                "float64 tensor of 5 values (lr, weight_decay, momentum, L0, L1), got ",
                hyperparameters.scalar_type(), " ", hyperparameters.sizes());
    TORCH_CHECK(status.scalar_type() == at::kInt && status.numel() == 1, op,
                ": status must be an int32 tensor of one element, got ", status.scalar_type(), " ",
                status.sizes());
}

// The update's config from the op arguments; coefficients must outlive it (it points into them).
inline dm_update_config make_update_config(const std::vector<double> &coefficients, double lr,
                                           double weight_decay, double momentum, bool nesterov,
                                           const std::string &norm, double norm_scale,
                                           double norm_offset, double eps,
                                           const std::string &ns_precision,
                                           const std::string &adjust_lr_fn,
                                           const std::string &radius, double L0, double L1) {
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
    return config;
}

// The capturable op's config: lr, weight_decay, momentum, L0 and L1 come from its
// hyperparameters tensor when the step runs; these placeholders only have to be valid, so that
// everything else is checked before then.
inline dm_update_config make_capturable_update_config(const std::vector<double> &coefficients,
                                                      bool nesterov, const std::string &norm,
                                                      double norm_scale, double norm_offset,
                                                      double eps, const std::string &ns_precision,
                                                      const std::string &adjust_lr_fn,
                                                      const std::string &radius) {
    return make_update_config(coefficients, 0.0, 0.0, 0.0, nesterov, norm, norm_scale, norm_offset,
                              eps, ns_precision, adjust_lr_fn, radius, 1.0, 0.0);
}

// The C API's arguments for checked, non-empty lists: params[0]'s dtype and matrix shape, and
// one pointer per tensor. Gradients are made contiguous; the copies live as long as this.
struct UpdateArgs {
    dm_dtype dtype;
    int64_t batch, rows, cols;
    std::vector<void *> params, momentum_buffers;
    std::vector<const void *> grads;
    std::vector<at::Tensor> contiguous_grads;
};

inline UpdateArgs gather_update_args(at::TensorList params, at::TensorList grads,
                                     at::TensorList momentum_buffers) {
    UpdateArgs args;
    args.dtype = to_dm_dtype(params[0], "params[0]");
    args.batch = static_cast<int64_t>(params.size());
    std::tie(args.rows, args.cols) = matrix_shape(params[0]);
    for (size_t i = 0; i < params.size(); ++i) {
        args.contiguous_grads.push_back(grads[i].contiguous());
        args.params.push_back(params[i].mutable_data_ptr());
        args.momentum_buffers.push_back(momentum_buffers[i].mutable_data_ptr());
        args.grads.push_back(args.contiguous_grads.back().const_data_ptr());
    }
    return args;
}

// The float64 duals an update returns, on params[0]'s device: [batch], or [0] without
// with_duals. nan_filled: the capturable op may write nothing, and its duals then read NaN,
// not garbage.
inline at::Tensor update_duals(const at::Tensor &first, int64_t batch, bool with_duals,
                               bool nan_filled) {
    const auto options = first.options().dtype(at::kDouble);
    const int64_t n = with_duals ? batch : 0;
    return nan_filled ? at::full({n}, std::numeric_limits<double>::quiet_NaN(), options)
                      : at::empty({n}, options);
}

// The duals' pointer for the C API: NULL without with_duals.
inline double *duals_or_null(at::Tensor &duals) {
    return duals.numel() > 0 ? duals.mutable_data_ptr<double>() : nullptr;
}

} // namespace dropmuon
