// cpu.cpp - the CPU's part of the dropmuon operators (dropmuon/aten/operators.h does the checks
// and configs): the C core, with torch's own BLAS (through ATen) as the matrix-product provider
// and its thread pool for the rest (dropmuon/aten/cpu_provider.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "dropmuon/aten/cpu_provider.h"
#include "dropmuon/aten/operators.h"

namespace dropmuon {
namespace {

struct Cpu {
    static constexpr at::DeviceType type = at::kCPU;

    static std::tuple<at::Tensor, at::Tensor> sharp(const dm_sharp_config &config,
                                                    const at::Tensor &input, bool with_duals) {
        SharpArgs args = gather_sharp_args(input, with_duals);
        size_t bytes = 0;
        DMI_TORCH_CHECK_STATUS(
            dm_sharp_workspace_size(&config, args.dtype, args.batch, args.rows, args.cols, &bytes),
            "dm_sharp_workspace_size");
        DMI_TORCH_CHECK_STATUS(
            dm_sharp(&config, args.dtype, args.batch, args.rows, args.cols, args.inputs.data(),
                     args.cols, args.outputs.data(), args.cols,
                     with_duals ? args.duals.mutable_data_ptr<double>() : nullptr,
                     cpu_workspace(bytes), bytes, cpu_provider()),
            "dm_sharp");
        return {args.out, args.duals};
    }

    static void check_not_capturing() {} // CPU calls are never captured

    static at::Tensor update(const dm_update_config &config, at::TensorList params,
                             at::TensorList grads, at::TensorList momentum_buffers,
                             bool with_duals) {
        const UpdateArgs args = gather_update_args(params, grads, momentum_buffers);
        at::Tensor duals = update_duals(params[0], args.batch, with_duals, false);
        DMI_TORCH_CHECK_STATUS(cpu_update(config, args, duals_or_null(duals)), "dm_update");
        return duals;
    }

    static void check_capturable_inputs(const at::Tensor &hyperparameters, const at::Tensor &status,
                                        const char *op) {
        TORCH_CHECK(hyperparameters.device().is_cpu() && status.device().is_cpu(), op,
                    ": hyperparameters and status are on ", hyperparameters.device(), " and ",
                    status.device(), ", this is the CPU kernel");
        check_capturable_tensors(hyperparameters, status, op, false);
    }

    // The values are read on the host; the checks of dm_update_workspace_size then tell a bad
    // value from a bad call (everything else was checked with placeholders, and raised).
    static at::Tensor update_capturable(dm_update_config config, at::TensorList params,
                                        at::TensorList grads, at::TensorList momentum_buffers,
                                        const at::Tensor &hyperparameters, const at::Tensor &status,
                                        bool with_duals) {
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
        if (dm_update_workspace_size(&config, args.dtype, args.batch, args.rows, args.cols,
                                     &bytes) != DM_OK) {
            *flag = DM_ERR_INVALID_ARG; // only the five values can be wrong by now
            return duals;
        }
        const dm_status st = cpu_update(config, args, duals_or_null(duals));
        if (st == DM_ERR_NONFINITE) {
            *flag = st;
            return duals;
        }
        DMI_TORCH_CHECK_STATUS(st, "dm_update");
        return duals;
    }
};

} // namespace

TORCH_LIBRARY_IMPL(dropmuon, CPU, m) { register_operators<Cpu>(m); }

} // namespace dropmuon
