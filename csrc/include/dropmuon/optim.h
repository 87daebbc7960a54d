// optim.h - DropMuon and Muon for LibTorch's C++ frontend (torch::optim), in the style of
// torch::optim::AdamW. Same numerics as the Python optimizer: the same C kernels (dm_update) on
// the same ATen products, and the same counter-based sampler, so a C++ run and a Python run with
// the same seed draw the same layers and, on the CPU, follow the same trajectory bit for bit.
//
//   auto net = std::make_shared<Net>();
//   dropmuon::DropMuon opt(*net, dropmuon::DropMuonOptions(0.02).sampling("uniform"));
//   for (auto &batch : loader) {
//       opt.zero_grad();
//       torch::nn::functional::cross_entropy(net->forward(batch.data), batch.target).backward();
//       opt.step();  // then the layers below the next cutoff stop requiring grad
//   }
//
// Layers. From a module: every submodule that directly holds trainable parameters is one layer,
// in registration order (a pre-order walk, as Python's named_modules). The C++ frontend has no
// forward hooks, so unlike the Python optimizer this order is never corrected by a first
// forward: register submodules input first. From param groups: a group's options may name its
// layer (DropMuonOptions::layer); layers are ordered by that value, input first; without it every
// group is one layer, in order. From a list of tensors: one layer each, in order.
//
// Truncation: after every step (and at construction) the parameters of layers the next step does
// not update get requires_grad(false), so the next backward stops at the cutoff by itself; they
// receive no gradient and stay unchanged. unfreeze() sets every managed parameter back.
//
// Not in the C++ frontend (the Python optimizer has them): cost_optimal sampling (it needs the
// online smoothness estimates), the adaptive radius, per-role norm overrides, nonfinite="skip",
// user-defined samplers, DDP helpers and the first-forward layer order.
#pragma once

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace dropmuon {

struct DropMuonOptions : public torch::optim::OptimizerCloneableOptions<DropMuonOptions> {
    DropMuonOptions(double lr = 1e-3);
    // Per group (a group's options apply as given, every field).
    TORCH_ARG(double, lr) = 1e-3;
    TORCH_ARG(double, momentum) = 0.95;
    TORCH_ARG(bool, nesterov) = true;
    TORCH_ARG(double, weight_decay) = 0.1; // decoupled, with the unadjusted lr (torch.optim.Muon)
    // Newton-Schulz: "muon" (3.4445, -4.7750, 2.0315) or "polar_express" (Amsel et al. 2025: its
    // 5 triples, more steps repeat the last; with its own input scaling), or "custom":
    // ns_coefficients holds one triple (repeated ns_steps times) or ns_steps triples.
    TORCH_ARG(std::string, ns_schedule) = "muon";
    TORCH_ARG(int64_t, ns_steps) = 5;
    TORCH_ARG(std::vector<double>, ns_coefficients) = {};
    TORCH_ARG(double, eps) = 1e-7;                     // lower bound of every divisor
    TORCH_ARG(std::string, adjust_lr_fn) = "original"; // or "match_rms_adamw" (spectral only)
    TORCH_ARG(std::string, ns_precision) = "bfloat16"; // or "native"
    // Vectors (0-D and 1-D parameters) use `fallback`, AdamW's settings below when "adamw".
    typedef std::tuple<double, double> betas_t;
    TORCH_ARG(betas_t, adamw_betas) = std::make_tuple(0.9, 0.999);
    TORCH_ARG(double, adamw_eps) = 1e-8;
    TORCH_ARG(double, adamw_lr_ratio) = 1.0; // AdamW's lr = lr * this (schedulers scale both)
    TORCH_ARG(int64_t, layer) = -1;          // param groups: the group's layer (-1: its own)

    // Optimizer-wide (read from the defaults; a group that differs is refused).
    TORCH_ARG(std::string, fallback) = "adamw"; // or "sign"
    // "uniform", "full" (Muon), "custom" (probabilities: P(cutoff = i), summing to 1),
    // "tau_nice" (tau layers per step), "epoch_shift" (total_steps, or set_progress()).
    TORCH_ARG(std::string, sampling) = "uniform";
    TORCH_ARG(std::vector<double>, probabilities) = {};
    TORCH_ARG(int64_t, tau) = 0;
    TORCH_ARG(int64_t, seed) = 0; // the sampler's key: same seed, same layers at the same step
    TORCH_ARG(int64_t, total_steps) = 0;     // epoch_shift: progress = step / total_steps (0: none)
    TORCH_ARG(double, shift_strength) = 4.0; // epoch_shift's tilt

  public:
    void serialize(torch::serialize::InputArchive &archive) override;
    void serialize(torch::serialize::OutputArchive &archive) const override;
    double get_lr() const override;
    void set_lr(const double lr) override;
};

// Per parameter, created on its first update: the momentum buffer (spectral and sign norms), or
// AdamW's step and moments (fallback "adamw").
struct DropMuonParamState : public torch::optim::OptimizerCloneableParamState<DropMuonParamState> {
    TORCH_ARG(torch::Tensor, momentum_buffer);
    TORCH_ARG(int64_t, step) = 0;
    TORCH_ARG(torch::Tensor, exp_avg);
    TORCH_ARG(torch::Tensor, exp_avg_sq);
};

class DropMuon : public torch::optim::Optimizer {
  public:
    // Every option is checked here, before any parameter is touched; bad ones throw
    // c10::Error with a torch-style message.
    DropMuon(torch::nn::Module &model, DropMuonOptions defaults = {});
    DropMuon(const std::vector<torch::optim::OptimizerParamGroup> &param_groups,
             DropMuonOptions defaults = {});
    DropMuon(std::vector<torch::Tensor> params, DropMuonOptions defaults = {});

    // Updates the active layers' parameters that have a gradient, then draws the next step's
    // layers and freezes the others. A NaN/Inf gradient throws before anything is modified.
    torch::Tensor step(LossClosure closure = nullptr) override;

    // The optimizer's state (momentum buffers, AdamW moments, step counter, update counts,
    // sampler progress) through torch::serialize: torch::save(opt, path) / torch::load(opt, path).
    // load checks the checkpoint against this optimizer (layers, shapes, sampler) first and
    // changes nothing when it does not match.
    void save(torch::serialize::OutputArchive &archive) const override;
    void load(torch::serialize::InputArchive &archive) override;

    // epoch_shift without total_steps: the fraction of training done, in [0, 1], from the
    // next draw on.
    void set_progress(double progress);
    // requires_grad back to true on every managed parameter; the next step freezes again.
    void unfreeze();

    int64_t num_layers() const { return static_cast<int64_t>(layer_names_.size()); }
    int64_t step_count() const { return step_; } // the index of the step about to run
    const std::vector<bool> &active_layers() const { return active_; } // input first
    int64_t cutoff() const; // the lowest layer the next step updates
    const std::vector<int64_t> &update_counts() const { return update_counts_; }
    const std::vector<std::string> &layer_names() const { return layer_names_; }
    int64_t layer_of_group(size_t group) const { return group_layer_.at(group); }

  private:
    void build(const std::vector<torch::optim::OptimizerParamGroup> &groups,
               const std::vector<std::string> &layer_names, const std::vector<int64_t> &group_layer,
               const std::vector<std::vector<std::string>> &param_names);
    void draw_and_freeze(int64_t step);

    std::vector<std::string> layer_names_;
    std::vector<int64_t> group_layer_;                  // layer position of param_groups()[g]
    std::vector<std::vector<std::string>> param_names_; // param_names_[g][i], for messages
    std::vector<bool> active_;
    std::vector<int64_t> update_counts_;
    int64_t step_ = 0;
    double progress_ = 0.0;
};

// Muon: DropMuon with sampling "full" (every layer, every step).
class Muon : public DropMuon {
  public:
    Muon(torch::nn::Module &model, DropMuonOptions defaults = {});
    Muon(const std::vector<torch::optim::OptimizerParamGroup> &param_groups,
         DropMuonOptions defaults = {});
    Muon(std::vector<torch::Tensor> params, DropMuonOptions defaults = {});
};

} // namespace dropmuon
