// dm_sharp for every norm against the float64 references in reference.h: odd and tall/wide
// shapes, batches, every dtype, padded leading dimensions, aliasing, duals, zero and non-finite
// inputs, huge finite inputs, zero sizes, and one test per error code.
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
const int64_t kShapes[][2] = {{1, 1},   {1, 7},    {7, 1},    {7, 64},   {64, 7},
                              {64, 64}, {1, 4097}, {4097, 1}, {3, 4097}, {4097, 3}};

// Error allowed per dtype, relative to the largest |value| of the reference result.
double sharp_tolerance(dm_norm norm, dm_dtype dtype) {
    if (dtype == DM_FLOAT64) return 1e-10;
    if (dtype == DM_FLOAT32) return norm == DM_NORM_SPECTRAL ? 1e-4 : 1e-5;
    return 1e-2;
}

// Input matrix b of a batch: normal entries at a per-matrix scale, with exact zeros sprinkled in
// (sign(0) = 0) and, in matrix 1, a zero first column (COLUMN) or first row (ROW).
Mat make_input(dm_norm norm, int64_t rows, int64_t cols, int64_t b, uint64_t seed) {
    Mat m = dmtest::random_normal(rows, cols, seed + 17 * static_cast<uint64_t>(b),
                                  std::pow(10.0, static_cast<double>(b) - 1.0));
    for (size_t k = 0; k < m.v.size(); k += 11) m.v[k] = 0.0;
    if (b == 1 && norm == DM_NORM_COLUMN && cols > 1)
        for (int64_t i = 0; i < rows; ++i) m(i, 0) = 0.0;
    if (b == 1 && norm == DM_NORM_ROW && rows > 1)
        for (int64_t j = 0; j < cols; ++j) m(0, j) = 0.0;
    return m;
}

bool same_element(const Buffer &a, const Buffer &b, size_t k) {
    const size_t size = dmtest::dtype_size(a.dtype());
    return std::memcmp(&a.bytes()[k * size], &b.bytes()[k * size], size) == 0;
}

// One dm_sharp call checked against the reference: values, duals, padding, inputs untouched.
void check_sharp(const dm_sharp_config &config, dm_dtype dtype, int64_t batch, int64_t rows,
                 int64_t cols, int64_t in_pad, int64_t out_pad, double tolerance) {
    SCOPED_TRACE(testing::Message()
                 << dmtest::norm_name(config.norm) << " " << dmtest::dtype_name(dtype) << " batch "
                 << batch << " " << rows << "x" << cols << " pads " << in_pad << "," << out_pad);
    const int64_t in_ld = cols + in_pad, out_ld = cols + out_pad;
    std::vector<Buffer> inputs, outputs;
    std::vector<Mat> stored;
    for (int64_t b = 0; b < batch; ++b) {
        inputs.push_back(dmtest::to_buffer(make_input(config.norm, rows, cols, b, 1000 + rows),
                                           dtype, in_ld, 4321.0));
        stored.push_back(dmtest::from_buffer(inputs.back(), rows, cols, in_ld));
        Buffer out(dtype, static_cast<size_t>(rows * out_ld));
        out.fill(-999.0);
        outputs.push_back(out);
    }
    const std::vector<Buffer> inputs_before = inputs, outputs_before = outputs;
    std::vector<double> duals(static_cast<size_t>(batch), -1.0);

    ASSERT_EQ(
        dmtest::call_sharp(config, dtype, rows, cols, inputs, in_ld, outputs, out_ld, duals.data()),
        DM_OK);

    for (int64_t b = 0; b < batch; ++b) {
        SCOPED_TRACE(testing::Message() << "matrix " << b);
        const Mat expected = dmtest::ref_sharp(config, stored[b]);
        const Mat got = dmtest::from_buffer(outputs[b], rows, cols, out_ld);
        const double scale = std::max(dmtest::max_abs(expected), 1e-300);
        const double error = dmtest::max_abs_diff(got, expected);
        EXPECT_LE(error, tolerance * scale) << "max |got - expected| relative " << error / scale;
        EXPECT_TRUE(dmtest::all_finite(got));
        // The dual is <M, sharp(M)> in float64 (up to the output's rounding to dtype).
        double magnitude = 0.0;
        for (size_t k = 0; k < got.v.size(); ++k) magnitude += std::fabs(stored[b].v[k] * got.v[k]);
        EXPECT_NEAR(duals[b], dmtest::dot(stored[b], got), tolerance * magnitude + 1e-300);
        EXPECT_NEAR(duals[b], dmtest::dot(stored[b], expected), 2 * tolerance * magnitude + 1e-300);
        // Padding of the outputs and all of the inputs are untouched.
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = cols; j < out_ld; ++j)
                ASSERT_TRUE(same_element(outputs[b], outputs_before[b],
                                         static_cast<size_t>(i * out_ld + j)))
                    << "output padding (" << i << "," << j << ") written";
        ASSERT_EQ(inputs[b].bytes(), inputs_before[b].bytes()) << "input written";
    }
}

void check_norm(const dm_sharp_config &config) {
    for (const auto &shape : kShapes)
        for (dm_dtype dtype : kDtypes)
            for (int64_t batch : {1, 3}) {
                const int64_t pad = batch == 1 ? 0 : 5;
                check_sharp(config, dtype, batch, shape[0], shape[1], pad, pad / 2,
                            sharp_tolerance(config.norm, dtype));
            }
}

TEST(Sharp, SpectralMuon) {
    double coefficients[15];
    check_norm(dmtest::muon_config(coefficients));
}

TEST(Sharp, SpectralPolarExpress) { check_norm(dmtest::polar_express_config()); }

TEST(Sharp, Sign) { check_norm(dmtest::simple_config(DM_NORM_SIGN)); }

TEST(Sharp, Column) { check_norm(dmtest::simple_config(DM_NORM_COLUMN)); }

TEST(Sharp, Row) { check_norm(dmtest::simple_config(DM_NORM_ROW)); }

TEST(Sharp, Frobenius) { check_norm(dmtest::simple_config(DM_NORM_FROBENIUS)); }

TEST(Sharp, EpsClampsSmallNorms) {
    // eps larger than every norm: each operator divides by eps instead (M / eps).
    for (dm_norm norm : {DM_NORM_COLUMN, DM_NORM_ROW, DM_NORM_FROBENIUS})
        for (dm_dtype dtype : kDtypes)
            check_sharp(dmtest::simple_config(norm, 1e3), dtype, 2, 7, 64, 1, 1,
                        sharp_tolerance(norm, dtype));
}

TEST(Sharp, SpectralBfloat16Iterates) {
    // DM_NS_BFLOAT16 keeps the iterates in bfloat16 (products accumulate in float32), as
    // torch.optim.Muon does on GPU: error ~1e-2 against the float64 iteration.
    double coefficients[15];
    dm_sharp_config config = dmtest::muon_config(coefficients);
    config.ns_precision = DM_NS_BFLOAT16;
    for (dm_dtype dtype : kDtypes) {
        check_sharp(config, dtype, 2, 64, 64, 0, 0, 5e-2);
        check_sharp(config, dtype, 3, 7, 64, 2, 1, 5e-2);
        check_sharp(config, dtype, 1, 4097, 3, 0, 0, 5e-2);
    }
}

TEST(Sharp, OutputsAliasInputs) {
    // outputs == inputs (same ld, padded): same values and duals as a separate output.
    double coefficients[15];
    const int64_t rows = 7, cols = 64, ld = 70, batch = 3;
    for (dm_norm norm : kNorms)
        for (dm_dtype dtype : kDtypes) {
            SCOPED_TRACE(testing::Message()
                         << dmtest::norm_name(norm) << " " << dmtest::dtype_name(dtype));
            const dm_sharp_config config = dmtest::sharp_config_for(norm, coefficients);
            for (int64_t shape = 0; shape < 2; ++shape) {
                const int64_t r = shape ? cols : rows, c = shape ? rows : cols, l = shape ? 9 : ld;
                std::vector<Buffer> in, out;
                for (int64_t b = 0; b < batch; ++b) {
                    in.push_back(dmtest::to_buffer(make_input(norm, r, c, b, 77), dtype, l, 55.0));
                    out.push_back(Buffer(dtype, static_cast<size_t>(r * l)));
                }
                std::vector<Buffer> aliased = in;
                std::vector<double> duals(batch), aliased_duals(batch);
                ASSERT_EQ(dmtest::call_sharp(config, dtype, r, c, in, l, out, l, duals.data()),
                          DM_OK);
                ASSERT_EQ(dmtest::call_sharp(config, dtype, r, c, aliased, l, aliased, l,
                                             aliased_duals.data()),
                          DM_OK);
                for (int64_t b = 0; b < batch; ++b) {
                    EXPECT_EQ(dmtest::max_abs_diff(dmtest::from_buffer(aliased[b], r, c, l),
                                                   dmtest::from_buffer(out[b], r, c, l)),
                              0.0);
                    EXPECT_EQ(aliased_duals[b], duals[b]);
                    for (int64_t i = 0; i < r; ++i)
                        for (int64_t j = c; j < l; ++j)
                            ASSERT_TRUE(
                                same_element(aliased[b], in[b], static_cast<size_t>(i * l + j)));
                }
            }
        }
}

TEST(Sharp, DualsMayBeNull) {
    double coefficients[15];
    for (dm_norm norm : kNorms) {
        SCOPED_TRACE(dmtest::norm_name(norm));
        const dm_sharp_config config = dmtest::sharp_config_for(norm, coefficients);
        std::vector<Buffer> in{dmtest::to_buffer(make_input(norm, 7, 64, 0, 5), DM_FLOAT32, 64)};
        std::vector<Buffer> out{Buffer(DM_FLOAT32, 7 * 64)}, out2{Buffer(DM_FLOAT32, 7 * 64)};
        double dual = 0.0;
        ASSERT_EQ(dmtest::call_sharp(config, DM_FLOAT32, 7, 64, in, 64, out, 64, nullptr), DM_OK);
        ASSERT_EQ(dmtest::call_sharp(config, DM_FLOAT32, 7, 64, in, 64, out2, 64, &dual), DM_OK);
        EXPECT_EQ(out[0].bytes(), out2[0].bytes());
        EXPECT_GT(dual, 0.0);
    }
}

TEST(Sharp, ZeroMatrixGivesZero) {
    // A zero matrix gives a zero result and dual, never NaN, also with eps = 0 (0 / 0) and with
    // Polar Express's norm_offset.
    double coefficients[15];
    for (dm_norm norm : kNorms)
        for (dm_dtype dtype : kDtypes)
            for (double eps : {1e-7, 0.0}) {
                SCOPED_TRACE(testing::Message() << dmtest::norm_name(norm) << " "
                                                << dmtest::dtype_name(dtype) << " eps " << eps);
                dm_sharp_config config = norm == DM_NORM_SPECTRAL
                                             ? (eps == 0.0 ? dmtest::polar_express_config()
                                                           : dmtest::muon_config(coefficients))
                                             : dmtest::simple_config(norm);
                config.eps = eps;
                if (norm == DM_NORM_SPECTRAL && eps == 0.0) {
                    // Also the bare 0 / 0 case: no offset either.
                    dm_sharp_config bare = config;
                    bare.norm_offset = 0.0;
                    std::vector<Buffer> in{Buffer(dtype, 64 * 7)}, out{Buffer(dtype, 64 * 7)};
                    out[0].fill(9.0);
                    double dual = 5.0;
                    ASSERT_EQ(dmtest::call_sharp(bare, dtype, 64, 7, in, 7, out, 7, &dual), DM_OK);
                    for (size_t k = 0; k < out[0].size(); ++k) ASSERT_EQ(out[0].get(k), 0.0);
                    EXPECT_EQ(dual, 0.0);
                }
                for (const auto &shape : {std::make_pair(7, 64), std::make_pair(64, 7)}) {
                    std::vector<Buffer> in{Buffer(dtype, 7 * 64), Buffer(dtype, 7 * 64)};
                    in[1] = dmtest::to_buffer(make_input(norm, shape.first, shape.second, 0, 9),
                                              dtype, shape.second);
                    std::vector<Buffer> out{Buffer(dtype, 7 * 64), Buffer(dtype, 7 * 64)};
                    out[0].fill(9.0);
                    out[1].fill(9.0);
                    double duals[2] = {5.0, 5.0};
                    ASSERT_EQ(dmtest::call_sharp(config, dtype, shape.first, shape.second, in,
                                                 shape.second, out, shape.second, duals),
                              DM_OK);
                    for (size_t k = 0; k < out[0].size(); ++k)
                        ASSERT_EQ(out[0].get(k), 0.0) << "element " << k;
                    EXPECT_EQ(duals[0], 0.0);
                    // The zero matrix does not disturb its non-zero neighbour in the batch.
                    EXPECT_GT(duals[1], 0.0);
                    EXPECT_TRUE(dmtest::all_finite(
                        dmtest::from_buffer(out[1], shape.first, shape.second, shape.second)));
                }
            }
}

TEST(Sharp, ErrNonfinite) {
    // NaN or +-Inf anywhere (here only in the last matrix of a batch, so that earlier matrices
    // would otherwise be written first): DM_ERR_NONFINITE, outputs and duals untouched, also
    // when outputs alias inputs.
    const double inf = std::numeric_limits<double>::infinity();
    const double bad_values[] = {std::numeric_limits<double>::quiet_NaN(), inf, -inf};
    double coefficients[15];
    for (dm_norm norm : kNorms)
        for (dm_dtype dtype : kDtypes)
            for (double bad : bad_values)
                for (const auto &shape : {std::make_pair(7, 64), std::make_pair(64, 7)}) {
                    SCOPED_TRACE(testing::Message()
                                 << dmtest::norm_name(norm) << " " << dmtest::dtype_name(dtype)
                                 << " " << bad << " " << shape.first << "x" << shape.second);
                    const dm_sharp_config config = dmtest::sharp_config_for(norm, coefficients);
                    const int64_t rows = shape.first, cols = shape.second, ld = cols + 2;
                    std::vector<Buffer> in, out;
                    for (int64_t b = 0; b < 3; ++b) {
                        in.push_back(
                            dmtest::to_buffer(make_input(norm, rows, cols, b, 3), dtype, ld, 1.0));
                        out.push_back(Buffer(dtype, static_cast<size_t>(rows * ld)));
                        out.back().fill(-7.0);
                    }
                    in[2].set(static_cast<size_t>((rows / 2) * ld + cols - 1), bad);
                    const std::vector<Buffer> in_before = in, out_before = out;
                    double duals[3] = {11.0, 12.0, 13.0};
                    EXPECT_EQ(dmtest::call_sharp(config, dtype, rows, cols, in, ld, out, ld, duals),
                              DM_ERR_NONFINITE);
                    for (int64_t b = 0; b < 3; ++b) {
                        EXPECT_EQ(out[b].bytes(), out_before[b].bytes()) << "output " << b;
                        EXPECT_EQ(duals[b], 11.0 + static_cast<double>(b));
                    }
                    EXPECT_EQ(dmtest::call_sharp(config, dtype, rows, cols, in, ld, in, ld, duals),
                              DM_ERR_NONFINITE);
                    for (int64_t b = 0; b < 3; ++b)
                        EXPECT_EQ(in[b].bytes(), in_before[b].bytes()) << "aliased input " << b;
                }
}

TEST(Sharp, HugeFiniteValuesAreNotNonfinite) {
    // float64 entries near 1e200 (and 1e300) overflow a plain sum of squares; the norm is then
    // recomputed with scaling, so the result is the ordinary one. float32 entries near FLT_MAX
    // square into float64 without overflow.
    double coefficients[15];
    for (dm_norm norm : kNorms) {
        const dm_sharp_config config = dmtest::sharp_config_for(norm, coefficients);
        for (double scale : {1e200, 1e300}) {
            SCOPED_TRACE(testing::Message() << dmtest::norm_name(norm) << " f64 scale " << scale);
            for (const auto &shape : {std::make_pair(7, 64), std::make_pair(64, 64)}) {
                const Mat m = dmtest::random_normal(shape.first, shape.second, 31, scale);
                dm_status status;
                double dual = 0.0;
                const Mat got = dmtest::sharp_f64(config, m, &status, &dual);
                ASSERT_EQ(status, DM_OK);
                const Mat expected = dmtest::ref_sharp(config, m);
                EXPECT_LE(dmtest::max_abs_diff(got, expected), 1e-10 * dmtest::max_abs(expected));
                EXPECT_TRUE(std::isfinite(dual));
                EXPECT_NEAR(dual / scale, dmtest::dot(m, expected) / scale,
                            1e-9 * std::fabs(dmtest::dot(m, expected) / scale));
            }
        }
        SCOPED_TRACE(testing::Message() << dmtest::norm_name(norm) << " f32 near FLT_MAX");
        const Mat m = dmtest::random_normal(7, 64, 37, 1e38);
        dm_status status;
        double dual = 0.0;
        const Mat got = dmtest::sharp_f64(config, m, &status, &dual, DM_FLOAT32);
        ASSERT_EQ(status, DM_OK);
        Mat stored = m;
        for (double &x : stored.v) x = dmtest::round_to(DM_FLOAT32, x);
        const Mat expected = dmtest::ref_sharp(config, stored);
        EXPECT_LE(dmtest::max_abs_diff(got, expected),
                  sharp_tolerance(norm, DM_FLOAT32) * dmtest::max_abs(expected));
        EXPECT_TRUE(std::isfinite(dual));
    }
}

TEST(Sharp, TinyNormsWithZeroEps) {
    // eps = 0 is a valid config ("eps >= 0"): a non-zero matrix is then divided by its exact
    // norm, however small. float64 entries of 1e-200 underflow a plain sum of squares (to 0);
    // a float32 subnormal (1e-40) has a reciprocal norm above FLT_MAX.
    for (dm_norm norm : {DM_NORM_SPECTRAL, DM_NORM_COLUMN, DM_NORM_ROW, DM_NORM_FROBENIUS}) {
        dm_sharp_config config = norm == DM_NORM_SPECTRAL ? dmtest::polar_express_config()
                                                          : dmtest::simple_config(norm, 0.0);
        config.eps = 0.0;
        config.norm_offset = 0.0;
        {
            SCOPED_TRACE(testing::Message() << dmtest::norm_name(norm) << " f64 1e-200");
            const Mat m = dmtest::random_normal(7, 64, 41, 1e-200);
            dm_status status;
            const Mat got = dmtest::sharp_f64(config, m, &status);
            ASSERT_EQ(status, DM_OK);
            const Mat expected = dmtest::ref_sharp(config, m);
            EXPECT_LE(dmtest::max_abs_diff(got, expected), 1e-10 * dmtest::max_abs(expected));
        }
        {
            SCOPED_TRACE(testing::Message() << dmtest::norm_name(norm) << " f32 1e-40");
            Mat m(7, 64);
            m(3, 5) = 1e-40;
            dm_status status;
            const Mat got = dmtest::sharp_f64(config, m, &status, nullptr, DM_FLOAT32);
            ASSERT_EQ(status, DM_OK);
            EXPECT_TRUE(dmtest::all_finite(got));
            Mat stored = m;
            stored(3, 5) = dmtest::round_to(DM_FLOAT32, 1e-40);
            const Mat expected = dmtest::ref_sharp(config, stored);
            EXPECT_LE(dmtest::max_abs_diff(got, expected), 1e-4 * dmtest::max_abs(expected));
        }
    }
}

TEST(Sharp, ZeroSizes) {
    double coefficients[15];
    for (dm_norm norm : kNorms)
        for (dm_dtype dtype : kDtypes) {
            SCOPED_TRACE(testing::Message()
                         << dmtest::norm_name(norm) << " " << dmtest::dtype_name(dtype));
            const dm_sharp_config config = dmtest::sharp_config_for(norm, coefficients);
            const int64_t sizes[][3] = {{0, 7, 7}, {3, 0, 7}, {3, 7, 0}, {0, 0, 0}};
            for (const auto &s : sizes) {
                size_t bytes = 123;
                ASSERT_EQ(dm_sharp_workspace_size(&config, dtype, s[0], s[1], s[2], &bytes), DM_OK);
                std::vector<unsigned char> workspace(bytes + 1);
                const void *in[3] = {nullptr, nullptr, nullptr};
                void *out[3] = {nullptr, nullptr, nullptr};
                double duals[3] = {4.0, 4.0, 4.0};
                EXPECT_EQ(dm_sharp(&config, dtype, s[0], s[1], s[2], in, s[2], out, s[2], duals,
                                   workspace.data(), bytes, nullptr),
                          DM_OK)
                    << s[0] << "x" << s[1] << "x" << s[2];
                for (int64_t b = 0; b < 3; ++b)
                    EXPECT_EQ(duals[b], b < s[0] ? 0.0 : 4.0) << "dual " << b;
            }
            // batch 0 needs no arrays and no workspace at all.
            EXPECT_EQ(dm_sharp(&config, dtype, 0, 7, 7, nullptr, 7, nullptr, 7, nullptr, nullptr, 0,
                               nullptr),
                      DM_OK);
        }
}

// A provider that checks its context and counts calls, then delegates to the reference.
struct CountingGemm {
    int calls = 0;
    int bad_ctx = 0;
    dm_dtype last_dtype = DM_FLOAT64;
};

dm_status counting_gemm(void *ctx, dm_dtype dtype, int trans_a, int trans_b, int64_t batch,
                        int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                        int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b, double beta,
                        const void *c_in, void *c, int64_t ldc, int64_t stride_c) {
    CountingGemm *counter = static_cast<CountingGemm *>(ctx);
    ++counter->calls;
    counter->last_dtype = dtype;
    return dm_gemm_reference(nullptr, dtype, trans_a, trans_b, batch, m, n, k, alpha, a, lda,
                             stride_a, b, ldb, stride_b, beta, c_in, c, ldc, stride_c);
}

TEST(Sharp, UsesGemmProvider) {
    // Newton-Schulz does all its products through the provider (three per step, batch folded
    // into one call), with ctx passed back unchanged and the iteration dtype; the result equals
    // the default (NULL) provider's.
    double coefficients[15];
    for (dm_dtype dtype : kDtypes)
        for (int precision = 0; precision < 2; ++precision) {
            SCOPED_TRACE(testing::Message()
                         << dmtest::dtype_name(dtype) << " ns_precision " << precision);
            dm_sharp_config config = dmtest::muon_config(coefficients);
            config.ns_precision = precision ? DM_NS_BFLOAT16 : DM_NS_NATIVE;
            CountingGemm counter;
            const dm_gemm_provider provider{counting_gemm, &counter, nullptr};
            std::vector<Buffer> in, out, out_default;
            for (int64_t b = 0; b < 3; ++b) {
                in.push_back(
                    dmtest::to_buffer(make_input(DM_NORM_SPECTRAL, 64, 7, b, 8), dtype, 7));
                out.push_back(Buffer(dtype, 64 * 7));
                out_default.push_back(Buffer(dtype, 64 * 7));
            }
            double duals[3], duals_default[3];
            ASSERT_EQ(dmtest::call_sharp(config, dtype, 64, 7, in, 7, out, 7, duals, &provider),
                      DM_OK);
            ASSERT_EQ(dmtest::call_sharp(config, dtype, 64, 7, in, 7, out_default, 7, duals_default,
                                         nullptr),
                      DM_OK);
            EXPECT_EQ(counter.calls, 3 * config.ns_steps);
            const dm_dtype iteration =
                precision ? DM_BFLOAT16 : (dtype == DM_FLOAT64 ? DM_FLOAT64 : DM_FLOAT32);
            EXPECT_EQ(counter.last_dtype, iteration);
            for (int64_t b = 0; b < 3; ++b) {
                EXPECT_EQ(out[b].bytes(), out_default[b].bytes());
                EXPECT_EQ(duals[b], duals_default[b]);
            }
        }
}

TEST(Sharp, ConfigMuon) {
    dm_sharp_config config;
    std::memset(&config, 0xFF, sizeof config);
    double coefficients[15];
    ASSERT_EQ(dm_sharp_config_muon(&config, coefficients), DM_OK);
    EXPECT_EQ(config.norm, DM_NORM_SPECTRAL);
    EXPECT_EQ(config.ns_steps, 5);
    EXPECT_EQ(config.ns_coefficients, coefficients);
    EXPECT_EQ(config.norm_scale, 1.0);
    EXPECT_EQ(config.norm_offset, 0.0);
    EXPECT_EQ(config.eps, 1e-7);
    EXPECT_EQ(config.ns_precision, DM_NS_NATIVE);
    for (int j = 0; j < 5; ++j) {
        EXPECT_EQ(coefficients[3 * j], DM_MUON_NS_A);
        EXPECT_EQ(coefficients[3 * j + 1], DM_MUON_NS_B);
        EXPECT_EQ(coefficients[3 * j + 2], DM_MUON_NS_C);
    }
    EXPECT_EQ(dm_sharp_config_muon(nullptr, coefficients), DM_ERR_INVALID_ARG);
    EXPECT_EQ(dm_sharp_config_muon(&config, nullptr), DM_ERR_INVALID_ARG);
}

// ---- one test per error code ----------------------------------------------------------------

// Calls dm_sharp on a valid 7x64 float32 batch of 2 with the config (and argument) changes that
// mutate() makes, expects `expected`, and checks that outputs and duals are untouched.
struct SharpCall {
    dm_sharp_config config;
    dm_dtype dtype = DM_FLOAT32;
    int64_t batch = 2, rows = 7, cols = 64, in_ld = 64, out_ld = 64;
    const void *const *inputs = nullptr;
    void *const *outputs = nullptr;
    bool null_workspace = false;
    ptrdiff_t workspace_delta = 0; // bytes passed relative to what the size query said
};

void expect_sharp_error(SharpCall call, dm_status expected, const char *what) {
    SCOPED_TRACE(what);
    std::vector<Buffer> in, out;
    for (int64_t b = 0; b < 2; ++b) {
        in.push_back(dmtest::to_buffer(make_input(DM_NORM_SPECTRAL, 7, 64, b, 2), DM_FLOAT32, 64));
        out.push_back(Buffer(DM_FLOAT32, 7 * 64));
        out.back().fill(-5.0);
    }
    const std::vector<Buffer> out_before = out;
    std::vector<const void *> in_ptr = dmtest::const_pointers(in);
    std::vector<void *> out_ptr = dmtest::pointers(out);
    // The workspace is sized for the valid problem, so that only the mutated argument is wrong.
    size_t bytes = 0;
    double coefficients[15];
    const dm_sharp_config valid = dmtest::muon_config(coefficients);
    ASSERT_EQ(dm_sharp_workspace_size(&valid, DM_FLOAT32, 2, 7, 64, &bytes), DM_OK);
    std::vector<unsigned char> workspace(bytes + 4096);
    double duals[2] = {3.0, 3.0};
    const dm_status status = dm_sharp(
        &call.config, call.dtype, call.batch, call.rows, call.cols,
        call.inputs ? call.inputs : in_ptr.data(), call.in_ld,
        call.outputs ? call.outputs : out_ptr.data(), call.out_ld, duals,
        call.null_workspace ? nullptr : workspace.data(),
        static_cast<size_t>(static_cast<ptrdiff_t>(bytes) + call.workspace_delta), nullptr);
    EXPECT_EQ(status, expected) << dm_status_string(status);
    if (expected == DM_OK) return;
    for (int64_t b = 0; b < 2; ++b) EXPECT_EQ(out[b].bytes(), out_before[b].bytes());
    EXPECT_EQ(duals[0], 3.0);
    EXPECT_EQ(duals[1], 3.0);
}

SharpCall valid_call(double coefficients[15]) {
    SharpCall call;
    call.config = dmtest::muon_config(coefficients);
    return call;
}

TEST(Sharp, ErrInvalidArg) {
    double coefficients[15];
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    expect_sharp_error(valid_call(coefficients), DM_OK, "the valid call itself");
    {
        SharpCall call = valid_call(coefficients);
        dmtest::set_raw_enum(&call.config.norm, 5);
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "unknown norm");
    }
    for (double eps : {-1e-7, nan, inf}) {
        SharpCall call = valid_call(coefficients);
        call.config.eps = eps;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "eps negative or non-finite");
        call.config.norm = DM_NORM_FROBENIUS;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "eps negative or non-finite (frobenius)");
    }
    for (double scale : {0.0, -1.0, nan, inf}) {
        SharpCall call = valid_call(coefficients);
        call.config.norm_scale = scale;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "norm_scale not > 0 and finite");
    }
    for (double offset : {-1e-6, nan, inf}) {
        SharpCall call = valid_call(coefficients);
        call.config.norm_offset = offset;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "norm_offset not >= 0 and finite");
    }
    {
        SharpCall call = valid_call(coefficients);
        call.config.ns_steps = -1;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "ns_steps < 0");
        call = valid_call(coefficients);
        call.config.ns_coefficients = nullptr;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "NULL coefficients with steps > 0");
        call = valid_call(coefficients);
        dmtest::set_raw_enum(&call.config.ns_precision, 2);
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "unknown ns_precision");
    }
    for (double bad : {nan, inf}) {
        double broken[15];
        SharpCall call = valid_call(broken);
        broken[7] = bad;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "non-finite coefficient");
    }
    {
        SharpCall call = valid_call(coefficients);
        const void *const null_inputs[2] = {nullptr, nullptr};
        const void *one_null[2] = {nullptr, nullptr};
        call.inputs = null_inputs;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "NULL input matrices");
        std::vector<Buffer> keep{Buffer(DM_FLOAT32, 7 * 64)};
        one_null[0] = keep[0].data();
        call.inputs = one_null;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "second input matrix NULL");
        call = valid_call(coefficients);
        void *const null_outputs[2] = {nullptr, nullptr};
        call.outputs = null_outputs;
        expect_sharp_error(call, DM_ERR_INVALID_ARG, "NULL output matrices");
    }
    // NULL config, NULL arrays, NULL bytes.
    const dm_sharp_config muon = dmtest::muon_config(coefficients);
    Buffer m(DM_FLOAT32, 7 * 64), o(DM_FLOAT32, 7 * 64);
    const void *in[1] = {m.data()};
    void *out[1] = {o.data()};
    std::vector<unsigned char> workspace(1 << 20);
    EXPECT_EQ(dm_sharp(nullptr, DM_FLOAT32, 1, 7, 64, in, 64, out, 64, nullptr, workspace.data(),
                       workspace.size(), nullptr),
              DM_ERR_INVALID_ARG);
    EXPECT_EQ(dm_sharp(&muon, DM_FLOAT32, 1, 7, 64, nullptr, 64, out, 64, nullptr, workspace.data(),
                       workspace.size(), nullptr),
              DM_ERR_INVALID_ARG);
    EXPECT_EQ(dm_sharp(&muon, DM_FLOAT32, 1, 7, 64, in, 64, nullptr, 64, nullptr, workspace.data(),
                       workspace.size(), nullptr),
              DM_ERR_INVALID_ARG);
    size_t bytes = 0;
    EXPECT_EQ(dm_sharp_workspace_size(nullptr, DM_FLOAT32, 1, 7, 64, &bytes), DM_ERR_INVALID_ARG);
    EXPECT_EQ(dm_sharp_workspace_size(&muon, DM_FLOAT32, 1, 7, 64, nullptr), DM_ERR_INVALID_ARG);
}

TEST(Sharp, ErrShape) {
    double coefficients[15];
    const char *what[] = {"negative batch", "negative rows", "negative cols"};
    for (int which = 0; which < 3; ++which) {
        SharpCall call = valid_call(coefficients);
        (which == 0 ? call.batch : which == 1 ? call.rows : call.cols) = -1;
        expect_sharp_error(call, DM_ERR_SHAPE, what[which]);
    }
    SharpCall call = valid_call(coefficients);
    call.in_ld = 63;
    expect_sharp_error(call, DM_ERR_SHAPE, "in_ld < cols");
    call = valid_call(coefficients);
    call.out_ld = 63;
    expect_sharp_error(call, DM_ERR_SHAPE, "out_ld < cols");

    // Sizes whose element count overflows are rejected by the size query and by the call.
    size_t bytes = 0;
    const dm_sharp_config config = valid_call(coefficients).config;
    EXPECT_EQ(dm_sharp_workspace_size(&config, DM_FLOAT32, 1, INT64_MAX / 2, 4, &bytes),
              DM_ERR_SHAPE);
    EXPECT_EQ(dm_sharp_workspace_size(&config, DM_FLOAT64, 1 << 20, 1 << 20, 1 << 20, &bytes),
              DM_ERR_SHAPE);
    EXPECT_EQ(dm_sharp_workspace_size(&config, DM_FLOAT32, 3, INT64_MAX / 2, 0, &bytes),
              DM_OK); // an empty matrix, however many rows
    // rows * in_ld overflows int64 although rows * cols does not: rejected before any access
    // (the workspace claims to be big enough; it is never touched).
    unsigned char dummy[64] = {0};
    const void *in[1] = {dummy};
    void *out[1] = {dummy};
    const dm_sharp_config sign = dmtest::simple_config(DM_NORM_SIGN);
    EXPECT_EQ(dm_sharp(&sign, DM_FLOAT32, 1, int64_t{1} << 33, 1, in, int64_t{1} << 31, out, 1,
                       nullptr, dummy, SIZE_MAX, nullptr),
              DM_ERR_SHAPE);
}

TEST(Sharp, ErrDtype) {
    double coefficients[15];
    SharpCall call = valid_call(coefficients);
    dmtest::set_raw_enum(&call.dtype, 3);
    expect_sharp_error(call, DM_ERR_DTYPE, "dtype outside the enum");
    size_t bytes = 0;
    EXPECT_EQ(dm_sharp_workspace_size(&call.config, call.dtype, 1, 7, 64, &bytes), DM_ERR_DTYPE);
}

TEST(Sharp, ErrWorkspace) {
    double coefficients[15];
    for (dm_norm norm : kNorms) {
        SCOPED_TRACE(dmtest::norm_name(norm));
        SharpCall call = valid_call(coefficients);
        call.config.norm = norm;
        size_t needed = 0;
        ASSERT_EQ(dm_sharp_workspace_size(&call.config, DM_FLOAT32, 2, 7, 64, &needed), DM_OK);
        ASSERT_GT(needed, 0u);
        size_t spectral = 0;
        const dm_sharp_config muon = dmtest::muon_config(coefficients);
        ASSERT_EQ(dm_sharp_workspace_size(&muon, DM_FLOAT32, 2, 7, 64, &spectral), DM_OK);
        // expect_sharp_error passes the spectral size plus workspace_delta.
        call.workspace_delta =
            static_cast<ptrdiff_t>(needed) - static_cast<ptrdiff_t>(spectral) - 1;
        expect_sharp_error(call, DM_ERR_WORKSPACE, "one byte short");
        call.workspace_delta = 0;
        call.null_workspace = true;
        expect_sharp_error(call, DM_ERR_WORKSPACE, "NULL workspace");
    }
}

} // namespace
