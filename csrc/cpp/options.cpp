// options.cpp - DropMuonOptions (serialization, lr access) and its checks (options_checks.h).
#include <torch/optim/serialize.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cmath>

#include "dropmuon/aten/arguments.h"
#include "options_checks.h"

namespace dropmuon {

// -- options ------------------------------------------------------------------------------------

DropMuonOptions::DropMuonOptions(double lr) : lr_(lr) {}

double DropMuonOptions::get_lr() const { return lr(); }
void DropMuonOptions::set_lr(const double lr) { this->lr(lr); }

void DropMuonOptions::serialize(torch::serialize::OutputArchive &archive) const {
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_schedule);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_steps);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_coefficients);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adjust_lr_fn);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_precision);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adamw_betas);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adamw_eps);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adamw_lr_ratio);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(layer);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(fallback);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(sampling);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(probabilities);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(tau);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(total_steps);
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(shift_strength);
}

void DropMuonOptions::serialize(torch::serialize::InputArchive &archive) {
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, ns_schedule);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, ns_steps);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::vector<double>, ns_coefficients);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, adjust_lr_fn);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, ns_precision);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, adamw_betas);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, adamw_eps);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, adamw_lr_ratio);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, layer);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, fallback);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, sampling);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::vector<double>, probabilities);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, tau);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, total_steps);
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, shift_strength);
}

namespace detail {

using torch::optim::OptimizerParamGroup;

const DropMuonOptions &options_of(const OptimizerParamGroup &group) {
    return static_cast<const DropMuonOptions &>(group.options());
}

Schedule resolve_schedule(const DropMuonOptions &o) {
    TORCH_CHECK(o.ns_steps() >= 0, "Invalid ns_steps value: ", o.ns_steps());
    Schedule s;
    const auto steps = static_cast<size_t>(o.ns_steps());
    if (o.ns_schedule() == "muon" || o.ns_schedule() == "polar_express") {
        TORCH_CHECK(o.ns_coefficients().empty(),
                    "ns_coefficients apply to ns_schedule \"custom\", ", "not \"", o.ns_schedule(),
                    "\"");
        for (size_t j = 0; j < steps; ++j) {
            if (o.ns_schedule() == "muon") {
                s.coefficients.insert(s.coefficients.end(),
                                      {DM_MUON_NS_A, DM_MUON_NS_B, DM_MUON_NS_C});
            } else { // more steps than its 5 repeat the last triple
                const double *t = dm_polar_express_coefficients +
                                  3 * std::min<size_t>(j, DM_POLAR_EXPRESS_STEPS - 1);
                s.coefficients.insert(s.coefficients.end(), t, t + 3);
            }
        }
        if (o.ns_schedule() == "polar_express") s.norm_scale = 1.02, s.norm_offset = 1e-6;
        return s;
    }
    TORCH_CHECK(o.ns_schedule() == "custom", "Unsupported ns_schedule: \"", o.ns_schedule(),
                "\"; expected muon, polar_express or custom");
    const std::vector<double> &c = o.ns_coefficients();
    TORCH_CHECK(c.size() == 3 || c.size() == 3 * steps,
                "ns_schedule \"custom\" needs ns_coefficients of one (a, b, c) triple or ",
                o.ns_steps(), " triples (ns_steps), got ", c.size(), " values");
    for (double v : c) TORCH_CHECK(std::isfinite(v), "Invalid ns_coefficients value: ", v);
    for (size_t j = 0; j < (c.size() == 3 ? steps : 1); ++j)
        s.coefficients.insert(s.coefficients.end(), c.begin(), c.end());
    return s;
}

void check_group_options(const DropMuonOptions &o) {
    TORCH_CHECK(o.lr() >= 0, "Invalid learning rate: ", o.lr());
    TORCH_CHECK(o.momentum() >= 0 && o.momentum() <= 1, "Invalid momentum value: ", o.momentum());
    TORCH_CHECK(o.weight_decay() >= 0, "Invalid weight_decay value: ", o.weight_decay());
    TORCH_CHECK(o.eps() >= 0, "Invalid epsilon value: ", o.eps());
    TORCH_CHECK(o.adjust_lr_fn() == "original" || o.adjust_lr_fn() == "match_rms_adamw",
                "Unsupported adjust_lr_fn: \"", o.adjust_lr_fn(),
                "\"; expected original or match_rms_adamw");
    TORCH_CHECK(o.ns_precision() == "bfloat16" || o.ns_precision() == "native",
                "Unsupported ns_precision: \"", o.ns_precision(),
                "\"; expected bfloat16 or native");
    resolve_schedule(o);
    const auto [beta1, beta2] = o.adamw_betas();
    TORCH_CHECK(0 <= beta1 && beta1 < 1.0, "Invalid beta parameter at index 0: ", beta1);
    TORCH_CHECK(0 <= beta2 && beta2 < 1.0, "Invalid beta parameter at index 1: ", beta2);
    TORCH_CHECK(o.adamw_eps() >= 0, "Invalid adamw_eps value: ", o.adamw_eps());
    TORCH_CHECK(o.adamw_lr_ratio() >= 0, "Invalid adamw_lr_ratio value: ", o.adamw_lr_ratio());
}

void check_sampling_options(const DropMuonOptions &o) {
    TORCH_CHECK(o.fallback() == "sign" || o.fallback() == "adamw", "Unsupported fallback: \"",
                o.fallback(), "\"; expected sign or adamw");
    TORCH_CHECK(o.sampling() != "cost_optimal",
                "sampling \"cost_optimal\" needs the online smoothness estimates, which only the "
                "Python optimizer computes; the C++ frontend has full, uniform, custom, tau_nice "
                "and epoch_shift");
    parse_sampling(o.sampling()); // names the accepted ones
    TORCH_CHECK(o.seed() >= 0, "Invalid seed value: ", o.seed(), " (expected >= 0)");
    TORCH_CHECK(o.total_steps() >= 0, "Invalid total_steps value: ", o.total_steps());
    TORCH_CHECK(std::isfinite(o.shift_strength()) && o.shift_strength() >= 0,
                "Invalid shift_strength value: ", o.shift_strength());
    TORCH_CHECK(o.sampling() == "custom" || o.probabilities().empty(),
                "probabilities apply to sampling \"custom\", not \"", o.sampling(), "\"");
    TORCH_CHECK(o.sampling() == "tau_nice" || o.tau() == 0, "tau applies to sampling ",
                "\"tau_nice\", not \"", o.sampling(), "\"");
}

void check_same_sampling(const DropMuonOptions &group, const DropMuonOptions &defaults,
                         size_t index) {
    const bool same =
        group.fallback() == defaults.fallback() && group.sampling() == defaults.sampling() &&
        group.probabilities() == defaults.probabilities() && group.tau() == defaults.tau() &&
        group.seed() == defaults.seed() && group.total_steps() == defaults.total_steps() &&
        group.shift_strength() == defaults.shift_strength();
    TORCH_CHECK(same, "param group ", index,
                ": fallback, sampling, probabilities, tau, seed, total_steps and shift_strength "
                "are optimizer-wide; set them in the defaults, not in a group's options");
}

} // namespace detail
} // namespace dropmuon
