// common.h - what every device file of the ATen shim shares: name -> enum parsing, tensor
// checks with messages that name the tensor, and status -> TORCH_CHECK.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <vector>

#include "dropmuon/dropmuon.h"

namespace dropmuon {

#define DMI_TORCH_CHECK_STATUS(call, name)                                                         \
    do {                                                                                           \
        dm_status st_ = (call);                                                                    \
        TORCH_CHECK(st_ == DM_OK, name " failed: ", dm_status_string(st_));                        \
    } while (0)

inline dm_norm parse_norm(const std::string &name) {
    if (name == "spectral") return DM_NORM_SPECTRAL;
    if (name == "sign") return DM_NORM_SIGN;
    if (name == "column") return DM_NORM_COLUMN;
    if (name == "row") return DM_NORM_ROW;
    if (name == "frobenius") return DM_NORM_FROBENIUS;
    TORCH_CHECK(false, "dropmuon: unknown norm '", name,
                "'; expected one of spectral, sign, column, row, frobenius");
}

inline dm_lr_adjust parse_lr_adjust(const std::string &name) {
    if (name == "none") return DM_LR_ADJUST_NONE;
    if (name == "original") return DM_LR_ADJUST_ORIGINAL;
    if (name == "match_rms_adamw") return DM_LR_ADJUST_MATCH_RMS_ADAMW;
    TORCH_CHECK(false, "dropmuon: unknown adjust_lr_fn '", name,
                "'; expected one of none, original, match_rms_adamw");
}

inline dm_radius parse_radius(const std::string &name) {
    if (name == "fixed") return DM_RADIUS_FIXED;
    if (name == "adaptive") return DM_RADIUS_ADAPTIVE;
    TORCH_CHECK(false, "dropmuon: unknown radius '", name, "'; expected fixed or adaptive");
}

inline dm_sampling parse_sampling(const std::string &name) {
    if (name == "full") return DM_SAMPLING_FULL;
    if (name == "uniform") return DM_SAMPLING_UNIFORM;
    if (name == "custom") return DM_SAMPLING_CUSTOM;
    if (name == "tau_nice") return DM_SAMPLING_TAU_NICE;
    if (name == "epoch_shift") return DM_SAMPLING_EPOCH_SHIFT;
    if (name == "cost_optimal") return DM_SAMPLING_COST_OPTIMAL;
    TORCH_CHECK(false, "dropmuon: unknown sampling '", name,
                "'; expected one of full, uniform, custom, tau_nice, epoch_shift, cost_optimal");
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

inline dm_ns_precision parse_ns_precision(const std::string &name) {
    if (name == "native") return DM_NS_NATIVE;
    if (name == "bfloat16") return DM_NS_BFLOAT16;
    TORCH_CHECK(false, "dropmuon: unknown ns_precision '", name, "'; expected native or bfloat16");
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
