/* newton_schulz.c - the spectral sharp operator's iteration (notes section 4).
 *
 * Each step j maps X (p x q, p <= q, already divided by its norm) to
 *     X <- (a_j I + b_j A + c_j A^2) X,   A = X X^T,
 * which is torch.optim.Muon's quintic written with one p x p polynomial matrix, so a step is
 * exactly three products (4 p^2 q + 2 p^3 flops) and no elementwise pass over X:
 *     A  = X X^T                         gemm, beta 0
 *     P  = b A + a I                     p^2 pass
 *     P += c A A                         gemm, beta 1
 *     X' = P X                           gemm, beta 0 (ping-pong buffers)
 */
#include "internal.h"

const double dm_polar_express_coefficients[DM_POLAR_EXPRESS_STEPS * 3] = {
    8.1566, -22.4833, 15.8788, /* */
    4.0429, -2.8089,  0.5000,  /* */
    3.8917, -2.7725,  0.5061,  /* */
    3.2858, -2.3681,  0.4645,  /* */
    2.3465, -1.7098,  0.4232,
};

dm_status dm_ns_check_config(const dm_sharp_config *config) {
    if (config->ns_steps < 0) return DM_ERR_INVALID_ARG;
    if (config->ns_steps > 0 && config->ns_coefficients == NULL) return DM_ERR_INVALID_ARG;
    for (int64_t j = 0; j < 3 * config->ns_steps; ++j)
        if (!isfinite(config->ns_coefficients[j])) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->norm_scale) || config->norm_scale <= 0.0) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->norm_offset) || config->norm_offset < 0.0) return DM_ERR_INVALID_ARG;
    return DM_OK;
}

/* P = b A + a I over a batch of p x p matrices. */
static void polynomial_base(dm_dtype compute, int64_t batch, int64_t p, const void *a_mat,
                            void *p_mat, double a, double b) {
    size_t n = (size_t)batch * (size_t)p * (size_t)p;
    if (compute == DM_FLOAT64) {
        const double *src = a_mat;
        double *dst = p_mat;
        for (size_t k = 0; k < n; ++k) dst[k] = b * src[k];
        for (int64_t m = 0; m < batch; ++m)
            for (int64_t i = 0; i < p; ++i) dst[((size_t)m * p + i) * p + i] += a;
    } else {
        const float *src = a_mat;
        float *dst = p_mat;
        const float bf = (float)b, af = (float)a;
        for (size_t k = 0; k < n; ++k) dst[k] = bf * src[k];
        for (int64_t m = 0; m < batch; ++m)
            for (int64_t i = 0; i < p; ++i) dst[((size_t)m * p + i) * p + i] += af;
    }
}

dm_status dm_ns_iterate(const dm_sharp_config *config, dm_dtype compute, int64_t batch, int64_t p,
                        int64_t q, void *x, void *scratch, void **result,
                        const dm_gemm_provider *gemm) {
    const size_t elem = compute == DM_FLOAT64 ? sizeof(double) : sizeof(float);
    const int64_t pq = p * q, pp = p * p;
    unsigned char *base = scratch;
    void *x_next = base;
    void *a_mat = base + (size_t)batch * (size_t)pq * elem;
    void *p_mat = (unsigned char *)a_mat + (size_t)batch * (size_t)pp * elem;
    dm_gemm_fn fn = gemm && gemm->gemm ? gemm->gemm : dm_gemm_reference;
    void *ctx = gemm ? gemm->ctx : NULL;

    *result = x;
    if (batch == 0 || p == 0) return DM_OK;
    for (int64_t j = 0; j < config->ns_steps; ++j) {
        const double a = config->ns_coefficients[3 * j];
        const double b = config->ns_coefficients[3 * j + 1];
        const double c = config->ns_coefficients[3 * j + 2];
        dm_status st = fn(ctx, compute, 0, 1, batch, p, p, q, 1.0, x, q, pq, x, q, pq, 0.0, a_mat,
                          p, pp);
        if (st != DM_OK) return DM_ERR_GEMM;
        polynomial_base(compute, batch, p, a_mat, p_mat, a, b);
        st = fn(ctx, compute, 0, 0, batch, p, p, p, c, a_mat, p, pp, a_mat, p, pp, 1.0, p_mat, p,
                pp);
        if (st != DM_OK) return DM_ERR_GEMM;
        st = fn(ctx, compute, 0, 0, batch, p, q, p, 1.0, p_mat, p, pp, x, q, pq, 0.0, x_next, q,
                pq);
        if (st != DM_OK) return DM_ERR_GEMM;
        void *t = x;
        x = x_next;
        x_next = t;
    }
    *result = x;
    return DM_OK;
}
