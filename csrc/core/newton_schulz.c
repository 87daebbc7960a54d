/* newton_schulz.c - the spectral sharp operator's iteration (docs/method.md section 4).
 *
 * Each step j maps X (p x q, p <= q, already divided by its norm) to
 *     X <- a_j X + (b_j A + c_j A^2) X,   A = X X^T,
 * as three products (4 p^2 q + 2 p^3 flops). Two orders of operations:
 *   - bfloat16 iterates: exactly torch.optim.Muon's, so that we round where torch rounds:
 *       A = X X^T;  P = c A A + b A;  X' = P X + a X      (C_in = A, then X: no copies here)
 *   - float32/float64 iterates: a_j folded into P's diagonal, so that the last product reads
 *     no C at all (a pass over X less; it matters for small CNN layers):
 *       A = X X^T;  P = b A + a I;  P = c A A + P;  X' = P X
 * The iterates live in the scratch in the iteration dtype, in ping-pong buffers.
 */
#include "internal.h"

const double dm_polar_express_coefficients[DM_POLAR_EXPRESS_STEPS * 3] = {
    8.1566, -22.4833, 15.8788, /* */
    4.0429, -2.8089,  0.5000,  /* */
    3.8917, -2.7725,  0.5061,  /* */
    3.2858, -2.3681,  0.4645,  /* */
    2.3465, -1.7098,  0.4232,
};

dm_status dmi_ns_check_config(const dm_sharp_config *config) {
    if (config->ns_steps < 0) return DM_ERR_INVALID_ARG;
    if (config->ns_steps > 0 && config->ns_coefficients == NULL) return DM_ERR_INVALID_ARG;
    for (int64_t j = 0; j < 3 * config->ns_steps; ++j)
        if (!isfinite(config->ns_coefficients[j])) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->norm_scale) || config->norm_scale <= 0.0) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->norm_offset) || config->norm_offset < 0.0) return DM_ERR_INVALID_ARG;
    return DM_OK;
}

/* P = b A + a I for rows consecutive rows of p x p matrices (float32 or float64). */
DMI_VECTORIZE static void polynomial_base(dm_dtype dtype, int64_t rows, int64_t p,
                                          const void *a_mat, void *p_mat, double a, double b) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t diagonal = r % p;
        if (dtype == DM_FLOAT64) {
            const double *src = (const double *)a_mat + r * p;
            double *dst = (double *)p_mat + r * p;
            for (int64_t k = 0; k < p; ++k) dst[k] = b * src[k];
            dst[diagonal] += a;
        } else {
            const float *src = (const float *)a_mat + r * p;
            float *dst = (float *)p_mat + r * p;
            const float bf = (float)b;
            for (int64_t k = 0; k < p; ++k) dst[k] = bf * src[k];
            dst[diagonal] += (float)a;
        }
    }
}

dm_status dmi_ns_iterate(const dm_sharp_config *config, dm_dtype iteration, int64_t batch,
                         int64_t p, int64_t q, void *scratch, void **result,
                         const dm_gemm_provider *gemm) {
    const size_t elem = dmi_dtype_size(iteration);
    const int64_t pq = p * q, pp = p * p;
    const size_t x_bytes = (size_t)batch * (size_t)pq * elem, a_bytes = (size_t)batch * pp * elem;
    unsigned char *x = scratch, *x_next = x + dmi_align_up(x_bytes);
    unsigned char *a_mat = x_next + dmi_align_up(x_bytes), *p_mat = a_mat + dmi_align_up(a_bytes);
    dm_gemm_fn fn = gemm && gemm->gemm ? gemm->gemm : dm_gemm_reference;
    void *ctx = gemm ? gemm->ctx : NULL;

    const int torch_order = iteration == DM_BFLOAT16;
    for (int64_t j = 0; j < config->ns_steps && batch > 0 && p > 0; ++j) {
        const double a = config->ns_coefficients[3 * j];
        const double b = config->ns_coefficients[3 * j + 1];
        const double c = config->ns_coefficients[3 * j + 2];
        if (fn(ctx, iteration, 0, 1, batch, p, p, q, 1.0, x, q, pq, x, q, pq, 0.0, NULL, a_mat, p,
               pp))
            return DM_ERR_GEMM;
        if (!torch_order) polynomial_base(iteration, batch * p, p, a_mat, p_mat, a, b);
        if (fn(ctx, iteration, 0, 0, batch, p, p, p, c, a_mat, p, pp, a_mat, p, pp,
               torch_order ? b : 1.0, torch_order ? a_mat : p_mat, p_mat, p, pp))
            return DM_ERR_GEMM;
        if (fn(ctx, iteration, 0, 0, batch, p, q, p, 1.0, p_mat, p, pp, x, q, pq,
               torch_order ? a : 0.0, x, x_next, q, pq))
            return DM_ERR_GEMM;
        unsigned char *t = x;
        x = x_next;
        x_next = t;
    }
    *result = x;
    return DM_OK;
}
