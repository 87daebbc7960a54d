// schemas.cpp - every dropmuon operator's schema, in one TORCH_LIBRARY block, plus the
// device-independent sampler operators. Device kernels live in cpu.cpp (and cuda/*.cu).
#include <Python.h>
#include <torch/library.h>

#include "dropmuon/aten/arguments.h"

extern "C" {
// An empty module, so that `import dropmuon._C` loads this library and registers the ops.
PyObject *PyInit__C(void) {
    static struct PyModuleDef module_def = {
        PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
    return PyModule_Create(&module_def);
}
}

namespace dropmuon {

static at::Tensor sampler_distribution(int64_t num_layers, const std::string &kind,
                                       at::ArrayRef<double> probabilities, int64_t tau,
                                       double progress, double shift_strength,
                                       at::ArrayRef<double> smoothness) {
    const std::vector<double> probs = probabilities.vec(), smooth = smoothness.vec();
    const dm_sampler_config config =
        make_sampler_config(num_layers, 0, kind, probs, tau, progress, shift_strength, smooth);
    at::Tensor out = at::empty({num_layers}, at::TensorOptions().dtype(at::kDouble));
    DMI_TORCH_CHECK_STATUS(dm_sampler_distribution(&config, out.data_ptr<double>()),
                           "dm_sampler_distribution");
    return out;
}

static at::Tensor sample_layers(int64_t num_layers, int64_t seed, int64_t step,
                                const std::string &kind, at::ArrayRef<double> probabilities,
                                int64_t tau, double progress, double shift_strength,
                                at::ArrayRef<double> smoothness) {
    TORCH_CHECK(step >= 0, "dropmuon: step must be >= 0, got ", step);
    const std::vector<double> probs = probabilities.vec(), smooth = smoothness.vec();
    const dm_sampler_config config =
        make_sampler_config(num_layers, seed, kind, probs, tau, progress, shift_strength, smooth);
    at::Tensor mask = at::empty({num_layers}, at::TensorOptions().dtype(at::kBool));
    static_assert(sizeof(bool) == sizeof(uint8_t), "bool tensors are one byte per element");
    DMI_TORCH_CHECK_STATUS(dm_sample_layers(&config, static_cast<uint64_t>(step),
                                            reinterpret_cast<uint8_t *>(mask.data_ptr<bool>()),
                                            nullptr),
                           "dm_sample_layers");
    return mask;
}

TORCH_LIBRARY(dropmuon, m) {
    // sharp(M) for a batch [B, rows, cols]: returns (sharp(M) in M's dtype, float64 duals [B],
    // or [0] without with_duals).
    m.def("sharp(Tensor input, str norm, float[] ns_coefficients, float norm_scale, "
          "float norm_offset, float eps, str ns_precision, bool with_duals=True) -> "
          "(Tensor, Tensor)");
    // One fused Muon step over same-shape tensors (modelled on aten::_fused_adamw_); returns
    // the float64 duals <D, sharp(D)> of the update directions ([0] without with_duals).
    m.def("muon_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
          "float lr, float weight_decay, float momentum, bool nesterov, str norm, "
          "float[] ns_coefficients, float norm_scale, float norm_offset, float eps, "
          "str ns_precision, str adjust_lr_fn, str radius, float L0, float L1, "
          "bool with_duals=False) -> Tensor");
    // Experimental: muon_update_ for CUDA-graph capture, with a CPU twin. No public Python API
    // exposes it (only the tests and the GPU benchmark call it), and it may change or go.
    // lr, weight_decay, momentum, L0 and L1 come from `hyperparameters` (float64 [5] in that
    // order, on the params' device, read when the step runs), and NaN/Inf or out-of-range
    // hyperparameters are reported into `status` (int32 [1]: set to the dm_status code, never
    // cleared) instead of raising, so nothing waits for the device. On such an error, or when
    // status is already nonzero, nothing is written (duals read NaN).
    m.def("_muon_update_capturable_(Tensor(a!)[] params, Tensor[] grads, "
          "Tensor(b!)[] momentum_buffers, Tensor hyperparameters, Tensor(c!) status, *, "
          "bool nesterov, str norm, float[] ns_coefficients, float norm_scale, "
          "float norm_offset, float eps, str ns_precision, str adjust_lr_fn, str radius, "
          "bool with_duals=False) -> Tensor");
    // P(cutoff = i) for each layer, float64 [num_layers].
    m.def("sampler_distribution(int num_layers, str kind, float[] probabilities, int tau, "
          "float progress, float shift_strength, float[] smoothness) -> Tensor");
    // The active-layer mask (bool [num_layers]) of optimizer step `step`.
    m.def("sample_layers(int num_layers, int seed, int step, str kind, float[] probabilities, "
          "int tau, float progress, float shift_strength, float[] smoothness) -> Tensor");
}

// The sampler takes no tensors, so no device key can route it: one implementation for all.
TORCH_LIBRARY_IMPL(dropmuon, CompositeExplicitAutograd, m) {
    m.impl("sampler_distribution", &sampler_distribution);
    m.impl("sample_layers", &sample_layers);
}

} // namespace dropmuon
