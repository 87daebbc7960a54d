/* gemm_reference.c - the plain C matrix product used when no provider is given.
 *
 * Correct for every transpose combination, cache-friendly for the two forms the kernels use
 * (A B and A B^T), and nothing more: the torch shim hands the kernels torch's BLAS instead. */
#include "internal.h"

#define DEFINE_GEMM(T, SUFFIX)                                                                     \
    static void gemm_##SUFFIX(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, T alpha,  \
                              const T *a, int64_t lda, const T *b, int64_t ldb, T beta,            \
                              const T *c_in, T *c, int64_t ldc) {                                  \
        for (int64_t i = 0; i < m; ++i) {                                                          \
            T *c_row = c + i * ldc;                                                                \
            for (int64_t j = 0; j < n; ++j)                                                        \
                c_row[j] = beta == (T)0 ? (T)0 : beta * c_in[i * ldc + j];                         \
        }                                                                                          \
        if (trans_b) { /* C[i][j] += alpha * dot(op(A) row i, B row j): both rows contiguous */    \
            for (int64_t i = 0; i < m; ++i)                                                        \
                for (int64_t j = 0; j < n; ++j) {                                                  \
                    const T *b_row = b + j * ldb;                                                  \
                    T acc = 0;                                                                     \
                    if (trans_a)                                                                   \
                        for (int64_t l = 0; l < k; ++l) acc += a[l * lda + i] * b_row[l];          \
                    else                                                                           \
                        for (int64_t l = 0; l < k; ++l) acc += a[i * lda + l] * b_row[l];          \
                    c[i * ldc + j] += alpha * acc;                                                 \
                }                                                                                  \
        } else { /* C row i += alpha * op(A)[i][l] * B row l: streams rows of B and C */           \
            for (int64_t i = 0; i < m; ++i) {                                                      \
                T *c_row = c + i * ldc;                                                            \
                for (int64_t l = 0; l < k; ++l) {                                                  \
                    const T s = alpha * (trans_a ? a[l * lda + i] : a[i * lda + l]);               \
                    const T *b_row = b + l * ldb;                                                  \
                    for (int64_t j = 0; j < n; ++j) c_row[j] += s * b_row[j];                      \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_GEMM(float, f32)
DEFINE_GEMM(double, f64)

/* bfloat16 operands, float32 accumulation, one rounding of C at the end (as BLAS bf16 gemm). */
static void gemm_bf16(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb, float beta,
                      const uint16_t *c_in, uint16_t *c, int64_t ldc) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
            float acc = 0.0f;
            for (int64_t l = 0; l < k; ++l)
                acc += dmi_bf16_to_f32(trans_a ? a[l * lda + i] : a[i * lda + l]) *
                       dmi_bf16_to_f32(trans_b ? b[j * ldb + l] : b[l * ldb + j]);
            const float old = beta == 0.0f ? 0.0f : beta * dmi_bf16_to_f32(c_in[i * ldc + j]);
            c[i * ldc + j] = dmi_f32_to_bf16(alpha * acc + old);
        }
}

dm_status dm_gemm_reference(void *ctx, dm_dtype dtype, int trans_a, int trans_b, int64_t batch,
                            int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                            int64_t lda, int64_t stride_a, const void *b, int64_t ldb,
                            int64_t stride_b, double beta, const void *c_in, void *c, int64_t ldc,
                            int64_t stride_c) {
    (void)ctx;
    if (batch < 0 || m < 0 || n < 0 || k < 0) return DM_ERR_SHAPE;
    if (!dmi_dtype_valid(dtype)) return DM_ERR_DTYPE;
    if (batch == 0 || m == 0 || n == 0) return DM_OK;
    if (!a || !b || !c || (beta != 0.0 && !c_in)) return DM_ERR_INVALID_ARG;
    if (beta == 0.0) c_in = c; /* not read */
    if (ldc < n || lda < (trans_a ? m : k) || ldb < (trans_b ? k : n)) return DM_ERR_SHAPE;
    for (int64_t batch_index = 0; batch_index < batch; ++batch_index) {
        if (dtype == DM_FLOAT32) {
            gemm_f32(trans_a, trans_b, m, n, k, (float)alpha,
                     (const float *)a + batch_index * stride_a, lda,
                     (const float *)b + batch_index * stride_b, ldb, (float)beta,
                     (const float *)c_in + batch_index * stride_c,
                     (float *)c + batch_index * stride_c, ldc);
        } else if (dtype == DM_FLOAT64) {
            gemm_f64(trans_a, trans_b, m, n, k, alpha, (const double *)a + batch_index * stride_a,
                     lda, (const double *)b + batch_index * stride_b, ldb, beta,
                     (const double *)c_in + batch_index * stride_c,
                     (double *)c + batch_index * stride_c, ldc);
        } else if (dtype == DM_BFLOAT16) {
            gemm_bf16(trans_a, trans_b, m, n, k, (float)alpha,
                      (const uint16_t *)a + batch_index * stride_a, lda,
                      (const uint16_t *)b + batch_index * stride_b, ldb, (float)beta,
                      (const uint16_t *)c_in + batch_index * stride_c,
                      (uint16_t *)c + batch_index * stride_c, ldc);
        } else {
            return DM_ERR_DTYPE;
        }
    }
    return DM_OK;
}
