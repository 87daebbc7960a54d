// options_checks.h - internal to the C++ frontend (csrc/cpp): the checks of DropMuonOptions and
// the Newton-Schulz schedule they resolve to, shared by the optimizer (optim.cpp) and its
// checkpoints (checkpoint.cpp).
#pragma once

#include <torch/optim/optimizer.h>

#include <vector>

#include "dropmuon/optim.h"

namespace dropmuon::detail {

const DropMuonOptions &options_of(const torch::optim::OptimizerParamGroup &group);

// A Newton-Schulz schedule resolved from the options: flat triples and the input scaling, as
// dropmuon.ops.ns_schedule resolves the Python optimizer's.
struct Schedule {
    std::vector<double> coefficients;
    double norm_scale = 1.0, norm_offset = 0.0;
};

Schedule resolve_schedule(const DropMuonOptions &o);

// The per-group checks (torch.optim's messages); run at construction and at every step, since a
// scheduler or the user may change a group's options in between.
void check_group_options(const DropMuonOptions &o);

// The optimizer-wide options, read from the defaults.
void check_sampling_options(const DropMuonOptions &o);

// Groups must agree with the defaults on what is optimizer-wide.
void check_same_sampling(const DropMuonOptions &group, const DropMuonOptions &defaults,
                         size_t index);

} // namespace dropmuon::detail
