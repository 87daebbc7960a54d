// GoogleTests of the C++ frontend's optimizer (csrc/include/dropmuon/optim.h) against LibTorch:
// its trajectory equals the Python optimizer's bit for bit (the fixture of make_fixture.py, named
// by DROPMUON_CPP_FIXTURE), frozen layers get no gradient and stay unchanged, save/load resumes
// bit for bit, and bad options throw with torch-style messages.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>

#include "dropmuon/optim.h"

namespace {

constexpr int64_t kSteps = 6, kBatch = 16; // make_fixture.py's STEPS and BATCH

// make_fixture.py's Net: the same layers registered in the same order.
struct NetImpl : torch::nn::Module {
    NetImpl() {
        conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)));
        conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 8, 3)));
        fc1 = register_module("fc1", torch::nn::Linear(72, 32));
        fc2 = register_module("fc2", torch::nn::Linear(32, 10));
    }
    torch::Tensor forward(torch::Tensor x) {
        x = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
        x = torch::relu(conv2->forward(x)).flatten(1);
        return fc2->forward(torch::relu(fc1->forward(x)));
    }
    torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
    torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

const c10::Dict<c10::IValue, c10::IValue> &fixture() {
    static const c10::Dict<c10::IValue, c10::IValue> dict = [] {
        const char *path = std::getenv("DROPMUON_CPP_FIXTURE");
        if (path == nullptr)
            throw std::runtime_error("DROPMUON_CPP_FIXTURE is not set: write the fixture with "
                                     "python3 tests/cpp/make_fixture.py FILE (scripts/test.sh "
                                     "does)");
        std::ifstream in(path, std::ios::binary);
        if (!in) throw std::runtime_error(std::string("cannot read the fixture ") + path);
        std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
        return torch::pickle_load(bytes).toGenericDict();
    }();
    return dict;
}

torch::Tensor get(const std::string &key) {
    const auto &dict = fixture();
    auto it = dict.find(key);
    if (it == dict.end()) throw std::runtime_error("the fixture has no '" + key + "'");
    return it->value().toTensor();
}

Net initial_net() {
    Net net;
    torch::NoGradGuard no_grad;
    for (auto &item : net->named_parameters()) item.value().copy_(get("init/" + item.key()));
    return net;
}

torch::Tensor batch(const char *what, int64_t step) {
    return get(what).narrow(0, step * kBatch, kBatch);
}

void train_step(Net &net, dropmuon::DropMuon &opt, int64_t step) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(batch("x", step)), batch("y", step))
        .backward();
    opt.step();
}

using Options = dropmuon::DropMuonOptions;

// make_fixture.py's CASES, built the same way.
std::unique_ptr<dropmuon::DropMuon> make_case(const std::string &name, Net &net) {
    if (name == "uniform")
        return std::make_unique<dropmuon::DropMuon>(
            *net, Options(0.02).sampling("uniform").seed(3).fallback("sign"));
    if (name == "muon") return std::make_unique<dropmuon::Muon>(*net, Options(0.02));
    if (name == "tau_nice_adamw")
        return std::make_unique<dropmuon::DropMuon>(*net, Options(0.03)
                                                              .sampling("tau_nice")
                                                              .tau(2)
                                                              .seed(5)
                                                              .fallback("adamw")
                                                              .nesterov(false)
                                                              .adamw_lr_ratio(0.001 / 0.03));
    if (name == "epoch_shift_polar")
        return std::make_unique<dropmuon::DropMuon>(*net, Options(0.02)
                                                              .sampling("epoch_shift")
                                                              .total_steps(kSteps)
                                                              .seed(1)
                                                              .weight_decay(0.05)
                                                              .ns_schedule("polar_express")
                                                              .adjust_lr_fn("match_rms_adamw")
                                                              .ns_precision("native"));
    if (name == "groups") {
        const Options defaults =
            Options(0.02).sampling("custom").probabilities({0.4, 0.3, 0.2, 0.1}).seed(7);
        auto group = [&](std::vector<torch::Tensor> params, int64_t layer, double lr) {
            return torch::optim::OptimizerParamGroup(
                std::move(params),
                std::make_unique<Options>(Options(defaults).layer(layer).lr(lr)));
        };
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.push_back(group({net->conv1->weight, net->conv1->bias}, 10, 0.02));
        groups.push_back(group({net->conv2->weight}, 20, 0.01));
        groups.push_back(group({net->conv2->bias}, 20, 0.02));
        groups.push_back(group({net->fc1->weight, net->fc1->bias}, 30, 0.02));
        groups.push_back(group({net->fc2->weight, net->fc2->bias}, 40, 0.02));
        return std::make_unique<dropmuon::DropMuon>(groups, defaults);
    }
    throw std::runtime_error("unknown case " + name);
}

std::vector<bool> as_mask(const torch::Tensor &t) {
    std::vector<bool> mask;
    for (int64_t i = 0; i < t.numel(); ++i) mask.push_back(t[i].item<bool>());
    return mask;
}

class PythonTrajectory : public testing::TestWithParam<std::string> {};

TEST_P(PythonTrajectory, EqualsBitForBit) {
    torch::set_num_threads(1); // as make_fixture.py
    Net net = initial_net();
    auto opt = make_case(GetParam(), net);
    for (int64_t step = 0; step < kSteps; ++step) {
        const std::string prefix = GetParam() + "/" + std::to_string(step);
        ASSERT_EQ(opt->active_layers(), as_mask(get(GetParam() + "/mask/" + std::to_string(step))))
            << "step " << step;
        train_step(net, *opt, step);
        for (const auto &item : net->named_parameters()) {
            const torch::Tensor expected = get(prefix + "/" + item.key());
            EXPECT_TRUE(torch::equal(item.value(), expected))
                << item.key() << " after step " << step << ": max |difference| "
                << (item.value() - expected).abs().max().item<double>();
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Cases, PythonTrajectory,
                         testing::Values("uniform", "muon", "tau_nice_adamw", "epoch_shift_polar",
                                         "groups"));

TEST(DropMuonCpp, FrozenLayersGetNoGradientAndStayUnchanged) {
    torch::set_num_threads(1);
    Net net = initial_net();
    dropmuon::DropMuon opt(*net, Options(0.02).sampling("uniform").seed(3));
    ASSERT_EQ(opt.num_layers(), 4);
    ASSERT_EQ(opt.layer_names(), (std::vector<std::string>{"conv1", "conv2", "fc1", "fc2"}));
    int64_t frozen_seen = 0;
    for (int64_t step = 0; step < kSteps; ++step) {
        const std::vector<bool> active = opt.active_layers();
        std::vector<torch::Tensor> before;
        for (const auto &p : net->parameters()) before.push_back(p.detach().clone());
        opt.zero_grad();
        torch::nn::functional::cross_entropy(net->forward(batch("x", step)), batch("y", step))
            .backward();
        size_t g = 0;
        for (const auto &group : opt.param_groups()) {
            const bool on = active[opt.layer_of_group(g++)];
            for (const auto &p : group.params()) {
                EXPECT_EQ(p.requires_grad(), on);
                EXPECT_EQ(p.grad().defined(), on) << "step " << step;
            }
        }
        opt.step();
        size_t i = 0;
        g = 0;
        for (const auto &group : opt.param_groups()) {
            const bool on = active[opt.layer_of_group(g++)];
            for (const auto &p : group.params()) {
                if (!on) {
                    EXPECT_TRUE(torch::equal(p, before[i])) << "frozen parameter moved";
                    ++frozen_seen;
                } else {
                    EXPECT_FALSE(torch::equal(p, before[i])) << "active parameter did not move";
                }
                ++i;
            }
        }
    }
    EXPECT_GT(frozen_seen, 0) << "no step froze a layer: the check above checked nothing";
    int64_t updates = 0;
    for (int64_t c : opt.update_counts()) updates += c;
    EXPECT_LT(updates, kSteps * opt.num_layers());
}

class Resume : public testing::TestWithParam<std::string> {};

TEST_P(Resume, SaveLoadEqualsTheUninterruptedRun) {
    torch::set_num_threads(1);
    Net straight = initial_net();
    auto uninterrupted = make_case(GetParam(), straight);
    for (int64_t step = 0; step < kSteps; ++step) train_step(straight, *uninterrupted, step);

    Net first = initial_net();
    auto before = make_case(GetParam(), first);
    for (int64_t step = 0; step < kSteps / 2; ++step) train_step(first, *before, step);
    std::stringstream model_bytes, optimizer_bytes;
    torch::save(first, model_bytes);
    torch::save(*before, optimizer_bytes);

    Net second; // fresh weights, replaced by the checkpoint's
    torch::load(second, model_bytes);
    auto after = make_case(GetParam(), second);
    torch::load(*after, optimizer_bytes);
    EXPECT_EQ(after->step_count(), kSteps / 2);
    EXPECT_EQ(after->active_layers(), before->active_layers());
    for (int64_t step = kSteps / 2; step < kSteps; ++step) train_step(second, *after, step);

    auto a = straight->named_parameters(), b = second->named_parameters();
    for (const auto &item : a) EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();
    EXPECT_EQ(after->update_counts(), uninterrupted->update_counts());
}

INSTANTIATE_TEST_SUITE_P(Cases, Resume,
                         testing::Values("uniform", "tau_nice_adamw", "epoch_shift_polar",
                                         "groups"));

// The message of the c10::Error that `build` throws.
std::string error_of(const std::function<void()> &build) {
    try {
        build();
    } catch (const c10::Error &e) {
        return e.what_without_backtrace();
    }
    return "(nothing thrown)";
}

#define EXPECT_ERROR(statement, text)                                                              \
    EXPECT_NE(error_of([&] { statement; }).find(text), std::string::npos)                          \
        << error_of([&] { statement; })

TEST(DropMuonCpp, InvalidOptionsThrowTorchStyleMessages) {
    Net net;
    using dropmuon::DropMuon;
    EXPECT_ERROR(DropMuon(*net, Options(-1.0)), "Invalid learning rate: -1");
    EXPECT_ERROR(DropMuon(*net, Options().momentum(1.5)), "Invalid momentum value: 1.5");
    EXPECT_ERROR(DropMuon(*net, Options().weight_decay(-0.1)), "Invalid weight_decay value: -0.1");
    EXPECT_ERROR(DropMuon(*net, Options().ns_steps(-2)), "Invalid ns_steps value: -2");
    EXPECT_ERROR(DropMuon(*net, Options().adjust_lr_fn("rms")),
                 "Unsupported adjust_lr_fn: \"rms\"");
    EXPECT_ERROR(DropMuon(*net, Options().ns_schedule("fast")),
                 "Unsupported ns_schedule: \"fast\"");
    EXPECT_ERROR(DropMuon(*net, Options().ns_schedule("custom").ns_coefficients({1.0, 2.0})),
                 "needs ns_coefficients of one (a, b, c) triple or 5 triples");
    EXPECT_ERROR(DropMuon(*net, Options().ns_coefficients({3.0, -4.0, 2.0})),
                 "ns_coefficients apply to ns_schedule \"custom\"");
    EXPECT_ERROR(DropMuon(*net, Options().fallback("adam")), "Unsupported fallback: \"adam\"");
    EXPECT_ERROR(DropMuon(*net, Options().sampling("random")), "unknown sampling 'random'");
    EXPECT_ERROR(DropMuon(*net, Options().sampling("cost_optimal")),
                 "only the Python optimizer computes");
    EXPECT_ERROR(DropMuon(*net, Options().sampling("tau_nice").tau(9)),
                 "needs tau in [1, 4] (the layers), got 9");
    EXPECT_ERROR(DropMuon(*net, Options().tau(2)), "tau applies to sampling \"tau_nice\"");
    EXPECT_ERROR(DropMuon(*net, Options().sampling("custom").probabilities({0.5, 0.5})),
                 "custom sampling needs one probability per layer: got 2 for 4 layers");
    EXPECT_ERROR(DropMuon(*net, Options().sampling("custom").probabilities({0.5, 0.5, 0.5, 0.5})),
                 "dm_sample_layers failed");
    EXPECT_ERROR(DropMuon(*net, Options().adamw_betas({0.9, 1.0})),
                 "Invalid beta parameter at index 1: 1");
    EXPECT_ERROR(dropmuon::Muon(*net, Options().sampling("tau_nice")),
                 "Muon always updates every layer");
    {
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(std::vector<torch::Tensor>{net->conv1->weight},
                            std::make_unique<Options>(Options().layer(0)));
        groups.emplace_back(std::vector<torch::Tensor>{net->conv2->weight});
        EXPECT_ERROR(DropMuon(groups, Options()), "either every param group has a layer index");
    }
    {
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(std::vector<torch::Tensor>{net->conv1->weight},
                            std::make_unique<Options>(Options().seed(4)));
        EXPECT_ERROR(DropMuon(groups, Options()), "are optimizer-wide");
    }
    EXPECT_ERROR(DropMuon(std::vector<torch::Tensor>{torch::zeros({3, 3}, torch::kInt32)}),
                 "has dtype Int");
    // Nothing was frozen by the refused constructions.
    for (const auto &p : net->parameters()) EXPECT_TRUE(p.requires_grad());
}

TEST(DropMuonCpp, SetProgressTiltsEpochShiftAndUnfreezeRestoresGradients) {
    torch::set_num_threads(1);
    // epoch_shift without total_steps: the progress set_progress gives. Progress 0 favours
    // shallow cutoffs (nearly full updates), progress 1 deep ones; the same seed otherwise.
    auto mean_cutoff = [](double progress) {
        Net net = initial_net();
        dropmuon::DropMuon opt(*net, Options(0.02).sampling("epoch_shift").seed(11));
        opt.set_progress(progress);
        double total = 0.0;
        for (int64_t step = 0; step < kSteps; ++step) {
            train_step(net, opt, step); // draws the next step's layers with this progress
            total += static_cast<double>(opt.cutoff());
        }
        return total / kSteps;
    };
    const double early = mean_cutoff(0.0), late = mean_cutoff(1.0);
    EXPECT_LT(early, late) << "progress 0: mean cutoff " << early << ", progress 1: " << late;
    Net net = initial_net();
    dropmuon::DropMuon opt(*net, Options(0.02).sampling("epoch_shift").seed(11));
    EXPECT_ERROR(opt.set_progress(1.5), "progress must be in [0, 1], got 1.5");

    Net fresh = initial_net();
    dropmuon::DropMuon frozen(*fresh, Options(0.02).sampling("custom").probabilities({0, 0, 0, 1}));
    EXPECT_FALSE(fresh->conv1->weight.requires_grad()); // only the head is active
    EXPECT_TRUE(fresh->fc2->weight.requires_grad());
    frozen.unfreeze();
    for (const auto &p : fresh->parameters()) EXPECT_TRUE(p.requires_grad());
}

TEST(DropMuonCpp, NonFiniteGradientThrowsBeforeAnythingChanges) {
    Net net = initial_net();
    dropmuon::Muon opt(*net, Options(0.02));
    opt.zero_grad();
    torch::nn::functional::cross_entropy(net->forward(batch("x", 0)), batch("y", 0)).backward();
    net->fc2->bias.mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
    std::vector<torch::Tensor> before;
    for (const auto &p : net->parameters()) before.push_back(p.detach().clone());
    EXPECT_ERROR(opt.step(), "non-finite gradient in parameter 'fc2.bias' (layer 3, fc2)");
    size_t i = 0;
    for (const auto &p : net->parameters()) EXPECT_TRUE(torch::equal(p, before[i++]));
    EXPECT_EQ(opt.step_count(), 0);
}

TEST(DropMuonCpp, LoadRefusesAnotherOptimizersCheckpointAndChangesNothing) {
    Net net = initial_net();
    dropmuon::DropMuon saved(*net, Options(0.02).sampling("uniform").seed(3));
    train_step(net, saved, 0);
    std::stringstream bytes;
    torch::save(saved, bytes);

    Net other = initial_net();
    dropmuon::DropMuon different_seed(*other, Options(0.02).sampling("uniform").seed(4));
    const std::vector<bool> active = different_seed.active_layers();
    EXPECT_ERROR(torch::load(different_seed, bytes), "samples \"uniform\" with seed 3");
    EXPECT_EQ(different_seed.step_count(), 0);
    EXPECT_EQ(different_seed.active_layers(), active);
    EXPECT_TRUE(different_seed.state().empty());

    bytes.clear();
    bytes.seekg(0);
    dropmuon::DropMuon fewer_layers(std::vector<torch::Tensor>{other->fc1->weight},
                                    Options(0.02).sampling("uniform").seed(3));
    EXPECT_ERROR(torch::load(fewer_layers, bytes), "the checkpoint has 4 layers");
}

} // namespace
