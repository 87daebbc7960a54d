// dm_update against a float64 reference of the documented formula (dropmuon.h, "Fused update"):
//   M <- lerp(M, G, 1 - mu);  D <- nesterov ? lerp(G, M, mu) : M;  O <- sharp(D);
//   X <- X * (1 - lr * wd);   X <- X - t * O,
// t = lr * ratio(rows, cols) (FIXED) or lr * <D,O> / (L0 + L1 <D,O>) (ADAPTIVE); plus NaN/Inf
// handling, zero directions, and one test per error code.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "reference.h"

namespace {

using dmtest::Buffer;
using dmtest::kDtypes;
using dmtest::kNorms;
using dmtest::Mat;

double lr_ratio(dm_lr_adjust adjust, int64_t rows, int64_t cols) {
    switch (adjust) {
    case DM_LR_ADJUST_NONE: return 1.0;
    case DM_LR_ADJUST_ORIGINAL:
        return std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
    case DM_LR_ADJUST_MATCH_RMS_ADAMW:
        return 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)));
    }
    return std::nan("");
}

// The float64 reference of one update of one matrix from (x, g, m). The direction is defined
// from the momentum buffer as stored (D = lerp(G, M, mu) reads the updated buffer), so it is
// built from momentum_after, the buffer the kernel wrote; e.momentum is what it should hold.
struct Expected {
    Mat momentum, params, direction, sharp;
    double dual, step;
};

Expected reference_update(const dm_update_config &config, dm_dtype dtype, const Mat &x,
                          const Mat &g, const Mat &m, const Mat &momentum_after) {
    const double mu = config.momentum;
    Expected e;
    e.momentum = dmtest::axpby(mu, m, 1.0 - mu, g);
    for (double &v : e.momentum.v) v = dmtest::round_to(dtype, v);
    e.direction = config.nesterov ? dmtest::axpby(1.0 - mu, g, mu, momentum_after) : momentum_after;
    e.sharp = dmtest::ref_sharp(config.sharp, e.direction);
    e.dual = dmtest::dot(e.direction, e.sharp);
    e.step = config.radius == DM_RADIUS_ADAPTIVE
                 ? config.lr * e.dual / (config.radius_l0 + config.radius_l1 * e.dual)
                 : config.lr * lr_ratio(config.lr_adjust, x.rows, x.cols);
    e.params = dmtest::axpby(1.0 - config.lr * config.weight_decay, x, -e.step, e.sharp);
    return e;
}

dm_update_config base_config(dm_norm norm, double coefficients[15]) {
    dm_update_config config{};
    config.sharp = dmtest::sharp_config_for(norm, coefficients);
    config.lr = 0.05;
    config.weight_decay = 0.1;
    config.momentum = 0.9;
    config.nesterov = 1;
    config.lr_adjust = DM_LR_ADJUST_ORIGINAL;
    config.radius = DM_RADIUS_FIXED;
    return config;
}

struct Tensors {
    std::vector<Buffer> params, grads, momentum;
};

Tensors make_tensors(dm_dtype dtype, int64_t batch, int64_t rows, int64_t cols, uint64_t seed) {
    Tensors t;
    for (int64_t b = 0; b < batch; ++b) {
        const uint64_t s = seed + 10 * static_cast<uint64_t>(b);
        t.params.push_back(
            dmtest::to_buffer(dmtest::random_normal(rows, cols, s, 0.1), dtype, cols));
        t.grads.push_back(dmtest::to_buffer(dmtest::random_normal(rows, cols, s + 1), dtype, cols));
        t.momentum.push_back(
            dmtest::to_buffer(dmtest::random_normal(rows, cols, s + 2, 0.5), dtype, cols));
    }
    return t;
}

// dm_update with exactly the workspace it asks for.
dm_status call_update(const dm_update_config &config, dm_dtype dtype, int64_t rows, int64_t cols,
                      Tensors &t, double *duals, const dm_gemm_provider *gemm = nullptr) {
    const int64_t batch = static_cast<int64_t>(t.params.size());
    size_t bytes = 0;
    const dm_status size_status =
        dm_update_workspace_size(&config, dtype, batch, rows, cols, &bytes);
    if (size_status != DM_OK) return size_status;
    std::vector<unsigned char> workspace(bytes);
    std::vector<void *> x = dmtest::pointers(t.params), m = dmtest::pointers(t.momentum);
    std::vector<const void *> g = dmtest::const_pointers(t.grads);
    return dm_update(&config, dtype, batch, rows, cols, x.data(), g.data(), m.data(), duals,
                     bytes ? workspace.data() : nullptr, bytes, gemm);
}

// Tolerances: relative rounding of stored values (bfloat16: two roundings of half an ulp,
// 2^-8), and of the sharp result (kept in compute precision, float32 for bfloat16 storage).
double storage_tolerance(dm_dtype dtype) {
    return dtype == DM_FLOAT64 ? 1e-14 : dtype == DM_FLOAT32 ? 1e-6 : 4e-3;
}
double sharp_tolerance(dm_norm norm, dm_dtype dtype) {
    if (dtype == DM_FLOAT64) return 1e-10;
    return norm == DM_NORM_SPECTRAL ? 1e-4 : 1e-5;
}

// Runs `steps` updates on fresh tensors and compares each against the reference applied to the
// state the kernel started that step from.
void check_update(const dm_update_config &config, dm_dtype dtype, int64_t batch, int64_t rows,
                  int64_t cols, int steps = 2) {
    SCOPED_TRACE(testing::Message()
                 << dmtest::norm_name(config.sharp.norm) << " " << dmtest::dtype_name(dtype)
                 << " batch " << batch << " " << rows << "x" << cols << " nesterov "
                 << config.nesterov << " lr_adjust " << config.lr_adjust << " radius "
                 << config.radius << " mu " << config.momentum);
    Tensors t = make_tensors(dtype, batch, rows, cols, 500 + static_cast<uint64_t>(rows));
    for (int step = 0; step < steps; ++step) {
        SCOPED_TRACE(testing::Message() << "step " << step);
        if (step > 0) // a new gradient each step
            for (int64_t b = 0; b < batch; ++b)
                t.grads[b] = dmtest::to_buffer(
                    dmtest::random_normal(rows, cols, 900 + 7 * static_cast<uint64_t>(b + step)),
                    dtype, cols);
        std::vector<Mat> x0, g0, m0;
        for (int64_t b = 0; b < batch; ++b) {
            x0.push_back(dmtest::from_buffer(t.params[b], rows, cols, cols));
            g0.push_back(dmtest::from_buffer(t.grads[b], rows, cols, cols));
            m0.push_back(dmtest::from_buffer(t.momentum[b], rows, cols, cols));
        }
        const std::vector<Buffer> grads_before = t.grads;
        std::vector<double> duals(static_cast<size_t>(batch), -1.0);
        ASSERT_EQ(call_update(config, dtype, rows, cols, t, duals.data()), DM_OK);
        for (int64_t b = 0; b < batch; ++b) {
            SCOPED_TRACE(testing::Message() << "matrix " << b);
            const Mat m1 = dmtest::from_buffer(t.momentum[b], rows, cols, cols);
            const Mat x1 = dmtest::from_buffer(t.params[b], rows, cols, cols);
            const Expected e = reference_update(config, dtype, x0[b], g0[b], m0[b], m1);
            EXPECT_EQ(t.grads[b].bytes(), grads_before[b].bytes()) << "gradient written";
            // Momentum: the EMA rounded to storage.
            double worst_m = 0.0;
            for (size_t k = 0; k < m1.v.size(); ++k) {
                const double scale = std::fabs(m0[b].v[k]) + std::fabs(g0[b].v[k]) + 1e-300;
                worst_m = std::max(worst_m, std::fabs(m1.v[k] - e.momentum.v[k]) / scale);
            }
            EXPECT_LE(worst_m, storage_tolerance(dtype)) << "momentum buffer";
            // Parameters: the decayed value and the result each round to storage; the step's
            // error is the sharp result's.
            const Mat decayed =
                dmtest::axpby(1.0 - config.lr * config.weight_decay, x0[b], 0.0, x0[b]);
            const double o_scale = dmtest::max_abs(e.sharp);
            const double o_tol = sharp_tolerance(config.sharp.norm, dtype) * o_scale;
            // Where D is 0 up to the compute precision's rounding (bfloat16 values cancel exactly
            // in 0.1 g + 0.9 m more often than one would think), a sign-like operator (SIGN, or
            // COLUMN / ROW over a single element) may give either sign: such elements may differ
            // by the whole step. They must stay rare.
            const double d_floor = 1e-6 * dmtest::max_abs(e.direction);
            double worst_x = 0.0, widest = 0.0;
            size_t ambiguous = 0;
            for (size_t k = 0; k < x1.v.size(); ++k) {
                double allowed = storage_tolerance(dtype) *
                                     (std::fabs(decayed.v[k]) + std::fabs(e.params.v[k])) +
                                 std::fabs(e.step) * o_tol + 1e-300;
                if (dtype != DM_FLOAT64 && std::fabs(e.direction.v[k]) <= d_floor) {
                    allowed += 2.0 * std::fabs(e.step) * o_scale;
                    ++ambiguous;
                }
                worst_x = std::max(worst_x, std::fabs(x1.v[k] - e.params.v[k]) / allowed);
                widest = std::max(widest, allowed);
            }
            EXPECT_LE(worst_x, 1.0) << "parameters (error / allowed)";
            EXPECT_LE(ambiguous, x1.v.size() / 100);
            // The step moved the parameters measurably beyond the tolerance (bfloat16 has too
            // few bits for the small steps; the same code path is checked in float32).
            if (dtype != DM_BFLOAT16) {
                EXPECT_GT(dmtest::max_abs_diff(e.params, decayed), 3 * widest);
            }
            // Dual <D, O>.
            double magnitude = 0.0;
            for (size_t k = 0; k < e.sharp.v.size(); ++k)
                magnitude += std::fabs(e.direction.v[k] * e.sharp.v[k]);
            EXPECT_NEAR(duals[b], e.dual, sharp_tolerance(config.sharp.norm, dtype) * magnitude);
        }
    }
}

const int64_t kShapes[][2] = {{1, 7},   {7, 1},    {7, 64},   {64, 7},
                              {64, 64}, {1, 4097}, {4097, 1}, {3, 4097}};

TEST(Update, MatchesReference) {
    // Every norm, shape and dtype; Nesterov, lr_adjust and batch size vary along the loop.
    double coefficients[15];
    int index = 0;
    for (dm_norm norm : kNorms)
        for (const auto &shape : kShapes)
            for (dm_dtype dtype : kDtypes) {
                dm_update_config config = base_config(norm, coefficients);
                config.nesterov = index % 2;
                config.lr_adjust = static_cast<dm_lr_adjust>(index % 3);
                check_update(config, dtype, index % 4 == 0 ? 1 : 3, shape[0], shape[1]);
                ++index;
            }
}

TEST(Update, Nesterov) {
    // Both settings match the reference, and they differ from each other.
    double coefficients[15];
    for (dm_dtype dtype : kDtypes)
        for (dm_norm norm : {DM_NORM_SPECTRAL, DM_NORM_FROBENIUS}) {
            std::vector<Buffer> results;
            for (int nesterov = 0; nesterov < 2; ++nesterov) {
                dm_update_config config = base_config(norm, coefficients);
                config.nesterov = nesterov;
                check_update(config, dtype, 2, 64, 7);
                Tensors t = make_tensors(dtype, 1, 64, 7, 1);
                ASSERT_EQ(call_update(config, dtype, 64, 7, t, nullptr), DM_OK);
                results.push_back(t.params[0]);
            }
            EXPECT_NE(results[0].bytes(), results[1].bytes());
        }
}

TEST(Update, LrAdjust) {
    // The three lr scales on tall, wide and square shapes (sqrt(max(1, rows/cols)) and
    // 0.2 sqrt(max(rows, cols))); the weight decay uses the unadjusted lr.
    double coefficients[15];
    for (dm_lr_adjust adjust :
         {DM_LR_ADJUST_NONE, DM_LR_ADJUST_ORIGINAL, DM_LR_ADJUST_MATCH_RMS_ADAMW})
        for (const auto &shape : {std::make_pair(64, 7), std::make_pair(7, 64),
                                  std::make_pair(64, 64), std::make_pair(4097, 1)})
            for (dm_dtype dtype : kDtypes)
                for (dm_norm norm : {DM_NORM_SPECTRAL, DM_NORM_SIGN}) {
                    dm_update_config config = base_config(norm, coefficients);
                    config.lr_adjust = adjust;
                    config.weight_decay = 0.5;
                    check_update(config, dtype, 2, shape.first, shape.second, 1);
                }
}

TEST(Update, AdaptiveRadius) {
    // step = lr * dual / (L0 + L1 * dual), per matrix of the batch, for several (L0, L1).
    double coefficients[15];
    const double radii[][2] = {{1.0, 0.0}, {0.0, 1.0}, {0.5, 2.0}, {20.0, 0.1}};
    for (const auto &r : radii)
        for (dm_norm norm : kNorms)
            for (dm_dtype dtype : kDtypes)
                for (const auto &shape : {std::make_pair(7, 64), std::make_pair(64, 7)}) {
                    dm_update_config config = base_config(norm, coefficients);
                    config.radius = DM_RADIUS_ADAPTIVE;
                    config.radius_l0 = r[0];
                    config.radius_l1 = r[1];
                    config.lr = 0.02;
                    check_update(config, dtype, 3, shape.first, shape.second);
                }
}

TEST(Update, MomentumEdges) {
    // mu = 0: M' = G, D = G. mu = 1: M' = M (the gradient is ignored).
    double coefficients[15];
    for (double mu : {0.0, 1.0})
        for (int nesterov = 0; nesterov < 2; ++nesterov)
            for (dm_dtype dtype : kDtypes) {
                dm_update_config config = base_config(DM_NORM_SPECTRAL, coefficients);
                config.momentum = mu;
                config.nesterov = nesterov;
                check_update(config, dtype, 2, 7, 64);
            }
    // Explicitly: with mu = 1 the buffer is bitwise unchanged.
    for (dm_dtype dtype : kDtypes) {
        dm_update_config config = base_config(DM_NORM_FROBENIUS, coefficients);
        config.momentum = 1.0;
        Tensors t = make_tensors(dtype, 2, 7, 64, 3);
        const std::vector<Buffer> before = t.momentum;
        ASSERT_EQ(call_update(config, dtype, 7, 64, t, nullptr), DM_OK);
        for (size_t b = 0; b < before.size(); ++b)
            EXPECT_EQ(t.momentum[b].bytes(), before[b].bytes()) << dmtest::dtype_name(dtype);
    }
}

TEST(Update, DualsMayBeNull) {
    double coefficients[15];
    for (dm_radius radius : {DM_RADIUS_FIXED, DM_RADIUS_ADAPTIVE}) {
        dm_update_config config = base_config(DM_NORM_SPECTRAL, coefficients);
        config.radius = radius;
        config.radius_l0 = 1.0;
        config.radius_l1 = 1.0;
        Tensors a = make_tensors(DM_FLOAT32, 3, 64, 7, 4), b = a;
        double duals[3];
        ASSERT_EQ(call_update(config, DM_FLOAT32, 64, 7, a, nullptr), DM_OK);
        ASSERT_EQ(call_update(config, DM_FLOAT32, 64, 7, b, duals), DM_OK);
        for (size_t k = 0; k < 3; ++k) {
            EXPECT_EQ(a.params[k].bytes(), b.params[k].bytes());
            EXPECT_EQ(a.momentum[k].bytes(), b.momentum[k].bytes());
            EXPECT_GT(duals[k], 0.0);
        }
    }
}

TEST(Update, ZeroDirectionOnlyDecays) {
    // G = 0 and M = 0: the direction and its sharp are 0, the dual is 0, so the parameters are
    // only decayed, x * (1 - lr * wd), with no NaN, for every radius (ADAPTIVE with L0 = 0 is
    // 0 / 0 if computed naively; its step multiplies a zero direction either way).
    double coefficients[15];
    const double radii[][3] = {{DM_RADIUS_FIXED, 0, 0},
                               {DM_RADIUS_ADAPTIVE, 1.0, 0.0},
                               {DM_RADIUS_ADAPTIVE, 0.0, 1.0},
                               {DM_RADIUS_ADAPTIVE, 0.5, 0.5}};
    for (dm_norm norm : kNorms)
        for (dm_dtype dtype : kDtypes)
            for (const auto &r : radii) {
                SCOPED_TRACE(testing::Message()
                             << dmtest::norm_name(norm) << " " << dmtest::dtype_name(dtype)
                             << " radius " << r[0] << " L0 " << r[1] << " L1 " << r[2]);
                dm_update_config config = base_config(norm, coefficients);
                config.radius = static_cast<dm_radius>(static_cast<int>(r[0]));
                config.radius_l0 = r[1];
                config.radius_l1 = r[2];
                for (const auto &shape : {std::make_pair(7, 64), std::make_pair(64, 7)}) {
                    Tensors t = make_tensors(dtype, 2, shape.first, shape.second, 6);
                    for (size_t b = 0; b < 2; ++b) {
                        t.grads[b].fill(0.0);
                        t.momentum[b].fill(0.0);
                    }
                    const std::vector<Buffer> x_before = t.params;
                    double duals[2] = {-1.0, -1.0};
                    ASSERT_EQ(call_update(config, dtype, shape.first, shape.second, t, duals),
                              DM_OK);
                    const double decay = 1.0 - config.lr * config.weight_decay;
                    for (size_t b = 0; b < 2; ++b) {
                        EXPECT_EQ(duals[b], 0.0);
                        int64_t bad = 0;
                        for (size_t k = 0; k < t.params[b].size(); ++k) {
                            const double expected = x_before[b].get(k) * decay;
                            const double got = t.params[b].get(k);
                            if (!(std::fabs(got - expected) <=
                                  storage_tolerance(dtype) * std::fabs(expected)) &&
                                ++bad <= 3)
                                ADD_FAILURE()
                                    << "param " << k << " = " << got << ", expected " << expected;
                            EXPECT_EQ(t.momentum[b].get(k), 0.0);
                        }
                        EXPECT_EQ(bad, 0);
                    }
                }
            }
}

TEST(Update, ZeroSizes) {
    double coefficients[15];
    const dm_update_config config = base_config(DM_NORM_SPECTRAL, coefficients);
    const int64_t sizes[][3] = {{0, 7, 7}, {2, 0, 7}, {2, 7, 0}};
    for (const auto &s : sizes) {
        size_t bytes = 0;
        ASSERT_EQ(dm_update_workspace_size(&config, DM_FLOAT32, s[0], s[1], s[2], &bytes), DM_OK);
        std::vector<unsigned char> workspace(bytes + 1);
        void *x[2] = {nullptr, nullptr}, *m[2] = {nullptr, nullptr};
        const void *g[2] = {nullptr, nullptr};
        double duals[2] = {4.0, 4.0};
        EXPECT_EQ(dm_update(&config, DM_FLOAT32, s[0], s[1], s[2], x, g, m, duals, workspace.data(),
                            bytes, nullptr),
                  DM_OK);
        for (int64_t b = 0; b < 2; ++b) EXPECT_EQ(duals[b], b < s[0] ? 0.0 : 4.0);
    }
    // batch 0 needs no arrays and no workspace at all (found by tests/fuzz: NULL + 0 before).
    EXPECT_EQ(dm_update(&config, DM_FLOAT32, 0, 7, 7, nullptr, nullptr, nullptr, nullptr, nullptr,
                        0, nullptr),
              DM_OK);
}

// ---- one test per error code ----------------------------------------------------------------

// Runs dm_update on a valid float32 batch of 3 (7 x 64) after `mutate` changed the config, and
// checks the status and that nothing was written.
template <typename Mutate>
void expect_update_error(dm_status expected, const char *what, Mutate mutate,
                         dm_dtype dtype = DM_FLOAT32) {
    SCOPED_TRACE(what);
    double coefficients[15];
    dm_update_config config = base_config(DM_NORM_SPECTRAL, coefficients);
    mutate(config);
    Tensors t = make_tensors(DM_FLOAT32, 3, 7, 64, 8);
    const Tensors before = t;
    double duals[3] = {2.0, 2.0, 2.0};
    std::vector<unsigned char> workspace(1 << 20);
    std::vector<void *> x = dmtest::pointers(t.params), m = dmtest::pointers(t.momentum);
    std::vector<const void *> g = dmtest::const_pointers(t.grads);
    const dm_status status = dm_update(&config, dtype, 3, 7, 64, x.data(), g.data(), m.data(),
                                       duals, workspace.data(), workspace.size(), nullptr);
    EXPECT_EQ(status, expected) << dm_status_string(status);
    for (size_t b = 0; b < 3; ++b) {
        EXPECT_EQ(t.params[b].bytes(), before.params[b].bytes());
        EXPECT_EQ(t.momentum[b].bytes(), before.momentum[b].bytes());
        EXPECT_EQ(duals[b], 2.0);
    }
    size_t bytes = 0;
    if (expected == DM_ERR_INVALID_ARG || expected == DM_ERR_DTYPE) {
        EXPECT_EQ(dm_update_workspace_size(&config, dtype, 3, 7, 64, &bytes), expected);
    }
}

// One float32 7x64 matrix under the spectral base config, as the raw pointer arrays a call
// takes, with a copy of its tensors and a generous workspace, for calls that must be refused.
struct OneMatrix {
    double coefficients[15];
    const dm_update_config config = base_config(DM_NORM_SPECTRAL, coefficients);
    Tensors t;
    const Tensors before;
    std::vector<unsigned char> workspace = std::vector<unsigned char>(1 << 20);
    void *x[1], *m[1];
    const void *g[1];

    explicit OneMatrix(uint64_t seed)
        : t(make_tensors(DM_FLOAT32, 1, 7, 64, seed)), before(t), x{t.params[0].data()},
          m{t.momentum[0].data()}, g{t.grads[0].data()} {}
    OneMatrix(const OneMatrix &) = delete; // config and the arrays point into this object
    OneMatrix &operator=(const OneMatrix &) = delete;

    void expect_untouched() const {
        EXPECT_EQ(t.params[0].bytes(), before.params[0].bytes());
        EXPECT_EQ(t.momentum[0].bytes(), before.momentum[0].bytes());
    }
};

TEST(Update, ErrInvalidArg) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    using C = dm_update_config;
    expect_update_error(DM_ERR_INVALID_ARG, "lr < 0", [](C &c) { c.lr = -1e-3; });
    expect_update_error(DM_ERR_INVALID_ARG, "lr NaN", [&](C &c) { c.lr = nan; });
    expect_update_error(DM_ERR_INVALID_ARG, "lr Inf", [&](C &c) { c.lr = inf; });
    expect_update_error(DM_ERR_INVALID_ARG, "weight_decay < 0",
                        [](C &c) { c.weight_decay = -0.1; });
    expect_update_error(DM_ERR_INVALID_ARG, "weight_decay NaN",
                        [&](C &c) { c.weight_decay = nan; });
    expect_update_error(DM_ERR_INVALID_ARG, "momentum > 1", [](C &c) { c.momentum = 1.01; });
    expect_update_error(DM_ERR_INVALID_ARG, "momentum < 0", [](C &c) { c.momentum = -0.1; });
    expect_update_error(DM_ERR_INVALID_ARG, "momentum NaN", [&](C &c) { c.momentum = nan; });
    expect_update_error(DM_ERR_INVALID_ARG, "nesterov 2", [](C &c) { c.nesterov = 2; });
    expect_update_error(DM_ERR_INVALID_ARG, "nesterov -1", [](C &c) { c.nesterov = -1; });
    expect_update_error(DM_ERR_INVALID_ARG, "lr_adjust 3",
                        [](C &c) { dmtest::set_raw_enum(&c.lr_adjust, 3); });
    expect_update_error(DM_ERR_INVALID_ARG, "radius 2",
                        [](C &c) { dmtest::set_raw_enum(&c.radius, 2); });
    expect_update_error(DM_ERR_INVALID_ARG, "adaptive L0 = L1 = 0", [](C &c) {
        c.radius = DM_RADIUS_ADAPTIVE;
        c.radius_l0 = 0.0;
        c.radius_l1 = 0.0;
    });
    expect_update_error(DM_ERR_INVALID_ARG, "adaptive L0 < 0", [](C &c) {
        c.radius = DM_RADIUS_ADAPTIVE;
        c.radius_l0 = -1.0;
        c.radius_l1 = 2.0;
    });
    expect_update_error(DM_ERR_INVALID_ARG, "adaptive L1 NaN", [&](C &c) {
        c.radius = DM_RADIUS_ADAPTIVE;
        c.radius_l0 = 1.0;
        c.radius_l1 = nan;
    });
    expect_update_error(DM_ERR_INVALID_ARG, "eps < 0", [](C &c) { c.sharp.eps = -1.0; });
    expect_update_error(DM_ERR_INVALID_ARG, "norm 7",
                        [](C &c) { dmtest::set_raw_enum(&c.sharp.norm, 7); });
    expect_update_error(DM_ERR_INVALID_ARG, "ns_steps < 0", [](C &c) { c.sharp.ns_steps = -1; });
    expect_update_error(DM_ERR_INVALID_ARG, "NULL coefficients with steps > 0",
                        [](C &c) { c.sharp.ns_coefficients = nullptr; });

    // NULL config and NULL arrays or matrices.
    OneMatrix one(9);
    void *null_m[1] = {nullptr};
    auto call = [&](const dm_update_config *c, void *const *px, const void *const *pg,
                    void *const *pm) {
        return dm_update(c, DM_FLOAT32, 1, 7, 64, px, pg, pm, nullptr, one.workspace.data(),
                         one.workspace.size(), nullptr);
    };
    EXPECT_EQ(call(nullptr, one.x, one.g, one.m), DM_ERR_INVALID_ARG);
    EXPECT_EQ(call(&one.config, nullptr, one.g, one.m), DM_ERR_INVALID_ARG);
    EXPECT_EQ(call(&one.config, one.x, nullptr, one.m), DM_ERR_INVALID_ARG);
    EXPECT_EQ(call(&one.config, one.x, one.g, nullptr), DM_ERR_INVALID_ARG);
    EXPECT_EQ(call(&one.config, one.x, one.g, null_m), DM_ERR_INVALID_ARG);
    one.expect_untouched();
    size_t bytes = 0;
    EXPECT_EQ(dm_update_workspace_size(nullptr, DM_FLOAT32, 1, 7, 64, &bytes), DM_ERR_INVALID_ARG);
    EXPECT_EQ(dm_update_workspace_size(&one.config, DM_FLOAT32, 1, 7, 64, nullptr),
              DM_ERR_INVALID_ARG);
}

TEST(Update, ErrNonfinite) {
    // NaN or +-Inf in a gradient (only in the last matrix of the batch) or in a momentum buffer:
    // DM_ERR_NONFINITE with every parameter, buffer and dual bitwise untouched.
    const double inf = std::numeric_limits<double>::infinity();
    double coefficients[15];
    for (dm_norm norm : kNorms)
        for (dm_dtype dtype : kDtypes)
            for (double bad : {std::numeric_limits<double>::quiet_NaN(), inf, -inf})
                for (int in_buffer = 0; in_buffer < 2; ++in_buffer)
                    for (int nesterov = 0; nesterov < 2; ++nesterov) {
                        SCOPED_TRACE(testing::Message()
                                     << dmtest::norm_name(norm) << " " << dmtest::dtype_name(dtype)
                                     << " " << bad << (in_buffer ? " in momentum" : " in grad")
                                     << " nesterov " << nesterov);
                        dm_update_config config = base_config(norm, coefficients);
                        config.nesterov = nesterov;
                        Tensors t = make_tensors(dtype, 3, 64, 7, 10);
                        (in_buffer ? t.momentum : t.grads)[2].set(100, bad);
                        const Tensors before = t;
                        double duals[3] = {6.0, 6.0, 6.0};
                        EXPECT_EQ(call_update(config, dtype, 64, 7, t, duals), DM_ERR_NONFINITE);
                        for (size_t b = 0; b < 3; ++b) {
                            EXPECT_EQ(std::memcmp(t.params[b].data(), before.params[b].data(),
                                                  t.params[b].bytes().size()),
                                      0)
                                << "params " << b;
                            EXPECT_EQ(std::memcmp(t.momentum[b].data(), before.momentum[b].data(),
                                                  t.momentum[b].bytes().size()),
                                      0)
                                << "momentum " << b;
                            EXPECT_EQ(duals[b], 6.0);
                        }
                    }
}

TEST(Update, ErrWorkspace) {
    double coefficients[15];
    for (dm_norm norm : kNorms) {
        SCOPED_TRACE(dmtest::norm_name(norm));
        const dm_update_config config = base_config(norm, coefficients);
        Tensors t = make_tensors(DM_FLOAT64, 2, 64, 7, 11);
        const Tensors before = t;
        size_t needed = 0;
        ASSERT_EQ(dm_update_workspace_size(&config, DM_FLOAT64, 2, 64, 7, &needed), DM_OK);
        ASSERT_GT(needed, 0u);
        std::vector<unsigned char> workspace(needed);
        std::vector<void *> x = dmtest::pointers(t.params), m = dmtest::pointers(t.momentum);
        std::vector<const void *> g = dmtest::const_pointers(t.grads);
        EXPECT_EQ(dm_update(&config, DM_FLOAT64, 2, 64, 7, x.data(), g.data(), m.data(), nullptr,
                            workspace.data(), needed - 1, nullptr),
                  DM_ERR_WORKSPACE);
        EXPECT_EQ(dm_update(&config, DM_FLOAT64, 2, 64, 7, x.data(), g.data(), m.data(), nullptr,
                            nullptr, needed, nullptr),
                  DM_ERR_WORKSPACE);
        for (size_t b = 0; b < 2; ++b) {
            EXPECT_EQ(t.params[b].bytes(), before.params[b].bytes());
            EXPECT_EQ(t.momentum[b].bytes(), before.momentum[b].bytes());
        }
    }
}

TEST(Update, ErrDtype) {
    dm_dtype bad;
    dmtest::set_raw_enum(&bad, 3);
    expect_update_error(DM_ERR_DTYPE, "dtype outside the enum", [](dm_update_config &) {}, bad);
}

TEST(Update, ErrShape) {
    OneMatrix one(12);
    const int64_t sizes[][3] = {{-1, 7, 64}, {1, -7, 64}, {1, 7, -64}};
    for (const auto &s : sizes) {
        EXPECT_EQ(dm_update(&one.config, DM_FLOAT32, s[0], s[1], s[2], one.x, one.g, one.m, nullptr,
                            one.workspace.data(), one.workspace.size(), nullptr),
                  DM_ERR_SHAPE);
        size_t bytes = 0;
        EXPECT_EQ(dm_update_workspace_size(&one.config, DM_FLOAT32, s[0], s[1], s[2], &bytes),
                  DM_ERR_SHAPE);
    }
    size_t bytes = 0;
    EXPECT_EQ(dm_update_workspace_size(&one.config, DM_FLOAT32, 4, INT64_MAX / 4, 3, &bytes),
              DM_ERR_SHAPE);
    one.expect_untouched();
}

} // namespace
