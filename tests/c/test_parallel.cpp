// The provider's parallel_for (dropmuon.h, dm_parallel_for_fn): with threads, dm_sharp and
// dm_update must give the very bits they give on one thread, however the ranges are cut, and
// must actually hand their O(mn) passes to the provider.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "reference.h"

namespace {

using dmtest::Buffer;
using dmtest::kDtypes;

// Runs body on ranges of `grain` (the smallest allowed), last range first, on up to 4 threads:
// a split unlike any thread pool's, so that a pass depending on the split shows.
struct SplittingThreads {
    std::atomic<int> calls{0};
    std::atomic<int64_t> covered{0};

    static void parallel_for(void *ctx, int64_t n, int64_t grain, dm_parallel_body body,
                             void *arg) {
        auto *self = static_cast<SplittingThreads *>(ctx);
        self->calls++;
        std::vector<std::pair<int64_t, int64_t>> ranges;
        for (int64_t begin = 0; begin < n; begin += grain)
            ranges.emplace_back(begin, std::min(n, begin + grain));
        std::reverse(ranges.begin(), ranges.end());
        std::atomic<size_t> next{0};
        auto worker = [&] {
            for (size_t r; (r = next++) < ranges.size();) {
                body(arg, ranges[r].first, ranges[r].second);
                self->covered += ranges[r].second - ranges[r].first;
            }
        };
        std::vector<std::thread> pool;
        for (int t = 0; t < 3; ++t) pool.emplace_back(worker);
        worker();
        for (std::thread &t : pool) t.join();
    }
};

// Above DMI_PARALLEL_GRAIN elements (32768) so that every pass splits; wide and tall.
const std::pair<int64_t, int64_t> kShapes[] = {{160, 300}, {420, 90}};

dm_sharp_config spectral_without_steps(double coefficients[15], dm_ns_precision precision) {
    dm_sharp_config config = dmtest::muon_config(coefficients);
    config.ns_steps = 0; // parallel_for does not run the products: X0 = M / d is the result
    config.ns_precision = precision;
    return config;
}

// body(dtype, precision, rows, cols) for every dtype, iteration precision and shape.
template <typename Body> void for_each_case(Body body) {
    for (dm_dtype dtype : kDtypes)
        for (dm_ns_precision precision : {DM_NS_NATIVE, DM_NS_BFLOAT16})
            for (auto [rows, cols] : kShapes) {
                SCOPED_TRACE(testing::Message() << dmtest::dtype_name(dtype) << " precision "
                                                << precision << " " << rows << "x" << cols);
                body(dtype, precision, rows, cols);
            }
}

TEST(ParallelFor, SharpGivesTheSameBitsOnThreads) {
    double coefficients[15];
    for_each_case([&](dm_dtype dtype, dm_ns_precision precision, int64_t rows, int64_t cols) {
        const dm_sharp_config config = spectral_without_steps(coefficients, precision);
        std::vector<Buffer> in;
        for (uint64_t b = 0; b < 2; ++b)
            in.push_back(dmtest::to_buffer(dmtest::random_normal(rows, cols, 7 + b), dtype, cols));
        const size_t n = static_cast<size_t>(rows * cols);
        std::vector<Buffer> serial{Buffer(dtype, n), Buffer(dtype, n)};
        std::vector<Buffer> threaded{Buffer(dtype, n), Buffer(dtype, n)};
        double serial_duals[2], threaded_duals[2];
        SplittingThreads threads;
        const dm_gemm_provider provider{nullptr, &threads, &SplittingThreads::parallel_for};
        ASSERT_EQ(
            dmtest::call_sharp(config, dtype, rows, cols, in, cols, serial, cols, serial_duals),
            DM_OK);
        ASSERT_EQ(dmtest::call_sharp(config, dtype, rows, cols, in, cols, threaded, cols,
                                     threaded_duals, &provider),
                  DM_OK);
        EXPECT_GT(threads.calls.load(), 0);
        for (int b = 0; b < 2; ++b) {
            EXPECT_EQ(serial[b].bytes(), threaded[b].bytes()) << "matrix " << b;
            EXPECT_EQ(std::memcmp(&serial_duals[b], &threaded_duals[b], sizeof(double)), 0)
                << serial_duals[b] << " vs " << threaded_duals[b];
        }
    });
}

TEST(ParallelFor, UpdateGivesTheSameBitsOnThreads) {
    double coefficients[15];
    for_each_case([&](dm_dtype dtype, dm_ns_precision precision, int64_t rows, int64_t cols) {
        dm_update_config config{};
        config.sharp = spectral_without_steps(coefficients, precision);
        config.lr = 0.05;
        config.weight_decay = 0.1;
        config.momentum = 0.9;
        config.nesterov = 1;
        config.lr_adjust = DM_LR_ADJUST_ORIGINAL;
        config.radius = DM_RADIUS_ADAPTIVE; // the duals' pass too
        config.radius_l0 = 1.0;
        config.radius_l1 = 0.5;
        struct State {
            std::vector<Buffer> params, grads, momentum;
        } runs[2];
        for (State &s : runs)
            for (uint64_t b = 0; b < 2; ++b) {
                s.params.push_back(
                    dmtest::to_buffer(dmtest::random_normal(rows, cols, 20 + b, 0.1), dtype, cols));
                s.grads.push_back(
                    dmtest::to_buffer(dmtest::random_normal(rows, cols, 30 + b), dtype, cols));
                s.momentum.push_back(
                    dmtest::to_buffer(dmtest::random_normal(rows, cols, 40 + b, 0.5), dtype, cols));
            }
        SplittingThreads threads;
        const dm_gemm_provider provider{nullptr, &threads, &SplittingThreads::parallel_for};
        double duals[2][2];
        for (int r = 0; r < 2; ++r) {
            State &s = runs[r];
            size_t bytes = 0;
            ASSERT_EQ(dm_update_workspace_size(&config, dtype, 2, rows, cols, &bytes), DM_OK);
            std::vector<unsigned char> workspace(bytes);
            std::vector<void *> x = dmtest::pointers(s.params), m = dmtest::pointers(s.momentum);
            std::vector<const void *> g = dmtest::const_pointers(s.grads);
            ASSERT_EQ(dm_update(&config, dtype, 2, rows, cols, x.data(), g.data(), m.data(),
                                duals[r], workspace.data(), bytes, r ? &provider : nullptr),
                      DM_OK);
        }
        // directions, momentum and parameters: one call per matrix each, plus the sharp
        EXPECT_GE(threads.calls.load(), 6);
        for (int b = 0; b < 2; ++b) {
            EXPECT_EQ(runs[0].params[b].bytes(), runs[1].params[b].bytes()) << b;
            EXPECT_EQ(runs[0].momentum[b].bytes(), runs[1].momentum[b].bytes()) << b;
            EXPECT_EQ(std::memcmp(&duals[0][b], &duals[1][b], sizeof(double)), 0) << b;
        }
    });
}

// A provider that covers the range exactly once: the ranges it was handed add up to n.
TEST(ParallelFor, RangesCoverEachIndexOnce) {
    double coefficients[15];
    const dm_sharp_config config = spectral_without_steps(coefficients, DM_NS_NATIVE);
    const int64_t rows = 160, cols = 300;
    std::vector<Buffer> in{
        dmtest::to_buffer(dmtest::random_normal(rows, cols, 3), DM_FLOAT32, cols)};
    std::vector<Buffer> out{Buffer(DM_FLOAT32, static_cast<size_t>(rows * cols))};
    SplittingThreads threads;
    const dm_gemm_provider provider{nullptr, &threads, &SplittingThreads::parallel_for};
    ASSERT_EQ(
        dmtest::call_sharp(config, DM_FLOAT32, rows, cols, in, cols, out, cols, nullptr, &provider),
        DM_OK);
    // Reads the input in place (wide, contiguous): sum of squares over 48000 elements in 2
    // chunks, the scaled copy (48000), the store (48000).
    EXPECT_EQ(threads.covered.load(), 2 + 48000 + 48000);
}

} // namespace
