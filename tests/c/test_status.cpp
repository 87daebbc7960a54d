// Status strings, the version, and the status codes that only a failing collaborator produces:
// DM_ERR_GEMM (a matrix-product provider that fails) and DM_ERR_CUDA (CUDA entry points only).
#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "reference.h"

namespace {

using dmtest::Buffer;

struct NamedStatus {
    dm_status status;
    const char *name;
};

const NamedStatus kStatuses[] = {
    {DM_OK, "DM_OK"},
    {DM_ERR_INVALID_ARG, "DM_ERR_INVALID_ARG"},
    {DM_ERR_SHAPE, "DM_ERR_SHAPE"},
    {DM_ERR_DTYPE, "DM_ERR_DTYPE"},
    {DM_ERR_WORKSPACE, "DM_ERR_WORKSPACE"},
    {DM_ERR_NONFINITE, "DM_ERR_NONFINITE"},
    {DM_ERR_PROBABILITY, "DM_ERR_PROBABILITY"},
    {DM_ERR_GEMM, "DM_ERR_GEMM"},
    {DM_ERR_CUDA, "DM_ERR_CUDA"},
};

TEST(Status, ValuesAreStable) {
    // "Values are stable: never renumber, only append."
    for (size_t k = 0; k < sizeof kStatuses / sizeof kStatuses[0]; ++k)
        EXPECT_EQ(static_cast<int>(kStatuses[k].status), static_cast<int>(k)) << kStatuses[k].name;
}

TEST(Status, StringsStartWithTheirName) {
    std::set<std::string> seen;
    for (const NamedStatus &s : kStatuses) {
        const char *text = dm_status_string(s.status);
        ASSERT_NE(text, nullptr) << s.name;
        const std::string prefix = std::string(s.name) + ":";
        EXPECT_EQ(std::string(text).compare(0, prefix.size(), prefix), 0)
            << s.name << " -> \"" << text << "\"";
        seen.insert(text);
    }
    EXPECT_EQ(seen.size(), sizeof kStatuses / sizeof kStatuses[0]) << "strings are not distinct";
}

TEST(Status, UnknownValueHasAString) {
    // Values past the last code (9..15 stay inside the enum's range for a C++ caller).
    for (int raw : {9, 15}) {
        dm_status unknown;
        dmtest::set_raw_enum(&unknown, raw);
        const char *text = dm_status_string(unknown);
        ASSERT_NE(text, nullptr);
        EXPECT_GT(std::strlen(text), 0u);
        for (const NamedStatus &s : kStatuses) EXPECT_STRNE(text, dm_status_string(s.status));
    }
}

TEST(Status, Version) {
    EXPECT_EQ(dm_version(), DM_VERSION_MAJOR * 10000 + DM_VERSION_MINOR * 100 + DM_VERSION_PATCH);
    EXPECT_GE(DM_VERSION_MINOR, 0);
    EXPECT_LT(DM_VERSION_MINOR, 100);
    EXPECT_LT(DM_VERSION_PATCH, 100);
}

// A provider that fails on its n-th call (counting from 1) and otherwise delegates.
struct FailingGemm {
    int fail_on = 1;
    int calls = 0;
};

dm_status failing_gemm(void *ctx, dm_dtype dtype, int trans_a, int trans_b, int64_t batch,
                       int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                       int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b, double beta,
                       const void *c_in, void *c, int64_t ldc, int64_t stride_c) {
    FailingGemm *state = static_cast<FailingGemm *>(ctx);
    if (++state->calls == state->fail_on) return DM_ERR_INVALID_ARG; // any non-OK status
    return dm_gemm_reference(nullptr, dtype, trans_a, trans_b, batch, m, n, k, alpha, a, lda,
                             stride_a, b, ldb, stride_b, beta, c_in, c, ldc, stride_c);
}

TEST(Status, ErrGemmFromSharp) {
    // A provider failure anywhere in Newton-Schulz (first, middle or last product) surfaces as
    // DM_ERR_GEMM, with outputs and duals untouched (dm_sharp: "On any error status nothing has
    // been written to outputs or duals"), also when outputs alias inputs.
    double coefficients[15];
    const dm_sharp_config config = dmtest::muon_config(coefficients);
    for (dm_dtype dtype : {DM_FLOAT32, DM_FLOAT64, DM_BFLOAT16})
        for (int fail_on : {1, 8, 15}) {
            SCOPED_TRACE(testing::Message()
                         << dmtest::dtype_name(dtype) << " fail on call " << fail_on);
            FailingGemm state;
            state.fail_on = fail_on;
            const dm_gemm_provider provider{failing_gemm, &state, nullptr};
            std::vector<Buffer> in, out;
            for (int b = 0; b < 2; ++b) {
                in.push_back(dmtest::to_buffer(dmtest::random_normal(64, 7, 20 + b), dtype, 7));
                out.push_back(Buffer(dtype, 64 * 7));
                out.back().fill(-3.0);
            }
            const std::vector<Buffer> in_before = in, out_before = out;
            double duals[2] = {8.0, 8.0};
            EXPECT_EQ(dmtest::call_sharp(config, dtype, 64, 7, in, 7, out, 7, duals, &provider),
                      DM_ERR_GEMM);
            EXPECT_EQ(state.calls, fail_on) << "no product after the failure";
            for (int b = 0; b < 2; ++b) EXPECT_EQ(out[b].bytes(), out_before[b].bytes());
            EXPECT_EQ(duals[0], 8.0);
            EXPECT_EQ(duals[1], 8.0);
            state.calls = 0;
            EXPECT_EQ(dmtest::call_sharp(config, dtype, 64, 7, in, 7, in, 7, duals, &provider),
                      DM_ERR_GEMM);
            for (int b = 0; b < 2; ++b) EXPECT_EQ(in[b].bytes(), in_before[b].bytes());
        }
    // The other norms do no products: even a provider that always fails is never called.
    for (dm_norm norm : {DM_NORM_SIGN, DM_NORM_COLUMN, DM_NORM_ROW, DM_NORM_FROBENIUS}) {
        FailingGemm state;
        const dm_gemm_provider provider{failing_gemm, &state, nullptr};
        std::vector<Buffer> in{dmtest::to_buffer(dmtest::random_normal(7, 64, 1), DM_FLOAT32, 64)};
        std::vector<Buffer> out{Buffer(DM_FLOAT32, 7 * 64)};
        EXPECT_EQ(dmtest::call_sharp(dmtest::simple_config(norm), DM_FLOAT32, 7, 64, in, 64, out,
                                     64, nullptr, &provider),
                  DM_OK);
        EXPECT_EQ(state.calls, 0);
    }
}

TEST(Status, ErrGemmFromUpdate) {
    // dm_update passes the provider's failure on as DM_ERR_GEMM and leaves the parameters and
    // the momentum buffers as they were (the products run before anything is written).
    double coefficients[15];
    dm_update_config config{};
    dm_sharp_config_muon(&config.sharp, coefficients);
    config.lr = 0.02;
    config.momentum = 0.95;
    config.nesterov = 1;
    FailingGemm state;
    state.fail_on = 2;
    const dm_gemm_provider provider{failing_gemm, &state, nullptr};
    std::vector<Buffer> x, g, m;
    for (int b = 0; b < 2; ++b) {
        x.push_back(dmtest::to_buffer(dmtest::random_normal(7, 64, 30 + b), DM_FLOAT32, 64));
        g.push_back(dmtest::to_buffer(dmtest::random_normal(7, 64, 40 + b), DM_FLOAT32, 64));
        m.push_back(dmtest::to_buffer(dmtest::random_normal(7, 64, 50 + b), DM_FLOAT32, 64));
    }
    const std::vector<Buffer> x_before = x, m_before = m;
    size_t bytes = 0;
    ASSERT_EQ(dm_update_workspace_size(&config, DM_FLOAT32, 2, 7, 64, &bytes), DM_OK);
    std::vector<unsigned char> workspace(bytes);
    std::vector<void *> xp = dmtest::pointers(x), mp = dmtest::pointers(m);
    std::vector<const void *> gp = dmtest::const_pointers(g);
    double duals[2] = {8.0, 8.0};
    EXPECT_EQ(dm_update(&config, DM_FLOAT32, 2, 7, 64, xp.data(), gp.data(), mp.data(), duals,
                        workspace.data(), bytes, &provider),
              DM_ERR_GEMM);
    for (int b = 0; b < 2; ++b) {
        EXPECT_EQ(x[b].bytes(), x_before[b].bytes());
        EXPECT_EQ(m[b].bytes(), m_before[b].bytes());
    }
    EXPECT_EQ(duals[0], 8.0);
}

TEST(Status, ErrCudaString) {
    // DM_ERR_CUDA comes only from CUDA entry points; this CPU-only core has none, so the code
    // cannot be produced here: only its string is checked.
    const std::string text = dm_status_string(DM_ERR_CUDA);
    EXPECT_EQ(text.rfind("DM_ERR_CUDA:", 0), 0u) << text;
}

} // namespace
