/* update.c - the fused Muon / Drop-Muon parameter update (see dm_update in dropmuon.h).
 *
 * Order of work, chosen so that any error leaves every tensor untouched:
 *   1. direction D = nesterov ? lerp(G, M', mu) : M' with M' = lerp(M, G, 1 - mu), written only
 *      into the workspace panel (M' rounded to storage first, exactly as it will be stored);
 *   2. the panel's norms reveal NaN/Inf -> DM_ERR_NONFINITE, nothing written;
 *   3. apply the sharp operator to the panel (a failing product: DM_ERR_GEMM, nothing written),
 *      then store M' and update the parameters.
 * Elementwise arithmetic mirrors torch (lerp's two-branch formula, decay then step, each rounded
 * to the storage type) so that trajectories track torch.optim.Muon closely. */
#include "internal.h"

static dm_status check_update_config(const dm_update_config *config) {
    if (!config) return DM_ERR_INVALID_ARG;
    DMI_RETURN_IF_ERROR(dmi_sharp_check_config(&config->sharp));
    if (!isfinite(config->lr) || config->lr < 0.0) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->weight_decay) || config->weight_decay < 0.0) return DM_ERR_INVALID_ARG;
    if (!(config->momentum >= 0.0 && config->momentum <= 1.0)) return DM_ERR_INVALID_ARG;
    if (config->nesterov != 0 && config->nesterov != 1) return DM_ERR_INVALID_ARG;
    if (config->lr_adjust != DM_LR_ADJUST_NONE && config->lr_adjust != DM_LR_ADJUST_ORIGINAL &&
        config->lr_adjust != DM_LR_ADJUST_MATCH_RMS_ADAMW)
        return DM_ERR_INVALID_ARG;
    if (config->radius == DM_RADIUS_ADAPTIVE) {
        const double l0 = config->radius_l0, l1 = config->radius_l1;
        if (!isfinite(l0) || !isfinite(l1) || l0 < 0.0 || l1 < 0.0 || !(l0 + l1 > 0.0))
            return DM_ERR_INVALID_ARG;
    } else if (config->radius != DM_RADIUS_FIXED) {
        return DM_ERR_INVALID_ARG;
    }
    return DM_OK;
}

/* torch's lerp: self + w (end - self) for |w| < 0.5, else end - (end - self)(1 - w). */
#define LERP(CT, self, end, w)                                                                     \
    ((w) < (CT)0.5 ? (self) + (w) * ((end) - (self)) : (end) - ((end) - (self)) * ((CT)1 - (w)))

/* The passes over user memory, per storage dtype S with compute type CT, each over rows
 * [r0, r1) of a matrix (one thread's band). Element k of a matrix (row-major, rows x cols) sits
 * at panel index k, or at (k % cols) * rows + k / cols when the panel holds the transpose. */
#define DEFINE_UPDATE_PASSES(S, CT)                                                                \
    DMI_VECTORIZE static void directions_##S(const void *g, const void *buf, int64_t rows,         \
                                             int64_t cols, int transposed, double mu,              \
                                             int nesterov, CT *panel, int64_t r0, int64_t r1) {    \
        const CT w = (CT)(1.0 - mu), mu_c = (CT)mu;                                                \
        if (!transposed) {                                                                         \
            for (size_t k = (size_t)(r0 * cols); k < (size_t)(r1 * cols); ++k) {                   \
                const CT gk = LOAD_##S(g, k), bk = LOAD_##S(buf, k);                               \
                const CT m = ROUND_##S(LERP(CT, bk, gk, w));                                       \
                panel[k] = nesterov ? LERP(CT, gk, m, mu_c) : m;                                   \
            }                                                                                      \
            return;                                                                                \
        }                                                                                          \
        DMI_FOR_TILED_ROWS(r0, r1, cols, i, j) {                                                   \
            const size_t k = (size_t)(i * cols + j);                                               \
            const CT gk = LOAD_##S(g, k), bk = LOAD_##S(buf, k);                                   \
            const CT m = ROUND_##S(LERP(CT, bk, gk, w));                                           \
            panel[j * rows + i] = nesterov ? LERP(CT, gk, m, mu_c) : m;                            \
        }                                                                                          \
    }                                                                                              \
    DMI_VECTORIZE static void momentum_##S(const void *g, void *buf, int64_t cols, double mu,      \
                                           int64_t r0, int64_t r1) {                               \
        const CT w = (CT)(1.0 - mu);                                                               \
        for (size_t k = (size_t)(r0 * cols); k < (size_t)(r1 * cols); ++k) {                       \
            const CT gk = LOAD_##S(g, k), bk = LOAD_##S(buf, k);                                   \
            STORE_##S(buf, k, LERP(CT, bk, gk, w));                                                \
        }                                                                                          \
    }

/* Decay and step round separately, like torch's param.mul_(...).add_(...); the sharp result O
 * comes in the compute type, or in bfloat16 from bfloat16 iterates. */
#define DEFINE_PARAMS_PASS(S, CT, O)                                                               \
    DMI_VECTORIZE static void params_##S##_##O(void *x, const void *o, int64_t rows, int64_t cols, \
                                               int transposed, double decay, double step,          \
                                               int64_t r0, int64_t r1) {                           \
        const CT decay_c = (CT)decay, step_c = (CT)step;                                           \
        if (!transposed) {                                                                         \
            for (size_t k = (size_t)(r0 * cols); k < (size_t)(r1 * cols); ++k)                     \
                STORE_##S(x, k, ROUND_##S(LOAD_##S(x, k) * decay_c) - step_c * LOAD_##O(o, k));    \
            return;                                                                                \
        }                                                                                          \
        DMI_FOR_TILED_ROWS(r0, r1, cols, i, j) {                                                   \
            const size_t k = (size_t)(i * cols + j), t = (size_t)(j * rows + i);                   \
            STORE_##S(x, k, ROUND_##S(LOAD_##S(x, k) * decay_c) - step_c * LOAD_##O(o, t));        \
        }                                                                                          \
    }

DEFINE_UPDATE_PASSES(f32, float)
DEFINE_UPDATE_PASSES(f64, double)
DEFINE_UPDATE_PASSES(bf16, float)
DEFINE_PARAMS_PASS(f32, float, f32)
DEFINE_PARAMS_PASS(f32, float, bf16)
DEFINE_PARAMS_PASS(f64, double, f64)
DEFINE_PARAMS_PASS(f64, double, bf16)
DEFINE_PARAMS_PASS(bf16, float, f32)
DEFINE_PARAMS_PASS(bf16, float, bf16)

/* One matrix's pass, cut into row bands for the provider's threads. */
typedef struct pass_job {
    dm_dtype dtype;
    int64_t rows, cols;
    int transposed, nesterov, o_bf16;
    double mu, decay, step;
    const void *g;
    void *buf, *x, *panel;
    const void *o;
} pass_job;

static void directions_range(void *arg, int64_t r0, int64_t r1) {
    const pass_job *j = arg;
    switch (j->dtype) {
    case DM_FLOAT32:
        directions_f32(j->g, j->buf, j->rows, j->cols, j->transposed, j->mu, j->nesterov, j->panel,
                       r0, r1);
        break;
    case DM_FLOAT64:
        directions_f64(j->g, j->buf, j->rows, j->cols, j->transposed, j->mu, j->nesterov, j->panel,
                       r0, r1);
        break;
    case DM_BFLOAT16:
        directions_bf16(j->g, j->buf, j->rows, j->cols, j->transposed, j->mu, j->nesterov, j->panel,
                        r0, r1);
        break;
    }
}

static void momentum_range(void *arg, int64_t r0, int64_t r1) {
    const pass_job *j = arg;
    switch (j->dtype) {
    case DM_FLOAT32: momentum_f32(j->g, j->buf, j->cols, j->mu, r0, r1); break;
    case DM_FLOAT64: momentum_f64(j->g, j->buf, j->cols, j->mu, r0, r1); break;
    case DM_BFLOAT16: momentum_bf16(j->g, j->buf, j->cols, j->mu, r0, r1); break;
    }
}

static void params_range(void *arg, int64_t r0, int64_t r1) {
    const pass_job *j = arg;
    const int64_t m = j->rows, n = j->cols;
    const int t = j->transposed;
    switch (j->dtype) {
    case DM_FLOAT32:
        (j->o_bf16 ? params_f32_bf16 : params_f32_f32)(j->x, j->o, m, n, t, j->decay, j->step, r0,
                                                       r1);
        break;
    case DM_FLOAT64:
        (j->o_bf16 ? params_f64_bf16 : params_f64_f64)(j->x, j->o, m, n, t, j->decay, j->step, r0,
                                                       r1);
        break;
    case DM_BFLOAT16:
        (j->o_bf16 ? params_bf16_bf16 : params_bf16_f32)(j->x, j->o, m, n, t, j->decay, j->step, r0,
                                                         r1);
        break;
    }
}

dm_status dm_update_workspace_size(const dm_update_config *config, dm_dtype dtype, int64_t batch,
                                   int64_t rows, int64_t cols, size_t *bytes) {
    DMI_RETURN_IF_ERROR(check_update_config(config));
    return dmi_panel_workspace_size(&config->sharp, dtype, batch, rows, cols, bytes);
}

dm_status dm_update(const dm_update_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                    int64_t cols, void *const *params, const void *const *grads,
                    void *const *momentum_buffers, double *duals, void *workspace,
                    size_t workspace_bytes, const dm_gemm_provider *gemm) {
    size_t needed;
    DMI_RETURN_IF_ERROR(dm_update_workspace_size(config, dtype, batch, rows, cols, &needed));
    DMI_RETURN_IF_ERROR(
        dmi_check_update_pointers(batch, rows, cols, params, grads, momentum_buffers));
    if (needed > 0 && (!workspace || workspace_bytes < needed)) return DM_ERR_WORKSPACE;
    if (batch == 0) return DM_OK; /* nothing to do; the workspace may be NULL */
    if (rows == 0 || cols == 0) {
        for (int64_t b = 0; duals && b < batch; ++b) duals[b] = 0.0;
        return DM_OK;
    }

    const double mu = config->momentum;
    dmi_panel panel;
    dmi_panel_init(&panel, &config->sharp, dtype, batch, rows, cols, workspace, gemm);
    panel.want_duals = duals != NULL || config->radius == DM_RADIUS_ADAPTIVE;

    /* 1. Directions into the panel; user memory is only read. */
    const int64_t grain = dmi_row_grain(cols);
    pass_job job = {.dtype = dtype,
                    .rows = rows,
                    .cols = cols,
                    .transposed = panel.transposed,
                    .nesterov = config->nesterov,
                    .mu = mu};
    for (int64_t b = 0; b < batch; ++b) {
        job.g = grads[b];
        job.buf = momentum_buffers[b];
        job.panel = dmi_panel_matrix(&panel, panel.data, panel.compute, b);
        dmi_parallel_for(gemm, rows, grain, directions_range, &job);
    }
    /* 2. NaN/Inf anywhere stops here, before the first write. */
    DMI_RETURN_IF_ERROR(dmi_panel_measure(&panel, &config->sharp));

    /* 3. The sharp operator (the products may fail: still nothing written), then momentum and
     *    parameters, which cannot fail. */
    DMI_RETURN_IF_ERROR(dmi_panel_apply(&panel, &config->sharp));
    for (int64_t b = 0; b < batch; ++b) {
        job.g = grads[b];
        job.buf = momentum_buffers[b];
        dmi_parallel_for(gemm, rows, grain, momentum_range, &job);
    }

    job.decay = 1.0 - config->lr * config->weight_decay;
    job.o_bf16 = panel.result_dtype == DM_BFLOAT16;
    for (int64_t b = 0; b < batch; ++b) {
        const double dual = panel.duals[b];
        /* A zero direction has dual 0 and moves nothing (also when L0 = 0: no 0 / 0). */
        job.step = config->radius == DM_RADIUS_FIXED
                       ? config->lr * dmi_lr_ratio(config->lr_adjust, rows, cols)
                   : dual > 0.0 ? config->lr * dual / (config->radius_l0 + config->radius_l1 * dual)
                                : 0.0;
        job.x = params[b];
        job.o = dmi_panel_matrix(&panel, panel.result, panel.result_dtype, b);
        dmi_parallel_for(gemm, rows, grain, params_range, &job);
        if (duals) duals[b] = dual;
    }
    return DM_OK;
}
