// The layer sampler: Philox4x32-10 known answers through dm_random_uniform, determinism, every
// distribution against a hand-computed float64 expectation, empirical frequencies of
// dm_sample_layers, tau-nice subsets, masks, and one test per error code.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "reference.h"

namespace {

// ---- an independent Philox4x32-10 (Salmon et al., SC'11), checked against Random123's KATs ---

void philox_round(uint32_t ctr[4], const uint32_t key[2]) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * ctr[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * ctr[2];
    const uint32_t out[4] = {
        static_cast<uint32_t>(p1 >> 32) ^ ctr[1] ^ key[0], static_cast<uint32_t>(p1),
        static_cast<uint32_t>(p0 >> 32) ^ ctr[3] ^ key[1], static_cast<uint32_t>(p0)};
    for (int i = 0; i < 4; ++i) ctr[i] = out[i];
}

void philox4x32_10(uint32_t ctr[4], uint32_t key0, uint32_t key1) {
    uint32_t key[2] = {key0, key1};
    for (int r = 0; r < 10; ++r) {
        philox_round(ctr, key);
        key[0] += 0x9E3779B9u;
        key[1] += 0xBB67AE85u;
    }
}

// The documented mapping: key (seed lo, seed hi), counter (step lo, step hi, index lo, index
// hi), w = word0 << 32 | word1, value (w >> 11) * 2^-53.
double expected_uniform(uint64_t seed, uint64_t step, uint64_t index) {
    uint32_t ctr[4] = {static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                       static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32)};
    philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const uint64_t w = (uint64_t{ctr[0]} << 32) | ctr[1];
    return std::ldexp(static_cast<double>(w >> 11), -53);
}

double from_words(uint32_t word0, uint32_t word1) {
    const uint64_t w = (uint64_t{word0} << 32) | word1;
    return std::ldexp(static_cast<double>(w >> 11), -53);
}

TEST(Sampler, PhiloxKnownAnswers) {
    // Random123 kat_vectors, philox4x32 10: counter, key -> first two output words.
    EXPECT_EQ(dm_random_uniform(0, 0, 0), from_words(0x6627e8d5u, 0xe169c58du));
    EXPECT_EQ(dm_random_uniform(UINT64_MAX, UINT64_MAX, UINT64_MAX),
              from_words(0x408f276du, 0x41c83b0eu));
    EXPECT_EQ(
        dm_random_uniform(0x299f31d0a4093822ull, 0x85a308d3243f6a88ull, 0x0370734413198a2eull),
        from_words(0xd16cfe09u, 0x94fdccebu));
    // The test's own Philox agrees with the same answers...
    EXPECT_EQ(expected_uniform(0, 0, 0), from_words(0x6627e8d5u, 0xe169c58du));
    EXPECT_EQ(expected_uniform(0x299f31d0a4093822ull, 0x85a308d3243f6a88ull, 0x0370734413198a2eull),
              from_words(0xd16cfe09u, 0x94fdccebu));
    // ...and with the library on arbitrary inputs (every word of seed, step and index used).
    std::mt19937_64 rng(42);
    for (int trial = 0; trial < 2000; ++trial) {
        const uint64_t seed = rng(), step = rng() >> (trial % 64), index = rng() >> (trial % 61);
        ASSERT_EQ(dm_random_uniform(seed, step, index), expected_uniform(seed, step, index))
            << seed << " " << step << " " << index;
    }
}

TEST(Sampler, RandomUniformRange) {
    // In [0, 1), mean 1/2 and variance 1/12 within a few standard errors.
    const int n = 100000;
    double sum = 0.0, sum_sq = 0.0;
    for (int k = 0; k < n; ++k) {
        const double u = dm_random_uniform(7, static_cast<uint64_t>(k), 3);
        ASSERT_GE(u, 0.0);
        ASSERT_LT(u, 1.0);
        sum += u;
        sum_sq += u * u;
    }
    const double mean = sum / n, variance = sum_sq / n - mean * mean;
    EXPECT_NEAR(mean, 0.5, 5 * std::sqrt(1.0 / 12.0 / n));
    EXPECT_NEAR(variance, 1.0 / 12.0, 0.002);
}

dm_sampler_config sampler(dm_sampling kind, int64_t n, uint64_t seed = 1) {
    dm_sampler_config config{};
    config.kind = kind;
    config.num_layers = n;
    config.seed = seed;
    config.tau = 1;
    config.progress = 0.5;
    config.shift_strength = 4.0;
    return config;
}

TEST(Sampler, Deterministic) {
    // A draw is a function of (seed, step): repeated calls agree; other seeds and steps differ.
    const double smoothness[6] = {1, 2, 3, 4, 5, 6};
    for (dm_sampling kind : {DM_SAMPLING_UNIFORM, DM_SAMPLING_TAU_NICE, DM_SAMPLING_EPOCH_SHIFT,
                             DM_SAMPLING_COST_OPTIMAL}) {
        SCOPED_TRACE(static_cast<int>(kind));
        dm_sampler_config a = sampler(kind, 6, 123), b = sampler(kind, 6, 124);
        a.tau = b.tau = 3;
        a.smoothness = b.smoothness = smoothness;
        int differ_seed = 0, differ_step = 0;
        int64_t previous = -1;
        for (uint64_t step = 0; step < 1000; ++step) {
            uint8_t mask1[6], mask2[6], mask_other[6];
            int64_t cut1 = -1, cut2 = -2, cut_other = -3;
            ASSERT_EQ(dm_sample_layers(&a, step, mask1, &cut1), DM_OK);
            ASSERT_EQ(dm_sample_layers(&a, step, mask2, &cut2), DM_OK);
            ASSERT_EQ(dm_sample_layers(&b, step, mask_other, &cut_other), DM_OK);
            ASSERT_EQ(cut1, cut2);
            ASSERT_EQ(std::vector<uint8_t>(mask1, mask1 + 6),
                      std::vector<uint8_t>(mask2, mask2 + 6));
            differ_seed += std::vector<uint8_t>(mask1, mask1 + 6) !=
                           std::vector<uint8_t>(mask_other, mask_other + 6);
            differ_step += cut1 != previous;
            previous = cut1;
        }
        // Two independent draws coincide with probability <= 1/2 here (COST_OPTIMAL's largest
        // cutoff probability), so they differ far more often than 30% of the time.
        EXPECT_GT(differ_seed, 300);
        EXPECT_GT(differ_step, 300);
    }
}

double binomial(int64_t n, int64_t k) {
    if (k < 0 || k > n) return 0.0;
    double r = 1.0;
    for (int64_t j = 1; j <= k; ++j)
        r = r * static_cast<double>(n - k + j) / static_cast<double>(j);
    return r;
}

void expect_distribution(const dm_sampler_config &config, const std::vector<double> &expected) {
    std::vector<double> got(expected.size(), -1.0);
    ASSERT_EQ(dm_sampler_distribution(&config, got.data()), DM_OK);
    double sum = 0.0;
    for (size_t i = 0; i < expected.size(); ++i) {
        EXPECT_NEAR(got[i], expected[i], 1e-12) << "layer " << i;
        sum += got[i];
    }
    EXPECT_NEAR(sum, 1.0, 1e-12);
}

TEST(Sampler, DistributionFullUniformCustom) {
    expect_distribution(sampler(DM_SAMPLING_FULL, 5), {1, 0, 0, 0, 0});
    expect_distribution(sampler(DM_SAMPLING_FULL, 1), {1});
    expect_distribution(sampler(DM_SAMPLING_UNIFORM, 7), std::vector<double>(7, 1.0 / 7.0));
    dm_sampler_config custom = sampler(DM_SAMPLING_CUSTOM, 4);
    const double p[4] = {0.1, 0.0, 0.6, 0.3};
    custom.probabilities = p;
    expect_distribution(custom, {0.1, 0.0, 0.6, 0.3});
}

TEST(Sampler, DistributionTauNice) {
    // P(lowest chosen = i) = C(n - 1 - i, tau - 1) / C(n, tau).
    for (int64_t n : {1, 2, 6, 10})
        for (int64_t tau = 1; tau <= n; ++tau) {
            SCOPED_TRACE(testing::Message() << "n " << n << " tau " << tau);
            dm_sampler_config config = sampler(DM_SAMPLING_TAU_NICE, n);
            config.tau = tau;
            std::vector<double> expected;
            for (int64_t i = 0; i < n; ++i)
                expected.push_back(binomial(n - 1 - i, tau - 1) / binomial(n, tau));
            expect_distribution(config, expected);
        }
}

TEST(Sampler, DistributionEpochShift) {
    // P(i) proportional to exp(strength (2 progress - 1) i / (n - 1)).
    for (double strength : {0.0, 4.0, 10.0})
        for (double progress : {0.0, 0.25, 0.5, 1.0}) {
            SCOPED_TRACE(testing::Message() << "strength " << strength << " progress " << progress);
            dm_sampler_config config = sampler(DM_SAMPLING_EPOCH_SHIFT, 5);
            config.progress = progress;
            config.shift_strength = strength;
            std::vector<double> expected;
            double total = 0.0;
            for (int i = 0; i < 5; ++i) {
                expected.push_back(std::exp(strength * (2 * progress - 1) * i / 4.0));
                total += expected.back();
            }
            for (double &e : expected) e /= total;
            expect_distribution(config, expected);
            if (progress == 0.0 && strength > 0) {
                EXPECT_GT(expected[0], expected[4]); // shallow cutoffs dominate early
            }
        }
    // One layer: always layer 0. A huge strength: no overflow, all mass at one end.
    dm_sampler_config single = sampler(DM_SAMPLING_EPOCH_SHIFT, 1);
    expect_distribution(single, {1.0});
    for (double strength : {800.0, 6e199}) // exp(-tilt) underflows: once gave 0 / 0
        for (double progress : {0.0, 0.8, 1.0}) {
            SCOPED_TRACE(testing::Message()
                         << "one layer, strength " << strength << " progress " << progress);
            single.shift_strength = strength;
            single.progress = progress;
            expect_distribution(single, {1.0});
            int64_t cutoff = -1;
            ASSERT_EQ(dm_sample_layers(&single, 3, nullptr, &cutoff), DM_OK);
            EXPECT_EQ(cutoff, 0);
        }
    dm_sampler_config steep = sampler(DM_SAMPLING_EPOCH_SHIFT, 3);
    steep.shift_strength = 1e6;
    steep.progress = 0.0;
    expect_distribution(steep, {1.0, 0.0, 0.0});
    steep.progress = 1.0;
    expect_distribution(steep, {0.0, 0.0, 1.0});
}

TEST(Sampler, DistributionCostOptimal) {
    // P(i) = (R_i - R_{i-1}) / R_last with the running maximum R.
    dm_sampler_config config = sampler(DM_SAMPLING_COST_OPTIMAL, 5);
    const double l1[5] = {1, 3, 2, 5, 4};
    config.smoothness = l1;
    expect_distribution(config, {0.2, 0.4, 0.0, 0.4, 0.0});
    const double l2[3] = {0, 0, 2};
    config.num_layers = 3;
    config.smoothness = l2;
    expect_distribution(config, {0.0, 0.0, 1.0});
    const double l3[3] = {5, 1, 1}; // the input layer dominates: full updates (Muon) are optimal
    config.smoothness = l3;
    expect_distribution(config, {1.0, 0.0, 0.0});
}

// Draws `draws` steps, checks each mask against its cutoff and the cutoff frequencies against
// the distribution (within 5 standard errors; never a zero-probability layer).
void check_frequencies(const dm_sampler_config &config, int draws = 200000) {
    const int64_t n = config.num_layers;
    std::vector<double> p(static_cast<size_t>(n));
    ASSERT_EQ(dm_sampler_distribution(&config, p.data()), DM_OK);
    std::vector<int64_t> counts(static_cast<size_t>(n), 0);
    std::vector<uint8_t> mask(static_cast<size_t>(n));
    for (int step = 0; step < draws; ++step) {
        int64_t cutoff = -1;
        ASSERT_EQ(dm_sample_layers(&config, static_cast<uint64_t>(step), mask.data(), &cutoff),
                  DM_OK);
        ASSERT_GE(cutoff, 0);
        ASSERT_LT(cutoff, n);
        ++counts[static_cast<size_t>(cutoff)];
        if (config.kind == DM_SAMPLING_TAU_NICE) {
            int64_t active = 0, lowest = -1;
            for (int64_t i = 0; i < n; ++i)
                if (mask[static_cast<size_t>(i)]) {
                    ++active;
                    if (lowest < 0) lowest = i;
                }
            ASSERT_EQ(active, config.tau);
            ASSERT_EQ(lowest, cutoff);
        } else {
            for (int64_t i = 0; i < n; ++i)
                ASSERT_EQ(mask[static_cast<size_t>(i)], i >= cutoff ? 1 : 0) << "layer " << i;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        const double pi = p[static_cast<size_t>(i)];
        const double freq = static_cast<double>(counts[static_cast<size_t>(i)]) / draws;
        if (pi == 0.0) {
            EXPECT_EQ(counts[static_cast<size_t>(i)], 0) << "layer " << i;
        } else {
            EXPECT_NEAR(freq, pi, 5 * std::sqrt(pi * (1 - pi) / draws)) << "layer " << i;
        }
    }
}

TEST(Sampler, EmpiricalFrequencies) {
    const double custom[6] = {0.05, 0.25, 0.0, 0.4, 0.1, 0.2};
    const double smoothness[6] = {0.5, 2.0, 1.0, 3.0, 3.0, 4.0};
    check_frequencies(sampler(DM_SAMPLING_FULL, 6));
    check_frequencies(sampler(DM_SAMPLING_UNIFORM, 6));
    dm_sampler_config c = sampler(DM_SAMPLING_CUSTOM, 6);
    c.probabilities = custom;
    check_frequencies(c);
    c = sampler(DM_SAMPLING_TAU_NICE, 6);
    c.tau = 2;
    check_frequencies(c);
    for (double progress : {0.0, 0.5, 1.0}) {
        c = sampler(DM_SAMPLING_EPOCH_SHIFT, 6);
        c.progress = progress;
        check_frequencies(c);
    }
    c = sampler(DM_SAMPLING_COST_OPTIMAL, 6);
    c.smoothness = smoothness;
    check_frequencies(c);
}

TEST(Sampler, TauNiceSubsetsUniform) {
    // Every tau-subset of n layers equally likely: n = 5, tau = 2 gives 10 subsets of 1/10.
    dm_sampler_config config = sampler(DM_SAMPLING_TAU_NICE, 5, 99);
    config.tau = 2;
    const int draws = 200000;
    std::map<int, int> counts;
    uint8_t mask[5];
    for (int step = 0; step < draws; ++step) {
        ASSERT_EQ(dm_sample_layers(&config, static_cast<uint64_t>(step), mask, nullptr), DM_OK);
        int key = 0, active = 0;
        for (int i = 0; i < 5; ++i) {
            key |= mask[i] << i;
            active += mask[i];
        }
        ASSERT_EQ(active, 2);
        ++counts[key];
    }
    EXPECT_EQ(counts.size(), 10u);
    const double sigma = std::sqrt(0.1 * 0.9 / draws);
    for (const auto &kv : counts)
        EXPECT_NEAR(static_cast<double>(kv.second) / draws, 0.1, 5 * sigma)
            << "subset " << kv.first;
    // tau = n: every layer, always; tau = 1: exactly one.
    config.tau = 5;
    int64_t cutoff = -1;
    ASSERT_EQ(dm_sample_layers(&config, 3, mask, &cutoff), DM_OK);
    EXPECT_EQ(cutoff, 0);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(mask[i], 1);
    config.tau = 1;
    for (uint64_t step = 0; step < 100; ++step) {
        ASSERT_EQ(dm_sample_layers(&config, step, mask, &cutoff), DM_OK);
        int active = 0;
        for (int i = 0; i < 5; ++i) active += mask[i];
        EXPECT_EQ(active, 1);
        EXPECT_EQ(mask[cutoff], 1);
    }
}

TEST(Sampler, MaskAndCutoffOptional) {
    // Either output may be NULL; the other is the same as when both are asked for.
    const double smoothness[5] = {1, 2, 3, 4, 5};
    for (dm_sampling kind : {DM_SAMPLING_FULL, DM_SAMPLING_UNIFORM, DM_SAMPLING_TAU_NICE,
                             DM_SAMPLING_EPOCH_SHIFT, DM_SAMPLING_COST_OPTIMAL}) {
        dm_sampler_config config = sampler(kind, 5, 5);
        config.tau = 3;
        config.smoothness = smoothness;
        for (uint64_t step = 0; step < 50; ++step) {
            uint8_t both_mask[5], mask_only[5];
            int64_t both_cutoff = -1, cutoff_only = -1;
            ASSERT_EQ(dm_sample_layers(&config, step, both_mask, &both_cutoff), DM_OK);
            ASSERT_EQ(dm_sample_layers(&config, step, mask_only, nullptr), DM_OK);
            ASSERT_EQ(dm_sample_layers(&config, step, nullptr, &cutoff_only), DM_OK);
            ASSERT_EQ(dm_sample_layers(&config, step, nullptr, nullptr), DM_OK);
            EXPECT_EQ(cutoff_only, both_cutoff);
            for (int i = 0; i < 5; ++i) EXPECT_EQ(mask_only[i], both_mask[i]);
        }
    }
}

// ---- one test per error code ----------------------------------------------------------------

void expect_sampler_error(const dm_sampler_config &config, dm_status expected, const char *what) {
    SCOPED_TRACE(what);
    std::vector<double> p(16, -1.0);
    EXPECT_EQ(dm_sampler_distribution(&config, p.data()), expected);
    uint8_t mask[16];
    int64_t cutoff = -1;
    EXPECT_EQ(dm_sample_layers(&config, 0, mask, &cutoff), expected);
}

// Each array of bad values, and NULL, as the `field` array of a 3-layer `kind` sampler: `expected`.
void expect_bad_arrays(dm_sampling kind, const double *dm_sampler_config::*field,
                       const std::vector<std::vector<double>> &bad, dm_status expected,
                       const char *what, const char *what_null) {
    for (const auto &values : bad) {
        dm_sampler_config config = sampler(kind, 3);
        config.*field = values.data();
        expect_sampler_error(config, expected, what);
    }
    dm_sampler_config config = sampler(kind, 3);
    config.*field = nullptr;
    expect_sampler_error(config, expected, what_null);
}

TEST(Sampler, ErrProbability) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    const std::vector<std::vector<double>> bad = {{-0.1, 0.6, 0.5}, {nan, 0.5, 0.5},
                                                  {inf, 0.0, 0.0},  {0.3, 0.3, 0.41},
                                                  {0.3, 0.3, 0.39}, {0.0, 0.0, 0.0}};
    expect_bad_arrays(DM_SAMPLING_CUSTOM, &dm_sampler_config::probabilities, bad,
                      DM_ERR_PROBABILITY, "bad custom probabilities", "NULL custom probabilities");
    // Within 1e-6 of 1 is accepted as given (not renormalised).
    dm_sampler_config config = sampler(DM_SAMPLING_CUSTOM, 3);
    const double close[3] = {0.2, 0.3, 0.5 + 5e-7};
    config.probabilities = close;
    std::vector<double> out(3);
    ASSERT_EQ(dm_sampler_distribution(&config, out.data()), DM_OK);
    EXPECT_EQ(out[2], 0.5 + 5e-7);
}

TEST(Sampler, ErrInvalidArg) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    for (int64_t n : {0, -1}) {
        expect_sampler_error(sampler(DM_SAMPLING_UNIFORM, n), DM_ERR_INVALID_ARG, "num_layers < 1");
        expect_sampler_error(sampler(DM_SAMPLING_FULL, n), DM_ERR_INVALID_ARG, "num_layers < 1");
    }
    {
        dm_sampler_config config = sampler(DM_SAMPLING_UNIFORM, 4);
        dmtest::set_raw_enum(&config.kind, 6);
        expect_sampler_error(config, DM_ERR_INVALID_ARG, "unknown kind");
    }
    for (int64_t tau : {int64_t{0}, int64_t{-1}, int64_t{5}}) {
        dm_sampler_config config = sampler(DM_SAMPLING_TAU_NICE, 4);
        config.tau = tau;
        expect_sampler_error(config, DM_ERR_INVALID_ARG, "tau outside [1, n]");
    }
    for (double progress : {-0.1, 1.1, nan}) {
        dm_sampler_config config = sampler(DM_SAMPLING_EPOCH_SHIFT, 4);
        config.progress = progress;
        expect_sampler_error(config, DM_ERR_INVALID_ARG, "progress outside [0, 1]");
    }
    for (double strength : {-1.0, nan, inf}) {
        dm_sampler_config config = sampler(DM_SAMPLING_EPOCH_SHIFT, 4);
        config.shift_strength = strength;
        expect_sampler_error(config, DM_ERR_INVALID_ARG, "shift_strength negative or non-finite");
    }
    const std::vector<std::vector<double>> bad_smoothness = {
        {1.0, -1.0, 2.0}, {1.0, nan, 2.0}, {1.0, inf, 2.0}, {0.0, 0.0, 0.0}};
    expect_bad_arrays(DM_SAMPLING_COST_OPTIMAL, &dm_sampler_config::smoothness, bad_smoothness,
                      DM_ERR_INVALID_ARG, "bad smoothness", "NULL smoothness");
    // NULL config; NULL output of the distribution.
    double p[4];
    uint8_t mask[4];
    EXPECT_EQ(dm_sampler_distribution(nullptr, p), DM_ERR_INVALID_ARG);
    EXPECT_EQ(dm_sample_layers(nullptr, 0, mask, nullptr), DM_ERR_INVALID_ARG);
    const dm_sampler_config uniform = sampler(DM_SAMPLING_UNIFORM, 4);
    EXPECT_EQ(dm_sampler_distribution(&uniform, nullptr), DM_ERR_INVALID_ARG);
}

} // namespace
