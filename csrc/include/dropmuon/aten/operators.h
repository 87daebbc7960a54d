// dropmuon/aten/operators.h - the tensor operators (sharp, muon_update_ and the capturable
// update), each written once for every device: schema arguments -> checks -> config -> the
// device's part. A device's part is a struct of static functions (Cpu in csrc/torch/cpu.cpp, Cuda
// in csrc/torch/cuda.cu) that takes its guard and stream, the workspace, calls C and turns the
// status into an error:
//   type                                     the at::DeviceType of its kernels
//   sharp(config, input, with_duals)         -> (out, duals)
//   check_not_capturing()                    raises where a synchronous update cannot run
//   update(config, params, grads, momentum_buffers, with_duals)                  -> duals
//   check_capturable_inputs(hyperparameters, status, op)     their device and layout
//   update_capturable(config, params, grads, momentum_buffers, hyperparameters, status,
//                     with_duals)                                                -> duals
// The helpers (checks, configs, the C API's pointer arrays) also serve the C++ frontend's step.
// register_operators<Device> (at the end) registers them all for a device.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "dropmuon/aten/arguments.h"

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

// The C API's arguments of sharp for a checked [batch, rows, cols] input: its contiguous copy,
// the outputs (out like it; float64 duals [batch], or [0] without with_duals) and one pointer per
// matrix into each. Allocates on the current device: a device's part takes its guard first.
struct SharpArgs {
    dm_dtype dtype;
    int64_t batch, rows, cols;
    at::Tensor in, out, duals;
    std::vector<const void *> inputs;
    std::vector<void *> outputs;
};

inline SharpArgs gather_sharp_args(const at::Tensor &input, bool with_duals) {
    SharpArgs args;
    args.dtype = to_dm_dtype(input, "input");
    args.in = input.contiguous();
    args.batch = args.in.size(0);
    args.rows = args.in.size(1);
    args.cols = args.in.size(2);
    args.out = at::empty_like(args.in);
    args.duals = at::empty({with_duals ? args.batch : 0}, args.in.options().dtype(at::kDouble));
    const size_t stride = static_cast<size_t>(args.rows * args.cols) * args.in.element_size();
    for (int64_t i = 0; i < args.batch; ++i) {
        args.inputs.push_back(static_cast<const char *>(args.in.const_data_ptr()) + i * stride);
        args.outputs.push_back(static_cast<char *>(args.out.mutable_data_ptr()) + i * stride);
    }
    return args;
}

// -- the operators, for TORCH_LIBRARY_IMPL(dropmuon, <device>, m) -------------------------------

template <class Device>
std::tuple<at::Tensor, at::Tensor> sharp(const at::Tensor &input, const std::string &norm,
                                         at::ArrayRef<double> ns_coefficients, double norm_scale,
                                         double norm_offset, double eps,
                                         const std::string &ns_precision, bool with_duals) {
    TORCH_CHECK(input.dim() == 3, "dropmuon.sharp: input must be [batch, rows, cols], got shape ",
                input.sizes());
    TORCH_CHECK(input.device().type() == Device::type, "dropmuon.sharp: input is on ",
                input.device(), ", this is the ", c10::DeviceTypeName(Device::type), " kernel");
    to_dm_dtype(input, "input"); // raises for a dtype the kernels do not take
    const std::vector<double> coefficients = ns_coefficients.vec();
    const dm_sharp_config config =
        make_sharp_config(norm, coefficients, norm_scale, norm_offset, eps, ns_precision);
    return Device::sharp(config, input, with_duals);
}

template <class Device>
at::Tensor muon_update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       double lr, double weight_decay, double momentum, bool nesterov,
                       const std::string &norm, at::ArrayRef<double> ns_coefficients,
                       double norm_scale, double norm_offset, double eps,
                       const std::string &ns_precision, const std::string &adjust_lr_fn,
                       const std::string &radius, double L0, double L1, bool with_duals) {
    if (!check_update_lists(params, grads, momentum_buffers, "dropmuon.muon_update_", Device::type))
        return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
    Device::check_not_capturing();
    const std::vector<double> coefficients = ns_coefficients.vec();
    const dm_update_config config =
        make_update_config(coefficients, lr, weight_decay, momentum, nesterov, norm, norm_scale,
                           norm_offset, eps, ns_precision, adjust_lr_fn, radius, L0, L1);
    return Device::update(config, params, grads, momentum_buffers, with_duals);
}

// muon_update_ with lr, weight_decay, momentum, L0 and L1 read from a float64 [5] tensor when the
// step runs, and NaN/Inf or out-of-range values reported into `status` (int32 [1]) instead of
// raised, so that nothing waits for the device (CUDA-graph capture; the CPU kernel is its twin).
// Nothing is written when status is nonzero on entry or an error is found.
template <class Device>
at::Tensor
muon_update_capturable(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       const at::Tensor &hyperparameters, const at::Tensor &status, bool nesterov,
                       const std::string &norm, at::ArrayRef<double> ns_coefficients,
                       double norm_scale, double norm_offset, double eps,
                       const std::string &ns_precision, const std::string &adjust_lr_fn,
                       const std::string &radius, bool with_duals) {
    const char *op = "dropmuon._muon_update_capturable_";
    Device::check_capturable_inputs(hyperparameters, status, op);
    if (!check_update_lists(params, grads, momentum_buffers, op, Device::type))
        return at::empty({0},
                         at::TensorOptions().dtype(at::kDouble).device(hyperparameters.device()));
    const at::Tensor &first = params[0];
    TORCH_CHECK(hyperparameters.device() == first.device() && status.device() == first.device(), op,
                ": hyperparameters (", hyperparameters.device(), ") and status (", status.device(),
                ") must be on params[0]'s device ", first.device());
    const std::vector<double> coefficients = ns_coefficients.vec();
    const dm_update_config config =
        make_capturable_update_config(coefficients, nesterov, norm, norm_scale, norm_offset, eps,
                                      ns_precision, adjust_lr_fn, radius);
    return Device::update_capturable(config, params, grads, momentum_buffers, hyperparameters,
                                     status, with_duals);
}

// Registers a device's part of every operator: TORCH_LIBRARY_IMPL(dropmuon, <key>, m) calls
// register_operators<Device>(m).
template <class Device> void register_operators(torch::Library &m) {
    m.impl("sharp", &sharp<Device>);
    m.impl("muon_update_", &muon_update<Device>);
    m.impl("_muon_update_capturable_", &muon_update_capturable<Device>);
}

} // namespace dropmuon
