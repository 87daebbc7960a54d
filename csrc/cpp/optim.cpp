// optim.cpp - dropmuon::DropMuon and dropmuon::Muon for LibTorch's C++ frontend (optim.h). The
// step is the Python optimizer's (python/dropmuon/optimizer.py): the same buckets of same-shape
// parameters into one dm_update call each, through the shim's own argument helpers and CPU
// update (dropmuon/aten/operators.h, cpu_provider.h), and the same sampler (dm_sample_layers).
#include "dropmuon/optim.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <utility>

#include "dropmuon/aten/cpu_provider.h"
#include "dropmuon/aten/operators.h"
#include "options_checks.h"

namespace dropmuon {

namespace {

using detail::check_group_options;
using detail::check_same_sampling;
using detail::check_sampling_options;
using detail::options_of;
using detail::resolve_schedule;
using detail::Schedule;
using torch::optim::OptimizerParamGroup;

// "spectral" for matrices and conv kernels (any tensor of 2 or more dimensions, seen as
// size(0) x numel/size(0)); vectors get the fallback, as in the Python optimizer.
std::string norm_of(const torch::Tensor &p, const std::string &fallback) {
    return p.dim() >= 2 ? "spectral" : fallback;
}

void check_param(const torch::Tensor &p, const std::string &name, const std::string &norm) {
    TORCH_CHECK(p.defined(), "DropMuon: parameter '", name, "' is undefined");
    TORCH_CHECK(!p.is_sparse(), "DropMuon does not support sparse parameters ('", name, "')");
    TORCH_CHECK(!p.is_complex(), "DropMuon does not support complex parameters ('", name, "')");
    TORCH_CHECK(p.device().is_cpu(), "DropMuon's C++ frontend runs on the CPU; parameter '", name,
                "' is on ", p.device());
    const auto t = p.scalar_type();
    TORCH_CHECK(norm == "adamw" ? at::isFloatingType(t)
                                : t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                "DropMuon: parameter '", name, "' has dtype ", t, "; the ", norm,
                " update takes float32, float64 or bfloat16");
}

void check_grad(const torch::Tensor &p, const torch::Tensor &g, const std::string &name) {
    TORCH_CHECK(!g.is_sparse(), "DropMuon does not support sparse gradients ('", name, "')");
    TORCH_CHECK(
        g.sizes() == p.sizes() && g.scalar_type() == p.scalar_type() && g.device() == p.device(),
        "DropMuon: the gradient of '", name, "' is ", g.scalar_type(), " ", g.sizes(), " on ",
        g.device(), ", its parameter ", p.scalar_type(), " ", p.sizes(), " on ", p.device());
}

// Every module that directly holds trainable parameters, in registration order (pre-order, as
// Python's named_modules); a parameter held by several modules belongs to the first.
void collect_layers(const torch::nn::Module &module, const std::string &prefix,
                    std::set<const void *> &owned, std::vector<OptimizerParamGroup> &groups,
                    std::vector<std::string> &layer_names,
                    std::vector<std::vector<std::string>> &param_names) {
    std::vector<torch::Tensor> params;
    std::vector<std::string> names;
    for (const auto &item : module.named_parameters(/*recurse=*/false)) {
        const torch::Tensor &p = item.value();
        if (!p.requires_grad() || !owned.insert(p.unsafeGetTensorImpl()).second) continue;
        params.push_back(p);
        names.push_back(prefix.empty() ? item.key() : prefix + "." + item.key());
    }
    if (!params.empty()) {
        groups.emplace_back(std::move(params));
        layer_names.push_back(prefix.empty() ? module.name() : prefix);
        param_names.push_back(std::move(names));
    }
    for (const auto &child : module.named_children())
        collect_layers(*child.value(), prefix.empty() ? child.key() : prefix + "." + child.key(),
                       owned, groups, layer_names, param_names);
}

// The names of param_groups()[g][i] when the user gave the groups.
std::vector<std::vector<std::string>>
group_param_names(const std::vector<OptimizerParamGroup> &groups) {
    std::vector<std::vector<std::string>> names(groups.size());
    for (size_t g = 0; g < groups.size(); ++g)
        for (size_t i = 0; i < groups[g].params().size(); ++i)
            names[g].push_back("param_groups[" + std::to_string(g) + "][" + std::to_string(i) +
                               "]");
    return names;
}

std::vector<OptimizerParamGroup> one_group_each(std::vector<torch::Tensor> params) {
    std::vector<OptimizerParamGroup> groups;
    for (auto &p : params) groups.emplace_back(std::vector<torch::Tensor>{p});
    return groups;
}

// Same-shape parameters whose update arguments are equal share one dm_update call, as
// dropmuon.functional.buckets gathers them (AdamW: one bucket per group).
struct Bucket {
    size_t group;
    std::string norm;
    std::vector<torch::Tensor> params;
};

bool same_call(const Bucket &b, const std::vector<OptimizerParamGroup> &groups, size_t group,
               const std::string &norm, const torch::Tensor &p) {
    if (b.norm != norm) return false;
    if (norm == "adamw") return b.group == group;
    const torch::Tensor &q = b.params.front();
    if (q.sizes() != p.sizes() || q.scalar_type() != p.scalar_type()) return false;
    const DropMuonOptions &x = options_of(groups[b.group]), &y = options_of(groups[group]);
    const Schedule sx = resolve_schedule(x), sy = resolve_schedule(y);
    return x.lr() == y.lr() && x.weight_decay() == y.weight_decay() &&
           x.momentum() == y.momentum() && x.nesterov() == y.nesterov() &&
           sx.coefficients == sy.coefficients && sx.norm_scale == sy.norm_scale &&
           sx.norm_offset == sy.norm_offset && x.eps() == y.eps() &&
           (norm != "spectral" || x.adjust_lr_fn() == y.adjust_lr_fn()) &&
           x.ns_precision() == y.ns_precision();
}

DropMuonParamState &
param_state(ska::flat_hash_map<void *, std::unique_ptr<torch::optim::OptimizerParamState>> &state,
            const torch::Tensor &p) {
    auto &slot = state[p.unsafeGetTensorImpl()];
    if (!slot) slot = std::make_unique<DropMuonParamState>();
    return static_cast<DropMuonParamState &>(*slot);
}

// One fused sharp update (dm_update) of a bucket in place; non-contiguous parameters go through
// a row-major copy that is written back (dropmuon.functional.sharp_update_).
void sharp_update(
    const Bucket &bucket, const DropMuonOptions &o,
    ska::flat_hash_map<void *, std::unique_ptr<torch::optim::OptimizerParamState>> &state) {
    std::vector<torch::Tensor> work, grads, buffers;
    for (const auto &p : bucket.params) {
        DropMuonParamState &s = param_state(state, p);
        if (!s.momentum_buffer().defined())
            s.momentum_buffer(torch::zeros_like(p, at::MemoryFormat::Contiguous));
        work.push_back(p.is_contiguous() ? p : p.contiguous());
        grads.push_back(p.grad());
        buffers.push_back(s.momentum_buffer());
    }
    const Schedule schedule = resolve_schedule(o);
    const dm_update_config config = make_update_config(
        schedule.coefficients, o.lr(), o.weight_decay(), o.momentum(), o.nesterov(), bucket.norm,
        schedule.norm_scale, schedule.norm_offset, o.eps(), o.ns_precision(),
        bucket.norm == "spectral" ? o.adjust_lr_fn() : "none", "fixed", 1.0, 0.0);
    check_update_lists(work, grads, buffers, "DropMuon.step", at::kCPU);
    const UpdateArgs args = gather_update_args(work, grads, buffers);
    DMI_TORCH_CHECK_STATUS(cpu_update(config, args, nullptr), "dm_update");
    for (size_t i = 0; i < work.size(); ++i)
        if (!work[i].is_same(bucket.params[i])) bucket.params[i].copy_(work[i]);
}

// torch.optim.AdamW's arithmetic, as dropmuon.adamw.adamw_step_ does it (same operations in the
// same order, so the same bits).
void adamw_update(
    const Bucket &bucket, const DropMuonOptions &o,
    ska::flat_hash_map<void *, std::unique_ptr<torch::optim::OptimizerParamState>> &state) {
    const double lr = o.lr() * o.adamw_lr_ratio();
    const auto [beta1, beta2] = o.adamw_betas();
    for (const auto &p : bucket.params) {
        DropMuonParamState &s = param_state(state, p);
        if (!s.exp_avg().defined()) {
            s.exp_avg(torch::zeros_like(p, at::MemoryFormat::Preserve));
            s.exp_avg_sq(torch::zeros_like(p, at::MemoryFormat::Preserve));
        }
        s.step(s.step() + 1);
        const double step = static_cast<double>(s.step());
        const torch::Tensor &g = p.grad();
        p.mul_(1 - lr * o.weight_decay());
        s.exp_avg().lerp_(g, 1 - beta1);
        s.exp_avg_sq().mul_(beta2).addcmul_(g, g, 1 - beta2);
        const double bias1 = 1 - std::pow(beta1, step), bias2 = 1 - std::pow(beta2, step);
        const torch::Tensor denom = (s.exp_avg_sq().sqrt() / std::sqrt(bias2)).add_(o.adamw_eps());
        p.addcdiv_(s.exp_avg(), denom, -lr / bias1);
    }
}

} // namespace

// -- construction -------------------------------------------------------------------------------

DropMuon::DropMuon(torch::nn::Module &model, DropMuonOptions defaults)
    : Optimizer(std::vector<OptimizerParamGroup>{}, std::make_unique<DropMuonOptions>(defaults)) {
    std::set<const void *> owned;
    std::vector<OptimizerParamGroup> groups;
    std::vector<std::string> layer_names;
    std::vector<std::vector<std::string>> param_names;
    collect_layers(model, "", owned, groups, layer_names, param_names);
    TORCH_CHECK(!groups.empty(), model.name(), " has no trainable parameters");
    std::vector<int64_t> positions(groups.size());
    for (size_t i = 0; i < groups.size(); ++i) positions[i] = static_cast<int64_t>(i);
    build(groups, layer_names, positions, param_names);
}

DropMuon::DropMuon(const std::vector<OptimizerParamGroup> &param_groups, DropMuonOptions defaults)
    : Optimizer(std::vector<OptimizerParamGroup>{}, std::make_unique<DropMuonOptions>(defaults)) {
    TORCH_CHECK(!param_groups.empty(), "optimizer got an empty parameter list");
    // Layers: the groups' layer values, ordered (input first); or one layer per group.
    std::vector<int64_t> keys;
    size_t with_layer = 0;
    for (size_t g = 0; g < param_groups.size(); ++g) {
        const int64_t layer =
            param_groups[g].has_options() ? options_of(param_groups[g]).layer() : -1;
        with_layer += layer >= 0;
        keys.push_back(layer >= 0 ? layer : static_cast<int64_t>(g));
    }
    TORCH_CHECK(with_layer == 0 || with_layer == param_groups.size(),
                "either every param group has a layer index (DropMuonOptions::layer) or none does");
    std::vector<int64_t> distinct(keys);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    std::vector<int64_t> positions;
    std::vector<std::string> layer_names;
    for (int64_t key : keys)
        positions.push_back(std::lower_bound(distinct.begin(), distinct.end(), key) -
                            distinct.begin());
    for (int64_t key : distinct) layer_names.push_back("layer " + std::to_string(key));
    build(param_groups, layer_names, positions, group_param_names(param_groups));
}

DropMuon::DropMuon(std::vector<torch::Tensor> params, DropMuonOptions defaults)
    : DropMuon(one_group_each(std::move(params)), std::move(defaults)) {}

void DropMuon::build(const std::vector<OptimizerParamGroup> &groups,
                     const std::vector<std::string> &layer_names,
                     const std::vector<int64_t> &group_layer,
                     const std::vector<std::vector<std::string>> &param_names) {
    const DropMuonOptions &defaults = static_cast<const DropMuonOptions &>(*defaults_);
    check_group_options(defaults);
    check_sampling_options(defaults);
    std::set<const void *> seen;
    for (size_t g = 0; g < groups.size(); ++g) {
        const DropMuonOptions &o = groups[g].has_options() ? options_of(groups[g]) : defaults;
        check_group_options(o);
        check_same_sampling(o, defaults, g);
        TORCH_CHECK(!groups[g].params().empty(), "param group ", g, " has no parameters");
        for (size_t i = 0; i < groups[g].params().size(); ++i) {
            const torch::Tensor &p = groups[g].params()[i];
            TORCH_CHECK(p.defined() && seen.insert(p.unsafeGetTensorImpl()).second,
                        "some parameters appear in more than one parameter group ('",
                        param_names[g][i], "')");
            check_param(p, param_names[g][i], norm_of(p, defaults.fallback()));
        }
    }
    TORCH_CHECK(
        defaults.sampling() != "tau_nice" ||
            (defaults.tau() >= 1 && defaults.tau() <= static_cast<int64_t>(layer_names.size())),
        "sampling \"tau_nice\" needs tau in [1, ", layer_names.size(), "] (the layers), got ",
        defaults.tau());
    layer_names_ = layer_names;
    group_layer_ = group_layer;
    param_names_ = param_names;
    update_counts_.assign(layer_names.size(), 0);
    // The base class would replace a group's options by the defaults (it merges only the option
    // types it knows): add each group, then give it its own options as they were given.
    for (const auto &group : groups) {
        add_param_group(OptimizerParamGroup(group.params()));
        if (group.has_options()) param_groups_.back().set_options(group.options().clone());
    }
    // Only now is the model touched: step 0's layers, the others frozen.
    draw_and_freeze(0);
}

Muon::Muon(torch::nn::Module &model, DropMuonOptions defaults)
    : DropMuon(model, [&] {
          TORCH_CHECK(defaults.sampling() == "uniform" || defaults.sampling() == "full",
                      "Muon always updates every layer; sampling \"", defaults.sampling(),
                      "\" does not apply");
          return defaults.sampling("full");
      }()) {}

Muon::Muon(const std::vector<OptimizerParamGroup> &param_groups, DropMuonOptions defaults)
    : DropMuon(param_groups, [&] {
          TORCH_CHECK(defaults.sampling() == "uniform" || defaults.sampling() == "full",
                      "Muon always updates every layer; sampling \"", defaults.sampling(),
                      "\" does not apply");
          return defaults.sampling("full");
      }()) {}

Muon::Muon(std::vector<torch::Tensor> params, DropMuonOptions defaults)
    : Muon(one_group_each(std::move(params)), std::move(defaults)) {}

// -- layers ---------------------------------------------------------------------------------------

void DropMuon::draw_and_freeze(int64_t step) {
    const DropMuonOptions &o = static_cast<const DropMuonOptions &>(*defaults_);
    const double progress =
        o.total_steps() > 0
            ? std::min(1.0, static_cast<double>(step) / static_cast<double>(o.total_steps()))
            : progress_;
    const std::vector<double> probabilities = o.probabilities(), no_smoothness;
    const dm_sampler_config config =
        make_sampler_config(num_layers(), o.seed(), o.sampling(), probabilities, o.tau(), progress,
                            o.shift_strength(), no_smoothness);
    std::vector<uint8_t> mask(layer_names_.size());
    DMI_TORCH_CHECK_STATUS(
        dm_sample_layers(&config, static_cast<uint64_t>(step), mask.data(), nullptr),
        "dm_sample_layers");
    active_.assign(mask.begin(), mask.end());
    step_ = step;
    for (size_t g = 0; g < param_groups_.size(); ++g) {
        const bool active = active_[group_layer_[g]];
        for (auto &p : param_groups_[g].params()) {
            p.requires_grad_(active);
            if (!active) p.mutable_grad().reset(); // frozen layers drop stale gradients
        }
    }
}

int64_t DropMuon::cutoff() const {
    return std::find(active_.begin(), active_.end(), true) - active_.begin();
}

void DropMuon::set_progress(double progress) {
    TORCH_CHECK(progress >= 0.0 && progress <= 1.0, "progress must be in [0, 1], got ", progress);
    progress_ = progress;
}

void DropMuon::unfreeze() {
    for (auto &group : param_groups_)
        for (auto &p : group.params()) p.requires_grad_(true);
}

// -- the step -----------------------------------------------------------------------------------

torch::Tensor DropMuon::step(LossClosure closure) {
    torch::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure) {
        at::AutoGradMode enable_grad(true);
        loss = closure();
    }
    const std::string &fallback = static_cast<const DropMuonOptions &>(*defaults_).fallback();
    // The active parameters with gradients, by layer in the order first met (as the Python
    // optimizer collects them), each checked before anything is modified.
    std::vector<int64_t> layers;
    std::map<int64_t, std::vector<std::pair<size_t, torch::Tensor>>> by_layer;
    for (size_t g = 0; g < param_groups_.size(); ++g) {
        const int64_t layer = group_layer_[g];
        if (!active_[layer]) continue;
        check_group_options(options_of(param_groups_[g]));
        for (size_t i = 0; i < param_groups_[g].params().size(); ++i) {
            const torch::Tensor &p = param_groups_[g].params()[i];
            if (!p.grad().defined()) continue;
            const std::string &name = param_names_[g][i];
            check_grad(p, p.grad(), name);
            TORCH_CHECK(at::isfinite(p.grad()).all().item<bool>(),
                        "DropMuon: non-finite gradient in parameter '", name, "' (layer ", layer,
                        ", ", layer_names_[layer], "); nothing was updated");
            if (by_layer.count(layer) == 0) layers.push_back(layer);
            by_layer[layer].emplace_back(g, p);
        }
    }
    std::vector<Bucket> buckets;
    for (int64_t layer : layers) {
        for (const auto &[g, p] : by_layer[layer]) {
            const std::string norm = norm_of(p, fallback);
            auto it = std::find_if(buckets.begin(), buckets.end(), [&](const Bucket &b) {
                return same_call(b, param_groups_, g, norm, p);
            });
            if (it == buckets.end()) it = buckets.insert(buckets.end(), Bucket{g, norm, {}});
            it->params.push_back(p);
        }
    }
    for (const Bucket &bucket : buckets) {
        const DropMuonOptions &o = options_of(param_groups_[bucket.group]);
        if (bucket.norm == "adamw")
            adamw_update(bucket, o, state_);
        else
            sharp_update(bucket, o, state_);
    }
    for (int64_t layer : layers) update_counts_[layer] += 1;
    draw_and_freeze(step_ + 1);
    return loss;
}

} // namespace dropmuon
