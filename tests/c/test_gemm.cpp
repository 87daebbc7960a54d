// dm_gemm_reference against a float64 triple loop: every transpose combination, strided batches,
// alpha/beta (beta == 0 must not read C), padding between rows, and one test per error code.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "reference.h"

namespace {

using dmtest::Buffer;

struct GemmCase {
    int trans_a, trans_b;
    int64_t batch, m, n, k;
    double alpha, beta;
};

// Relative tolerance per dtype, against the sum of absolute terms of each output element.
double gemm_tolerance(dm_dtype dtype) {
    return dtype == DM_FLOAT64 ? 1e-13 : dtype == DM_FLOAT32 ? 1e-5 : 1e-2;
}

// Runs one case with padded leading dimensions and batch strides larger than a matrix. The
// padding of A and B holds NaN (so reading it would poison the result), the padding of C holds a
// sentinel that must survive; with beta == 0 the live part of C holds NaN too.
void check_gemm(dm_dtype dtype, const GemmCase &c) {
    SCOPED_TRACE(testing::Message()
                 << dmtest::dtype_name(dtype) << " trans " << c.trans_a << c.trans_b << " batch "
                 << c.batch << " m " << c.m << " n " << c.n << " k " << c.k << " alpha " << c.alpha
                 << " beta " << c.beta);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const int64_t a_rows = c.trans_a ? c.k : c.m, a_cols = c.trans_a ? c.m : c.k;
    const int64_t b_rows = c.trans_b ? c.n : c.k, b_cols = c.trans_b ? c.k : c.n;
    const int64_t lda = a_cols + 3, ldb = b_cols + 1, ldc = c.n + 2;
    const int64_t stride_a = a_rows * lda + 5, stride_b = b_rows * ldb + 2,
                  stride_c = c.m * ldc + 3;
    Buffer a(dtype, static_cast<size_t>(c.batch * stride_a));
    Buffer b(dtype, static_cast<size_t>(c.batch * stride_b));
    Buffer out(dtype, static_cast<size_t>(c.batch * stride_c));
    a.fill(nan);
    b.fill(nan);
    out.fill(1234.0);
    const uint64_t seed = static_cast<uint64_t>(c.m * 1000003 + c.n * 1009 + c.k);
    for (int64_t bi = 0; bi < c.batch; ++bi) {
        const dmtest::Mat ma = dmtest::random_normal(a_rows, a_cols, seed + 3 * bi);
        const dmtest::Mat mb = dmtest::random_normal(b_rows, b_cols, seed + 3 * bi + 1);
        const dmtest::Mat mc = dmtest::random_normal(c.m, c.n, seed + 3 * bi + 2);
        for (int64_t i = 0; i < a_rows; ++i)
            for (int64_t j = 0; j < a_cols; ++j)
                a.set(static_cast<size_t>(bi * stride_a + i * lda + j), ma(i, j));
        for (int64_t i = 0; i < b_rows; ++i)
            for (int64_t j = 0; j < b_cols; ++j)
                b.set(static_cast<size_t>(bi * stride_b + i * ldb + j), mb(i, j));
        for (int64_t i = 0; i < c.m; ++i)
            for (int64_t j = 0; j < c.n; ++j)
                out.set(static_cast<size_t>(bi * stride_c + i * ldc + j),
                        c.beta == 0.0 ? nan : mc(i, j));
    }
    const Buffer before = out;

    ASSERT_EQ(dm_gemm_reference(nullptr, dtype, c.trans_a, c.trans_b, c.batch, c.m, c.n, c.k,
                                c.alpha, a.data(), lda, stride_a, b.data(), ldb, stride_b, c.beta,
                                out.data(), out.data(), ldc, stride_c),
              DM_OK);

    auto op_a = [&](int64_t bi, int64_t i, int64_t l) {
        return c.trans_a ? a.get(static_cast<size_t>(bi * stride_a + l * lda + i))
                         : a.get(static_cast<size_t>(bi * stride_a + i * lda + l));
    };
    auto op_b = [&](int64_t bi, int64_t l, int64_t j) {
        return c.trans_b ? b.get(static_cast<size_t>(bi * stride_b + j * ldb + l))
                         : b.get(static_cast<size_t>(bi * stride_b + l * ldb + j));
    };
    int64_t bad = 0;
    for (int64_t bi = 0; bi < c.batch; ++bi)
        for (int64_t i = 0; i < c.m; ++i)
            for (int64_t j = 0; j < c.n; ++j) {
                const size_t at = static_cast<size_t>(bi * stride_c + i * ldc + j);
                double acc = 0.0, magnitude = 0.0;
                for (int64_t l = 0; l < c.k; ++l) {
                    acc += op_a(bi, i, l) * op_b(bi, l, j);
                    magnitude += std::fabs(op_a(bi, i, l) * op_b(bi, l, j));
                }
                const double old = c.beta == 0.0 ? 0.0 : before.get(at);
                const double expected = c.alpha * acc + c.beta * old;
                const double scale = std::fabs(c.alpha) * magnitude + std::fabs(c.beta * old);
                const double got = out.get(at);
                if (!(std::fabs(got - expected) <= gemm_tolerance(dtype) * scale + 1e-300) &&
                    ++bad <= 5)
                    ADD_FAILURE() << "C[" << bi << "](" << i << "," << j << ") = " << got
                                  << ", expected " << expected;
            }
    EXPECT_EQ(bad, 0);
    // Every element outside the live m x n block of each batch entry is untouched.
    for (int64_t bi = 0; bi < c.batch; ++bi)
        for (int64_t off = 0; off < stride_c; ++off) {
            const int64_t i = off / ldc, j = off % ldc;
            if (i < c.m && j < c.n) continue;
            const size_t at = static_cast<size_t>(bi * stride_c + off);
            ASSERT_EQ(std::memcmp(&out.bytes()[at * dmtest::dtype_size(dtype)],
                                  &before.bytes()[at * dmtest::dtype_size(dtype)],
                                  dmtest::dtype_size(dtype)),
                      0)
                << "padding element " << off << " of batch " << bi << " was written";
        }
}

void check_all_shapes(dm_dtype dtype) {
    const int64_t shapes[][3] = {{1, 1, 1},   {7, 1, 64},  {1, 7, 7},    {7, 64, 7},
                                 {64, 7, 64}, {64, 64, 1}, {1, 4097, 7}, {2, 3, 4097}};
    const double scalars[][2] = {{1.0, 0.0}, {0.75, -1.25}, {-2.0, 1.0}};
    for (const auto &s : shapes)
        for (int trans_a = 0; trans_a < 2; ++trans_a)
            for (int trans_b = 0; trans_b < 2; ++trans_b)
                for (const auto &ab : scalars)
                    for (int64_t batch : {1, 3})
                        check_gemm(dtype,
                                   {trans_a, trans_b, batch, s[0], s[1], s[2], ab[0], ab[1]});
}

TEST(Gemm, Float64AllTransposes) { check_all_shapes(DM_FLOAT64); }

TEST(Gemm, Float32AllTransposes) { check_all_shapes(DM_FLOAT32); }

TEST(Gemm, Bfloat16AllTransposes) { check_all_shapes(DM_BFLOAT16); }

TEST(Gemm, BetaZeroDoesNotReadC) {
    // C starts as NaN everywhere: any read of C with beta == 0 would leave a NaN behind.
    for (dm_dtype dtype : {DM_FLOAT32, DM_FLOAT64, DM_BFLOAT16}) {
        SCOPED_TRACE(dmtest::dtype_name(dtype));
        Buffer a(dtype, 6), b(dtype, 6), c(dtype, 4);
        for (size_t k = 0; k < 6; ++k) {
            a.set(k, static_cast<double>(k) + 1.0); // [[1 2 3] [4 5 6]]
            b.set(k, static_cast<double>(k) - 2.0); // [[-2 -1] [0 1] [2 3]]
        }
        c.fill(std::numeric_limits<double>::quiet_NaN());
        ASSERT_EQ(dm_gemm_reference(nullptr, dtype, 0, 0, 1, 2, 2, 3, 2.0, a.data(), 3, 0, b.data(),
                                    2, 0, 0.0, nullptr, c.data(), 2, 0),
                  DM_OK);
        const double expected[4] = {2 * 4.0, 2 * 10.0, 2 * 4.0, 2 * 19.0};
        for (size_t k = 0; k < 4; ++k) EXPECT_EQ(c.get(k), expected[k]) << "element " << k;
    }
}

TEST(Gemm, EmptyInnerDimensionScalesC) {
    // k == 0: C = beta * C (and exactly 0 for beta == 0, even over NaN).
    for (dm_dtype dtype : {DM_FLOAT32, DM_FLOAT64, DM_BFLOAT16}) {
        SCOPED_TRACE(dmtest::dtype_name(dtype));
        Buffer a(dtype, 1), b(dtype, 1), c(dtype, 6);
        for (size_t k = 0; k < 6; ++k) c.set(k, static_cast<double>(k) + 0.5);
        ASSERT_EQ(dm_gemm_reference(nullptr, dtype, 0, 0, 1, 2, 3, 0, 1.0, a.data(), 1, 0, b.data(),
                                    3, 0, -2.0, c.data(), c.data(), 3, 0),
                  DM_OK);
        for (size_t k = 0; k < 6; ++k) EXPECT_EQ(c.get(k), -2.0 * (static_cast<double>(k) + 0.5));
        c.fill(std::numeric_limits<double>::quiet_NaN());
        ASSERT_EQ(dm_gemm_reference(nullptr, dtype, 0, 0, 1, 2, 3, 0, 1.0, a.data(), 1, 0, b.data(),
                                    3, 0, 0.0, nullptr, c.data(), 3, 0),
                  DM_OK);
        for (size_t k = 0; k < 6; ++k) EXPECT_EQ(c.get(k), 0.0);
    }
}

TEST(Gemm, SeparateCinIsReadNotWritten) {
    // C = alpha A B + beta Cin with Cin elsewhere: Cin stays as it was, C gets the sum, and a
    // NULL Cin with beta != 0 is refused.
    for (dm_dtype dtype : {DM_FLOAT32, DM_FLOAT64, DM_BFLOAT16}) {
        SCOPED_TRACE(dmtest::dtype_name(dtype));
        Buffer a(dtype, 6), b(dtype, 6), c_in(dtype, 4), c(dtype, 4);
        for (size_t k = 0; k < 6; ++k) {
            a.set(k, static_cast<double>(k) + 1.0); // [[1 2 3] [4 5 6]]
            b.set(k, static_cast<double>(k) - 2.0); // [[-2 -1] [0 1] [2 3]]
        }
        for (size_t k = 0; k < 4; ++k) c_in.set(k, static_cast<double>(k));
        c.fill(std::numeric_limits<double>::quiet_NaN());
        const Buffer c_in_before = c_in;
        ASSERT_EQ(dm_gemm_reference(nullptr, dtype, 0, 0, 1, 2, 2, 3, 1.0, a.data(), 3, 0, b.data(),
                                    2, 0, 0.5, c_in.data(), c.data(), 2, 0),
                  DM_OK);
        const double expected[4] = {4.0, 10.5, 5.0, 20.5};
        for (size_t k = 0; k < 4; ++k) EXPECT_EQ(c.get(k), expected[k]) << "element " << k;
        EXPECT_EQ(c_in.bytes(), c_in_before.bytes());
        EXPECT_EQ(dm_gemm_reference(nullptr, dtype, 0, 0, 1, 2, 2, 3, 1.0, a.data(), 3, 0, b.data(),
                                    2, 0, 0.5, nullptr, c.data(), 2, 0),
                  DM_ERR_INVALID_ARG);
    }
}

TEST(Gemm, EmptyOutputIsOk) {
    // m, n or batch zero: nothing to compute, C untouched.
    Buffer a(DM_FLOAT64, 4), b(DM_FLOAT64, 4), c(DM_FLOAT64, 4);
    c.fill(5.0);
    const int64_t sizes[][4] = {{0, 2, 2, 2}, {1, 0, 2, 2}, {1, 2, 0, 2}};
    for (const auto &s : sizes) {
        EXPECT_EQ(dm_gemm_reference(nullptr, DM_FLOAT64, 0, 0, s[0], s[1], s[2], s[3], 1.0,
                                    a.data(), 2, 4, b.data(), 2, 4, 0.0, nullptr, c.data(), 2, 4),
                  DM_OK);
    }
    for (size_t k = 0; k < 4; ++k) EXPECT_EQ(c.get(k), 5.0);
}

TEST(Gemm, ErrShape) {
    Buffer a(DM_FLOAT64, 64), b(DM_FLOAT64, 64), c(DM_FLOAT64, 64);
    auto call = [&](int ta, int tb, int64_t batch, int64_t m, int64_t n, int64_t k, int64_t lda,
                    int64_t ldb, int64_t ldc) {
        return dm_gemm_reference(nullptr, DM_FLOAT64, ta, tb, batch, m, n, k, 1.0, a.data(), lda, 0,
                                 b.data(), ldb, 0, 0.0, nullptr, c.data(), ldc, 0);
    };
    // Negative sizes.
    EXPECT_EQ(call(0, 0, -1, 2, 3, 4, 4, 3, 3), DM_ERR_SHAPE);
    EXPECT_EQ(call(0, 0, 1, -2, 3, 4, 4, 3, 3), DM_ERR_SHAPE);
    EXPECT_EQ(call(0, 0, 1, 2, -3, 4, 4, 3, 3), DM_ERR_SHAPE);
    EXPECT_EQ(call(0, 0, 1, 2, 3, -4, 4, 3, 3), DM_ERR_SHAPE);
    // m = 2, n = 3, k = 4: op(A) 2x4, op(B) 4x3, C 2x3. The smallest valid leading dimensions
    // pass, one less fails: A stored 2x4 (lda >= 4) or 4x2 (lda >= 2), B stored 4x3 (ldb >= 3)
    // or 3x4 (ldb >= 4), C 2x3 (ldc >= 3).
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
            SCOPED_TRACE(testing::Message() << "trans " << ta << tb);
            const int64_t lda = ta ? 2 : 4, ldb = tb ? 4 : 3;
            EXPECT_EQ(call(ta, tb, 1, 2, 3, 4, lda, ldb, 3), DM_OK);
            EXPECT_EQ(call(ta, tb, 1, 2, 3, 4, lda - 1, ldb, 3), DM_ERR_SHAPE);
            EXPECT_EQ(call(ta, tb, 1, 2, 3, 4, lda, ldb - 1, 3), DM_ERR_SHAPE);
            EXPECT_EQ(call(ta, tb, 1, 2, 3, 4, lda, ldb, 2), DM_ERR_SHAPE);
        }
}

TEST(Gemm, ErrInvalidArg) {
    Buffer a(DM_FLOAT32, 4), b(DM_FLOAT32, 4), c(DM_FLOAT32, 4);
    c.fill(3.0);
    auto call = [&](const void *pa, const void *pb, void *pc) {
        return dm_gemm_reference(nullptr, DM_FLOAT32, 0, 0, 1, 2, 2, 2, 1.0, pa, 2, 0, pb, 2, 0,
                                 0.0, nullptr, pc, 2, 0);
    };
    EXPECT_EQ(call(nullptr, b.data(), c.data()), DM_ERR_INVALID_ARG);
    EXPECT_EQ(call(a.data(), nullptr, c.data()), DM_ERR_INVALID_ARG);
    EXPECT_EQ(call(a.data(), b.data(), nullptr), DM_ERR_INVALID_ARG);
    for (size_t k = 0; k < 4; ++k) EXPECT_EQ(c.get(k), 3.0);
}

TEST(Gemm, ErrDtype) {
    // bfloat16 is a supported gemm dtype (header: bf16 operands, f32 accumulation; see
    // Bfloat16AllTransposes); a value outside the enum is rejected. (3 is the one such value a
    // C++ caller may pass by value without UBSan's enum-range check objecting.)
    Buffer a(DM_FLOAT64, 4), b(DM_FLOAT64, 4), c(DM_FLOAT64, 4);
    c.fill(3.0);
    dm_dtype bad;
    dmtest::set_raw_enum(&bad, 3);
    EXPECT_EQ(dm_gemm_reference(nullptr, bad, 0, 0, 1, 2, 2, 2, 1.0, a.data(), 2, 0, b.data(), 2, 0,
                                0.0, nullptr, c.data(), 2, 0),
              DM_ERR_DTYPE);
    for (size_t k = 0; k < 4; ++k) EXPECT_EQ(c.get(k), 3.0);
}

} // namespace
