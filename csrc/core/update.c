/* update.c - the fused Muon / Drop-Muon parameter update (see dm_update in dropmuon.h).
 *
 * Order of work, chosen so that a NaN/Inf gradient leaves every tensor untouched:
 *   1. direction D = nesterov ? lerp(G, M', mu) : M' with M' = lerp(M, G, 1 - mu), written only
 *      into the workspace panel (M' rounded to storage first, exactly as it will be stored);
 *   2. the panel's norms reveal NaN/Inf -> DM_ERR_NONFINITE, nothing written;
 *   3. store M', apply the sharp operator to the panel, update the parameters.
 * Elementwise arithmetic mirrors torch (lerp's two-branch formula, decay then step, each rounded
 * to the storage type) so that trajectories track torch.optim.Muon closely. */
#include "internal.h"

/* torch's lerp: self + w (end - self) for |w| < 0.5, else end - (end - self)(1 - w), in the
 * compute precision. */
static inline double lerp_in(dm_dtype compute, double self, double end, double weight) {
    if (compute == DM_FLOAT64)
        return fabs(weight) < 0.5 ? self + weight * (end - self)
                                  : end - (end - self) * (1.0 - weight);
    const float s = (float)self, e = (float)end, w = (float)weight;
    return fabsf(w) < 0.5f ? s + w * (e - s) : e - (e - s) * (1.0f - w);
}

static dm_status check_update_config(const dm_update_config *config) {
    if (!config) return DM_ERR_INVALID_ARG;
    DM_RETURN_IF_ERROR(dm_sharp_check_config(&config->sharp));
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

/* The shape-dependent factor of torch.optim.Muon's _adjust_lr. */
static double lr_ratio(dm_lr_adjust adjust, int64_t rows, int64_t cols) {
    switch (adjust) {
    case DM_LR_ADJUST_ORIGINAL: {
        const double r = (double)rows / (double)cols;
        return sqrt(r > 1.0 ? r : 1.0);
    }
    case DM_LR_ADJUST_MATCH_RMS_ADAMW: return 0.2 * sqrt((double)(rows > cols ? rows : cols));
    case DM_LR_ADJUST_NONE: break;
    }
    return 1.0;
}

dm_status dm_update_workspace_size(const dm_update_config *config, dm_dtype dtype, int64_t batch,
                                   int64_t rows, int64_t cols, size_t *bytes) {
    DM_RETURN_IF_ERROR(check_update_config(config));
    return dm_panel_workspace_size(&config->sharp, dtype, batch, rows, cols, bytes);
}

dm_status dm_update(const dm_update_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                    int64_t cols, void *const *params, const void *const *grads,
                    void *const *momentum_buffers, double *duals, void *workspace,
                    size_t workspace_bytes, const dm_gemm_provider *gemm) {
    size_t needed;
    DM_RETURN_IF_ERROR(dm_update_workspace_size(config, dtype, batch, rows, cols, &needed));
    if (batch > 0 && (!params || !grads || !momentum_buffers)) return DM_ERR_INVALID_ARG;
    if (rows > 0 && cols > 0)
        for (int64_t b = 0; b < batch; ++b)
            if (!params[b] || !grads[b] || !momentum_buffers[b]) return DM_ERR_INVALID_ARG;
    if (needed > 0 && (!workspace || workspace_bytes < needed)) return DM_ERR_WORKSPACE;
    if (rows == 0 || cols == 0) {
        for (int64_t b = 0; duals && b < batch; ++b) duals[b] = 0.0;
        return DM_OK;
    }

    const dm_dtype compute = dm_compute_dtype(dtype);
    const double mu = config->momentum;
    const int nesterov = config->nesterov;
    dm_panel panel;
    dm_panel_init(&panel, &config->sharp, dtype, batch, rows, cols, workspace);

    /* 1. Directions into the panel; user memory is only read. */
    for (int64_t b = 0; b < batch; ++b)
        DM_FOR_TILED(rows, cols, i, j) {
            const size_t k = (size_t)(i * cols + j);
            const double g = dm_load(grads[b], dtype, k);
            const double m = dm_round_to(dtype, lerp_in(compute, dm_load(momentum_buffers[b],
                                                                         dtype, k),
                                                        g, 1.0 - mu));
            const double d = nesterov ? lerp_in(compute, g, m, mu) : m;
            const size_t slot = dm_panel_index(&panel, b, i, j);
            if (compute == DM_FLOAT64)
                ((double *)panel.data)[slot] = d;
            else
                ((float *)panel.data)[slot] = (float)d;
        }
    /* 2. NaN/Inf anywhere stops here, before the first write. */
    DM_RETURN_IF_ERROR(dm_panel_measure(&panel, &config->sharp));

    /* 3. Momentum, then the sharp operator, then the parameters. */
    for (int64_t b = 0; b < batch; ++b)
        for (size_t k = 0; k < (size_t)rows * (size_t)cols; ++k) {
            const double g = dm_load(grads[b], dtype, k);
            const double m = lerp_in(compute, dm_load(momentum_buffers[b], dtype, k), g, 1.0 - mu);
            dm_store(momentum_buffers[b], dtype, k, m);
        }
    DM_RETURN_IF_ERROR(dm_panel_apply(&panel, &config->sharp, gemm));

    const double decay = 1.0 - config->lr * config->weight_decay;
    const double fixed_step = config->lr * lr_ratio(config->lr_adjust, rows, cols);
    const int need_dual = duals != NULL || config->radius == DM_RADIUS_ADAPTIVE;
    for (int64_t b = 0; b < batch; ++b) {
        double step = fixed_step;
        if (need_dual) {
            double dual = 0.0;
            DM_FOR_TILED(rows, cols, i, j) {
                const size_t k = (size_t)(i * cols + j);
                const double g = dm_load(grads[b], dtype, k);
                const double m = dm_load(momentum_buffers[b], dtype, k);
                const double d = nesterov ? lerp_in(compute, g, m, mu) : m;
                dual += d * dm_panel_get(&panel, b, i, j);
            }
            if (duals) duals[b] = dual;
            if (config->radius == DM_RADIUS_ADAPTIVE)
                step = config->lr * dual / (config->radius_l0 + config->radius_l1 * dual);
        }
        /* Decay and step round separately, like torch's param.mul_(...).add_(...). */
        const double decay_c = compute == DM_FLOAT64 ? decay : (double)(float)decay;
        const double step_c = compute == DM_FLOAT64 ? step : (double)(float)step;
        DM_FOR_TILED(rows, cols, i, j) {
            const size_t k = (size_t)(i * cols + j);
            const double x = dm_round_to(dtype, dm_load(params[b], dtype, k) * decay_c);
            const double o = dm_panel_get(&panel, b, i, j);
            const double updated =
                compute == DM_FLOAT64 ? x - step_c * o : (double)((float)x - (float)step_c * (float)o);
            dm_store(params[b], dtype, k, updated);
        }
    }
    return DM_OK;
}
