/* sharp.c - the sharp operators (notes section 4) on a workspace panel, and dm_sharp.
 *
 * Every operator runs in three phases so that errors never leave partial results behind:
 * load (user memory -> panel in compute precision), measure (norms, which also reveal NaN/Inf),
 * then apply + store. dm_update (update.c) reuses the same panel with its own load and store. */
#include "internal.h"

dm_status dm_sharp_check_config(const dm_sharp_config *config) {
    if (!config) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->eps) || config->eps < 0.0) return DM_ERR_INVALID_ARG;
    switch (config->norm) {
    case DM_NORM_SPECTRAL: return dm_ns_check_config(config);
    case DM_NORM_SIGN:
    case DM_NORM_COLUMN:
    case DM_NORM_ROW:
    case DM_NORM_FROBENIUS: return DM_OK;
    }
    return DM_ERR_INVALID_ARG;
}

dm_status dm_sharp_config_muon(dm_sharp_config *config, double coefficients[15]) {
    if (!config || !coefficients) return DM_ERR_INVALID_ARG;
    for (int j = 0; j < 5; ++j) {
        coefficients[3 * j] = DM_MUON_NS_A;
        coefficients[3 * j + 1] = DM_MUON_NS_B;
        coefficients[3 * j + 2] = DM_MUON_NS_C;
    }
    config->norm = DM_NORM_SPECTRAL;
    config->ns_steps = 5;
    config->ns_coefficients = coefficients;
    config->norm_scale = 1.0;
    config->norm_offset = 0.0;
    config->eps = 1e-7;
    return DM_OK;
}

/* How many divisors a panel keeps per matrix. */
static int64_t divisors_per_matrix(dm_norm norm, int64_t rows, int64_t cols) {
    switch (norm) {
    case DM_NORM_COLUMN: return cols;
    case DM_NORM_ROW: return rows;
    case DM_NORM_SIGN: return 0;
    default: return 1;
    }
}

static void panel_shape(dm_norm norm, int64_t rows, int64_t cols, int *transposed, int64_t *p,
                        int64_t *q) {
    /* Newton-Schulz runs on the wide orientation: its cost is 4 p^2 q + 2 p^3 with p <= q. */
    *transposed = norm == DM_NORM_SPECTRAL && rows > cols;
    *p = *transposed ? cols : rows;
    *q = *transposed ? rows : cols;
}

dm_status dm_panel_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                  int64_t rows, int64_t cols, size_t *bytes) {
    size_t elems, divisors, scratch = 0, total = 0;
    int transposed;
    int64_t p, q;
    if (!bytes) return DM_ERR_INVALID_ARG;
    DM_RETURN_IF_ERROR(dm_sharp_check_config(config));
    if (!dm_dtype_valid(dtype)) return DM_ERR_DTYPE;
    DM_RETURN_IF_ERROR(dm_check_sizes(batch, rows, cols, &elems));
    const size_t elem = dm_dtype_size(dm_compute_dtype(dtype));
    panel_shape(config->norm, rows, cols, &transposed, &p, &q);
    if (dm_mul_overflows((size_t)batch,
                         (size_t)divisors_per_matrix(config->norm, rows, cols), &divisors))
        return DM_ERR_SHAPE;
    if (config->norm == DM_NORM_SPECTRAL) DM_RETURN_IF_ERROR(dm_ns_scratch_elems(batch, p, q,
                                                                                 &scratch));
    DM_RETURN_IF_ERROR(dm_ws_add(&total, elems, elem));
    DM_RETURN_IF_ERROR(dm_ws_add(&total, divisors, sizeof(double)));
    DM_RETURN_IF_ERROR(dm_ws_add(&total, scratch, elem));
    *bytes = total;
    return DM_OK;
}

void dm_panel_init(dm_panel *panel, const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                   int64_t rows, int64_t cols, void *workspace) {
    unsigned char *cursor = workspace;
    panel->norm = config->norm;
    panel->compute = dm_compute_dtype(dtype);
    panel->batch = batch;
    panel->rows = rows;
    panel->cols = cols;
    panel_shape(config->norm, rows, cols, &panel->transposed, &panel->p, &panel->q);
    const size_t elem = dm_dtype_size(panel->compute);
    panel->data = dm_ws_take(&cursor, (size_t)batch * (size_t)rows * (size_t)cols, elem);
    panel->scale = dm_ws_take(
        &cursor, (size_t)batch * (size_t)divisors_per_matrix(config->norm, rows, cols),
        sizeof(double));
    panel->ns_scratch = cursor;
}

static inline double panel_at(const dm_panel *panel, size_t k) {
    return panel->compute == DM_FLOAT64 ? ((const double *)panel->data)[k]
                                        : (double)((const float *)panel->data)[k];
}

/* Sum of squares of count panel elements from start with a stride. */
static double panel_sumsq(const dm_panel *panel, size_t start, size_t count, size_t stride) {
    double acc = 0.0;
    if (panel->compute == DM_FLOAT64) {
        const double *x = (const double *)panel->data + start;
        for (size_t k = 0; k < count; ++k) acc += x[k * stride] * x[k * stride];
    } else {
        const float *x = (const float *)panel->data + start;
        for (size_t k = 0; k < count; ++k) acc += (double)x[k * stride] * (double)x[k * stride];
    }
    return acc;
}

/* The l2 norm from a sum of squares, telling a NaN/Inf element from an overflowing sum (only
 * float64 data can overflow a double sum; then the norm is recomputed with max-abs scaling). */
static dm_status finish_norm(const dm_panel *panel, double sumsq, size_t start, size_t count,
                             size_t stride, double *norm) {
    if (isfinite(sumsq)) {
        *norm = sqrt(sumsq);
        return DM_OK;
    }
    double max_abs = 0.0;
    for (size_t k = 0; k < count; ++k) {
        double v = panel_at(panel, start + k * stride);
        if (!isfinite(v)) return DM_ERR_NONFINITE;
        if (fabs(v) > max_abs) max_abs = fabs(v);
    }
    double acc = 0.0;
    for (size_t k = 0; k < count; ++k) {
        double v = panel_at(panel, start + k * stride) / max_abs;
        acc += v * v;
    }
    *norm = max_abs * sqrt(acc);
    return DM_OK;
}

/* 1 / max(scale * norm + offset, eps), and 0 where that divisor is 0 (a zero matrix stays 0). */
static double inverse_divisor(double norm, double scale, double offset, double eps) {
    double divisor = scale * norm + offset;
    if (divisor < eps) divisor = eps;
    return divisor > 0.0 && isfinite(divisor) ? 1.0 / divisor : 0.0;
}

dm_status dm_panel_measure(dm_panel *panel, const dm_sharp_config *config) {
    const size_t p = (size_t)panel->p, q = (size_t)panel->q, per = p * q;
    for (int64_t b = 0; b < panel->batch; ++b) {
        const size_t base = (size_t)b * per;
        double norm;
        switch (panel->norm) {
        case DM_NORM_SPECTRAL:
        case DM_NORM_FROBENIUS: {
            DM_RETURN_IF_ERROR(finish_norm(panel, panel_sumsq(panel, base, per, 1), base, per, 1,
                                           &norm));
            const int spectral = panel->norm == DM_NORM_SPECTRAL;
            panel->scale[b] = inverse_divisor(norm, spectral ? config->norm_scale : 1.0,
                                              spectral ? config->norm_offset : 0.0, config->eps);
            break;
        }
        case DM_NORM_COLUMN:
            for (size_t j = 0; j < q; ++j) {
                DM_RETURN_IF_ERROR(finish_norm(panel, panel_sumsq(panel, base + j, p, q),
                                               base + j, p, q, &norm));
                panel->scale[(size_t)b * q + j] = inverse_divisor(norm, 1.0, 0.0, config->eps);
            }
            break;
        case DM_NORM_ROW:
            for (size_t i = 0; i < p; ++i) {
                DM_RETURN_IF_ERROR(finish_norm(panel, panel_sumsq(panel, base + i * q, q, 1),
                                               base + i * q, q, 1, &norm));
                panel->scale[(size_t)b * p + i] = inverse_divisor(norm, 1.0, 0.0, config->eps);
            }
            break;
        case DM_NORM_SIGN:
            /* No divisor, but NaN/Inf must still be rejected before anything is written. */
            DM_RETURN_IF_ERROR(finish_norm(panel, panel_sumsq(panel, base, per, 1), base, per, 1,
                                           &norm));
            break;
        }
    }
    return DM_OK;
}

/* Multiplies element (b, i, j) by the divisor selected by (b, i, j) for each norm kind. */
#define DEFINE_APPLY(T, SUFFIX)                                                                    \
    static void apply_##SUFFIX(dm_panel *panel) {                                                  \
        T *x = panel->data;                                                                        \
        const size_t p = (size_t)panel->p, q = (size_t)panel->q;                                   \
        for (size_t b = 0; b < (size_t)panel->batch; ++b) {                                        \
            T *m = x + b * p * q;                                                                  \
            const double *s = panel->scale;                                                        \
            switch (panel->norm) {                                                                 \
            case DM_NORM_SIGN:                                                                     \
                for (size_t k = 0; k < p * q; ++k) m[k] = (T)((m[k] > 0) - (m[k] < 0));            \
                break;                                                                             \
            case DM_NORM_COLUMN:                                                                   \
                for (size_t i = 0; i < p; ++i)                                                     \
                    for (size_t j = 0; j < q; ++j) m[i * q + j] *= (T)s[b * q + j];                \
                break;                                                                             \
            case DM_NORM_ROW:                                                                      \
                for (size_t i = 0; i < p; ++i) {                                                   \
                    const T f = (T)s[b * p + i];                                                   \
                    for (size_t j = 0; j < q; ++j) m[i * q + j] *= f;                              \
                }                                                                                  \
                break;                                                                             \
            case DM_NORM_SPECTRAL:                                                                 \
            case DM_NORM_FROBENIUS: {                                                              \
                const T f = (T)s[b];                                                               \
                for (size_t k = 0; k < p * q; ++k) m[k] *= f;                                      \
                break;                                                                             \
            }                                                                                      \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_APPLY(float, f32)
DEFINE_APPLY(double, f64)

dm_status dm_panel_apply(dm_panel *panel, const dm_sharp_config *config,
                         const dm_gemm_provider *gemm) {
    if (panel->compute == DM_FLOAT64)
        apply_f64(panel);
    else
        apply_f32(panel);
    if (panel->norm != DM_NORM_SPECTRAL) return DM_OK;
    return dm_ns_iterate(config, panel->compute, panel->batch, panel->p, panel->q, panel->data,
                         panel->ns_scratch, &panel->data, gemm);
}

/* Copies user matrices into the panel (transposing in tiles when the panel holds M^T). */
static void panel_load(dm_panel *panel, dm_dtype dtype, const void *const *inputs, int64_t ld) {
    for (int64_t b = 0; b < panel->batch; ++b)
        DM_FOR_TILED(panel->rows, panel->cols, i, j) {
            double v = dm_load(inputs[b], dtype, (size_t)(i * ld + j));
            size_t k = dm_panel_index(panel, b, i, j);
            if (panel->compute == DM_FLOAT64)
                ((double *)panel->data)[k] = v;
            else
                ((float *)panel->data)[k] = (float)v;
        }
}

dm_status dm_sharp_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                  int64_t rows, int64_t cols, size_t *bytes) {
    return dm_panel_workspace_size(config, dtype, batch, rows, cols, bytes);
}

dm_status dm_sharp(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                   int64_t cols, const void *const *inputs, int64_t in_ld, void *const *outputs,
                   int64_t out_ld, double *duals, void *workspace, size_t workspace_bytes,
                   const dm_gemm_provider *gemm) {
    size_t needed;
    DM_RETURN_IF_ERROR(dm_sharp_workspace_size(config, dtype, batch, rows, cols, &needed));
    if (in_ld < cols || out_ld < cols) return DM_ERR_SHAPE;
    if (batch > 0 && (!inputs || !outputs)) return DM_ERR_INVALID_ARG;
    if (rows > 0 && cols > 0)
        for (int64_t b = 0; b < batch; ++b)
            if (!inputs[b] || !outputs[b]) return DM_ERR_INVALID_ARG;
    if (needed > 0 && (!workspace || workspace_bytes < needed)) return DM_ERR_WORKSPACE;
    if (batch > 0 && rows > 0 && cols > 0 && (rows - 1 > (INT64_MAX - cols) / in_ld ||
                                              rows - 1 > (INT64_MAX - cols) / out_ld))
        return DM_ERR_SHAPE;

    if (rows == 0 || cols == 0) {
        for (int64_t b = 0; duals && b < batch; ++b) duals[b] = 0.0;
        return DM_OK;
    }
    dm_panel panel;
    dm_panel_init(&panel, config, dtype, batch, rows, cols, workspace);
    panel_load(&panel, dtype, inputs, in_ld);
    DM_RETURN_IF_ERROR(dm_panel_measure(&panel, config));
    DM_RETURN_IF_ERROR(dm_panel_apply(&panel, config, gemm));

    /* Duals first, from the untouched inputs, so that outputs may alias inputs. */
    for (int64_t b = 0; duals && b < batch; ++b) {
        double acc = 0.0;
        DM_FOR_TILED(rows, cols, i, j) {
            acc += dm_load(inputs[b], dtype, (size_t)(i * in_ld + j)) *
                   dm_panel_get(&panel, b, i, j);
        }
        duals[b] = acc;
    }
    for (int64_t b = 0; b < batch; ++b)
        DM_FOR_TILED(rows, cols, i, j) {
            dm_store(outputs[b], dtype, (size_t)(i * out_ld + j), dm_panel_get(&panel, b, i, j));
        }
    return DM_OK;
}
