// checkpoint.cpp - DropMuon::save / load through torch::serialize: the optimizer's own keys
// (format version, layers, sampler, step, update counts, each group's options, each
// parameter's shape and state), all read and checked before anything is adopted.
#include <c10/util/StringUtil.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "dropmuon/optim.h"
#include "options_checks.h"

namespace dropmuon {
namespace {

using detail::check_group_options;
using detail::check_same_sampling;
using detail::options_of;

// Keys of the checkpoint section (save/load).
constexpr int64_t kFormatVersion = 1;
std::string param_key(size_t index, const char *what) {
    return "dropmuon/param/" + std::to_string(index) + "/" + what;
}

} // namespace

void DropMuon::save(torch::serialize::OutputArchive &archive) const {
    const DropMuonOptions &o = static_cast<const DropMuonOptions &>(*defaults_);
    archive.write("dropmuon/version", c10::IValue(kFormatVersion));
    archive.write("dropmuon/layer_names", c10::IValue(layer_names_));
    archive.write("dropmuon/group_layers", c10::IValue(group_layer_));
    archive.write("dropmuon/sampling", c10::IValue(o.sampling()));
    archive.write("dropmuon/seed", c10::IValue(o.seed()));
    archive.write("dropmuon/step", c10::IValue(step_));
    archive.write("dropmuon/progress", c10::IValue(progress_));
    archive.write("dropmuon/update_counts", c10::IValue(update_counts_));
    for (size_t g = 0; g < param_groups_.size(); ++g) {
        torch::serialize::OutputArchive group(archive.compilation_unit());
        param_groups_[g].options().serialize(group);
        archive.write("dropmuon/group/" + std::to_string(g), group);
    }
    size_t index = 0;
    for (const auto &group : param_groups_) {
        for (const auto &p : group.params()) {
            archive.write(param_key(index, "shape"), c10::IValue(p.sizes().vec()));
            auto it = state_.find(p.unsafeGetTensorImpl());
            if (it != state_.end()) {
                const auto &s = static_cast<const DropMuonParamState &>(*it->second);
                if (s.momentum_buffer().defined())
                    archive.write(param_key(index, "momentum_buffer"), s.momentum_buffer(), true);
                if (s.exp_avg().defined()) {
                    archive.write(param_key(index, "exp_avg"), s.exp_avg(), true);
                    archive.write(param_key(index, "exp_avg_sq"), s.exp_avg_sq(), true);
                    archive.write(param_key(index, "adamw_step"), c10::IValue(s.step()));
                }
            }
            ++index;
        }
    }
}

void DropMuon::load(torch::serialize::InputArchive &archive) {
    const DropMuonOptions &o = static_cast<const DropMuonOptions &>(*defaults_);
    c10::IValue value;
    TORCH_CHECK(archive.try_read("dropmuon/version", value),
                "DropMuon.load: not a DropMuon checkpoint (no dropmuon/version)");
    TORCH_CHECK(value.toInt() == kFormatVersion, "DropMuon.load: checkpoint format ", value.toInt(),
                ", this build reads ", kFormatVersion);
    // Read and check everything first: a mismatch throws with nothing changed.
    auto read = [&](const char *key) {
        c10::IValue v;
        archive.read(key, v);
        return v;
    };
    const auto names = read("dropmuon/layer_names").to<std::vector<std::string>>();
    TORCH_CHECK(names == layer_names_, "DropMuon.load: the checkpoint has ", names.size(),
                " layers (", c10::Join(", ", names), "), this optimizer ", layer_names_.size(),
                " (", c10::Join(", ", layer_names_), ")");
    TORCH_CHECK(read("dropmuon/group_layers").to<std::vector<int64_t>>() == group_layer_,
                "DropMuon.load: the checkpoint's param groups belong to other layers");
    const std::string sampling = read("dropmuon/sampling").toStringRef();
    const int64_t seed = read("dropmuon/seed").toInt();
    TORCH_CHECK(sampling == o.sampling() && seed == o.seed(),
                "DropMuon.load: the checkpoint samples \"", sampling, "\" with seed ", seed,
                ", this optimizer \"", o.sampling(), "\" with seed ", o.seed());
    const int64_t step = read("dropmuon/step").toInt();
    const double progress = read("dropmuon/progress").toDouble();
    const auto counts = read("dropmuon/update_counts").to<std::vector<int64_t>>();
    std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;
    for (size_t g = 0; g < param_groups_.size(); ++g) {
        torch::serialize::InputArchive group;
        TORCH_CHECK(archive.try_read("dropmuon/group/" + std::to_string(g), group),
                    "DropMuon.load: the checkpoint has fewer param groups than this optimizer (",
                    param_groups_.size(), ")");
        auto loaded = std::make_unique<DropMuonOptions>(options_of(param_groups_[g]));
        loaded->serialize(group);
        check_group_options(*loaded);
        check_same_sampling(*loaded, o, g);
        options.push_back(std::move(loaded));
    }
    struct Loaded {
        void *key;
        DropMuonParamState state;
        bool any = false;
    };
    std::vector<Loaded> loaded;
    size_t index = 0;
    for (size_t g = 0; g < param_groups_.size(); ++g) {
        for (size_t i = 0; i < param_groups_[g].params().size(); ++i, ++index) {
            const torch::Tensor &p = param_groups_[g].params()[i];
            c10::IValue shape;
            TORCH_CHECK(archive.try_read(param_key(index, "shape"), shape),
                        "DropMuon.load: the checkpoint has no parameter ", index, " ('",
                        param_names_[g][i], "')");
            TORCH_CHECK(shape.to<std::vector<int64_t>>() == p.sizes().vec(),
                        "DropMuon.load: parameter '", param_names_[g][i], "' has shape ", p.sizes(),
                        ", the checkpoint's ", shape.to<std::vector<int64_t>>());
            Loaded entry{p.unsafeGetTensorImpl(), {}};
            torch::Tensor t;
            if (archive.try_read(param_key(index, "momentum_buffer"), t, true)) {
                TORCH_CHECK(t.sizes() == p.sizes() && t.scalar_type() == p.scalar_type(),
                            "DropMuon.load: the momentum buffer of '", param_names_[g][i],
                            "' does not match the parameter");
                entry.state.momentum_buffer(t.contiguous());
                entry.any = true;
            }
            torch::Tensor m, v;
            if (archive.try_read(param_key(index, "exp_avg"), m, true)) {
                archive.read(param_key(index, "exp_avg_sq"), v, true);
                TORCH_CHECK(m.sizes() == p.sizes() && v.sizes() == p.sizes(),
                            "DropMuon.load: the AdamW moments of '", param_names_[g][i],
                            "' do not match the parameter");
                entry.state.exp_avg(m).exp_avg_sq(v);
                entry.state.step(read(param_key(index, "adamw_step").c_str()).toInt());
                entry.any = true;
            }
            loaded.push_back(std::move(entry));
        }
    }
    c10::IValue extra;
    TORCH_CHECK(!archive.try_read(param_key(index, "shape"), extra),
                "DropMuon.load: the checkpoint has more parameters than this optimizer (", index,
                ")");
    // All checked: adopt it.
    state_.clear();
    for (auto &entry : loaded)
        if (entry.any) state_[entry.key] = std::make_unique<DropMuonParamState>(entry.state);
    for (size_t g = 0; g < param_groups_.size(); ++g)
        param_groups_[g].set_options(std::move(options[g]));
    update_counts_ = counts;
    progress_ = progress;
    draw_and_freeze(step);
}

} // namespace dropmuon
