// dropmuon/aten/arguments.h - operator arguments into the C API's, shared by the ATen shim
// (csrc/torch) and the C++ frontend (csrc/cpp): name -> enum parsing, tensor checks with
// messages that name the tensor, the configs, and status -> TORCH_CHECK.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "dropmuon/dropmuon.h"

namespace dropmuon {

#define DMI_TORCH_CHECK_STATUS(call, name)                                                         \
    do {                                                                                           \
        dm_status st_ = (call);                                                                    \
        TORCH_CHECK(st_ == DM_OK, name " failed: ", dm_status_string(st_));                        \
    } while (0)

// The enum value that `name` stands for: names lists the names of the values 0, 1, 2, ... in
// order (dropmuon.h numbers every enum so). An unknown name raises, listing them ("expected a or
// b", "expected one of a, b, c"); `what` is the argument's name.
template <typename Enum>
Enum parse_name(const std::string &name, const char *what,
                std::initializer_list<const char *> names) {
    int value = 0;
    for (const char *known : names) {
        if (name == known) return static_cast<Enum>(value);
        ++value;
    }
    std::string expected = names.size() == 2 ? "" : "one of ";
    const char *separator = "";
    for (const char *known : names) {
        expected = expected + separator + known;
        separator = names.size() == 2 ? " or " : ", ";
    }
    TORCH_CHECK(false, "dropmuon: unknown ", what, " '", name, "'; expected ", expected);
}

inline dm_norm parse_norm(const std::string &name) {
    return parse_name<dm_norm>(name, "norm", {"spectral", "sign", "column", "row", "frobenius"});
}

inline dm_lr_adjust parse_lr_adjust(const std::string &name) {
    return parse_name<dm_lr_adjust>(name, "adjust_lr_fn", {"none", "original", "match_rms_adamw"});
}

inline dm_radius parse_radius(const std::string &name) {
    return parse_name<dm_radius>(name, "radius", {"fixed", "adaptive"});
}

inline dm_sampling parse_sampling(const std::string &name) {
    return parse_name<dm_sampling>(
        name, "sampling", {"full", "uniform", "custom", "tau_nice", "epoch_shift", "cost_optimal"});
}

inline dm_ns_precision parse_ns_precision(const std::string &name) {
    return parse_name<dm_ns_precision>(name, "ns_precision", {"native", "bfloat16"});
}

inline dm_dtype to_dm_dtype(const at::Tensor &t, const char *what) {
    switch (t.scalar_type()) {
    case at::kFloat: return DM_FLOAT32;
    case at::kDouble: return DM_FLOAT64;
    case at::kBFloat16: return DM_BFLOAT16;
    default:
        TORCH_CHECK(false, "dropmuon: ", what, " has dtype ", t.scalar_type(),
                    "; expected float32, float64 or bfloat16");
    }
}

// A parameter of any rank seen as a matrix: (size(0), numel / size(0)), as docs/method.md
// section 4 flattens conv kernels (out, in*kh*kw); 0-D tensors are 1 x 1. Twin of
// dropmuon.reference.matrix_shape.
inline std::pair<int64_t, int64_t> matrix_shape(const at::Tensor &t) {
    if (t.dim() == 0) return {1, 1};
    const int64_t rows = t.size(0);
    return {rows, rows == 0 ? 0 : t.numel() / rows};
}

// Builds the sharp config; coefficients must outlive the config (it points into them).
inline dm_sharp_config make_sharp_config(const std::string &norm,
                                         const std::vector<double> &coefficients, double norm_scale,
                                         double norm_offset, double eps,
                                         const std::string &ns_precision) {
    dm_sharp_config config{};
    config.norm = parse_norm(norm);
    config.ns_precision = parse_ns_precision(ns_precision);
    TORCH_CHECK(coefficients.size() % 3 == 0,
                "dropmuon: ns_coefficients must hold whole (a, b, c) triples, got ",
                coefficients.size(), " values");
    config.ns_steps = static_cast<int64_t>(coefficients.size() / 3);
    config.ns_coefficients = coefficients.data();
    config.norm_scale = norm_scale;
    config.norm_offset = norm_offset;
    config.eps = eps;
    return config;
}

// Checks a list of same-shape tensors against the first one of `params`.
inline void check_tensor_list(at::TensorList list, const at::Tensor &like, const char *name,
                              bool must_be_contiguous) {
    for (size_t i = 0; i < list.size(); ++i) {
        const at::Tensor &t = list[i];
        TORCH_CHECK(t.defined(), "dropmuon: ", name, "[", i, "] is undefined");
        TORCH_CHECK(t.device() == like.device(), "dropmuon: ", name, "[", i, "] is on ", t.device(),
                    " but params[0] is on ", like.device());
        TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dropmuon: ", name, "[", i,
                    "] has dtype ", t.scalar_type(), " but params[0] has ", like.scalar_type());
        TORCH_CHECK(t.sizes() == like.sizes(), "dropmuon: ", name, "[", i, "] has shape ",
                    t.sizes(), " but params[0] has ", like.sizes(),
                    "; one call takes same-shape tensors");
        TORCH_CHECK(!t.is_complex(), "dropmuon: ", name, "[", i, "] is complex");
        TORCH_CHECK(!must_be_contiguous || t.is_contiguous(), "dropmuon: ", name, "[", i,
                    "] must be contiguous (it is updated in place)");
    }
}

// The sampler config from the op arguments; the vectors must outlive the config.
inline dm_sampler_config make_sampler_config(int64_t num_layers, int64_t seed,
                                             const std::string &kind,
                                             const std::vector<double> &probabilities, int64_t tau,
                                             double progress, double shift_strength,
                                             const std::vector<double> &smoothness) {
    TORCH_CHECK(num_layers >= 1, "dropmuon: num_layers must be >= 1, got ", num_layers);
    dm_sampler_config config{};
    config.kind = parse_sampling(kind);
    config.num_layers = num_layers;
    config.seed = static_cast<uint64_t>(seed);
    if (config.kind == DM_SAMPLING_CUSTOM) {
        TORCH_CHECK(static_cast<int64_t>(probabilities.size()) == num_layers,
                    "dropmuon: custom sampling needs one probability per layer: got ",
                    probabilities.size(), " for ", num_layers, " layers");
        config.probabilities = probabilities.data();
    }
    if (config.kind == DM_SAMPLING_COST_OPTIMAL) {
        TORCH_CHECK(static_cast<int64_t>(smoothness.size()) == num_layers,
                    "dropmuon: cost_optimal sampling needs one smoothness estimate per layer: got ",
                    smoothness.size(), " for ", num_layers, " layers");
        config.smoothness = smoothness.data();
    }
    config.tau = tau;
    config.progress = progress;
    config.shift_strength = shift_strength;
    return config;
}

} // namespace dropmuon
