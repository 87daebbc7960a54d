/* sharp.c - the sharp operators (docs/method.md section 4) on a workspace panel, and dm_sharp.
 *
 * Every operator runs in three phases so that errors never leave partial results behind:
 * load (user memory -> panel in compute precision), measure (norms, which also reveal NaN/Inf),
 * then apply + store. dm_update (update.c) reuses the same panel with its own load and store. */
#include "internal.h"

dm_status dmi_sharp_check_config(const dm_sharp_config *config) {
    if (!config) return DM_ERR_INVALID_ARG;
    if (!isfinite(config->eps) || config->eps < 0.0) return DM_ERR_INVALID_ARG;
    switch (config->norm) {
    case DM_NORM_SPECTRAL:
        if (config->ns_precision != DM_NS_NATIVE && config->ns_precision != DM_NS_BFLOAT16)
            return DM_ERR_INVALID_ARG;
        return dmi_ns_check_config(config);
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
    config->ns_precision = DM_NS_NATIVE;
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

dm_status dmi_panel_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                   int64_t rows, int64_t cols, size_t *bytes) {
    size_t elems, divisors, total = 0;
    int transposed;
    int64_t p, q;
    if (!bytes) return DM_ERR_INVALID_ARG;
    DMI_RETURN_IF_ERROR(dmi_sharp_check_config(config));
    if (!dmi_dtype_valid(dtype)) return DM_ERR_DTYPE;
    DMI_RETURN_IF_ERROR(dmi_check_sizes(batch, rows, cols, &elems));
    panel_shape(config->norm, rows, cols, &transposed, &p, &q);
    if (dmi_mul_overflows((size_t)batch, (size_t)divisors_per_matrix(config->norm, rows, cols),
                          &divisors))
        return DM_ERR_SHAPE;
    DMI_RETURN_IF_ERROR(dmi_ws_add(&total, elems, dmi_dtype_size(dmi_compute_dtype(dtype))));
    DMI_RETURN_IF_ERROR(dmi_ws_add(&total, divisors, sizeof(double)));
    DMI_RETURN_IF_ERROR(dmi_ws_add(&total, (size_t)batch, sizeof(double)));
    if (config->norm == DM_NORM_SPECTRAL) {
        size_t scratch;
        DMI_RETURN_IF_ERROR(dmi_ns_scratch_bytes(
            batch, p, q, dmi_dtype_size(dmi_ns_iteration_dtype(config, dtype)), &scratch));
        if (total > SIZE_MAX - scratch) return DM_ERR_SHAPE;
        total += scratch;
    }
    *bytes = total;
    return DM_OK;
}

void dmi_panel_init(dmi_panel *panel, const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                    int64_t rows, int64_t cols, void *workspace, const dm_gemm_provider *provider) {
    unsigned char *cursor = workspace;
    panel->provider = provider;
    panel->norm = config->norm;
    panel->compute = dmi_compute_dtype(dtype);
    panel->iteration = dmi_ns_iteration_dtype(config, dtype);
    panel->batch = batch;
    panel->rows = rows;
    panel->cols = cols;
    panel_shape(config->norm, rows, cols, &panel->transposed, &panel->p, &panel->q);
    panel->data = dmi_ws_take(&cursor, (size_t)batch * (size_t)rows * (size_t)cols,
                              dmi_dtype_size(panel->compute));
    panel->scale =
        dmi_ws_take(&cursor, (size_t)batch * (size_t)divisors_per_matrix(config->norm, rows, cols),
                    sizeof(double));
    panel->result = panel->data;
    panel->result_dtype = panel->compute;
    panel->duals = dmi_ws_take(&cursor, (size_t)batch, sizeof(double));
    panel->want_duals = 1;
    panel->ns_scratch = cursor;
}

/* Below this a double sum of squares may have lost digits to underflow (squares of float64
 * values under ~1e-154 are subnormal or zero). */
#define DMI_SUMSQ_SAFE_MIN 1e-280

/* The l2 norm from a sum of squares. A NaN/Inf sum is told apart from an overflowing one, and
 * an overflowing or underflowing sum (possible for float64 data only) is recomputed with
 * max-abs scaling. The elements are x[k * stride], k < count, of a compute type. */
static dm_status finish_norm(double sumsq, const void *x, dm_dtype dtype, size_t count,
                             size_t stride, double *norm) {
    if (isfinite(sumsq) && (sumsq >= DMI_SUMSQ_SAFE_MIN || sumsq == 0.0) &&
        !(sumsq == 0.0 && dtype == DM_FLOAT64)) {
        *norm = sqrt(sumsq);
        return DM_OK;
    }
    double max_abs = 0.0, acc = 0.0;
    for (size_t k = 0; k < count; ++k) {
        const double v = dmi_load(x, dtype, k * stride);
        if (!isfinite(v)) return DM_ERR_NONFINITE;
        if (fabs(v) > max_abs) max_abs = fabs(v);
    }
    if (max_abs == 0.0) {
        *norm = 0.0;
        return DM_OK;
    }
    for (size_t k = 0; k < count; ++k) {
        const double v = dmi_load(x, dtype, k * stride) / max_abs;
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

dm_status dmi_panel_measure(dmi_panel *panel, const dm_sharp_config *config) {
    const size_t p = (size_t)panel->p, q = (size_t)panel->q, elem = dmi_dtype_size(panel->compute);
    const dm_dtype t = panel->compute;
    for (int64_t b = 0; b < panel->batch; ++b) {
        const unsigned char *m = dmi_panel_matrix(panel, panel->data, panel->compute, b);
        double norm, dual = 0.0;
        switch (panel->norm) {
        case DM_NORM_SPECTRAL:
            if (panel->iteration == DM_BFLOAT16) break; /* normalised (and checked) in apply */
            /* fall through */
        case DM_NORM_FROBENIUS: {
            const double sumsq = dmi_sum_squares(panel->provider, m, t, p * q);
            DMI_RETURN_IF_ERROR(finish_norm(sumsq, m, t, p * q, 1, &norm));
            const int spectral = panel->norm == DM_NORM_SPECTRAL;
            const double inverse =
                inverse_divisor(norm, spectral ? config->norm_scale : 1.0,
                                spectral ? config->norm_offset : 0.0, config->eps);
            panel->scale[b] = inverse;
            dual = norm * (norm * inverse); /* FROBENIUS (no overflow); SPECTRAL: see apply */
            break;
        }
        case DM_NORM_COLUMN: {
            double *inverse = panel->scale + (size_t)b * q;
            dmi_column_sum_squares(m, t, (int64_t)p, (int64_t)q, inverse);
            for (size_t j = 0; j < q; ++j) {
                DMI_RETURN_IF_ERROR(finish_norm(inverse[j], m + j * elem, t, p, q, &norm));
                inverse[j] = inverse_divisor(norm, 1.0, 0.0, config->eps);
                dual += norm * (norm * inverse[j]);
            }
            break;
        }
        case DM_NORM_ROW:
            for (size_t i = 0; i < p; ++i) {
                const unsigned char *row = m + i * q * elem;
                const double sumsq = dmi_sum_squares(NULL, row, t, q); /* short: one thread */
                DMI_RETURN_IF_ERROR(finish_norm(sumsq, row, t, q, 1, &norm));
                panel->scale[(size_t)b * p + i] = inverse_divisor(norm, 1.0, 0.0, config->eps);
                dual += norm * (norm * panel->scale[(size_t)b * p + i]);
            }
            break;
        case DM_NORM_SIGN:
            /* <M, sign(M)> = sum |M|, which also reveals NaN/Inf before anything is written. */
            dual = dmi_sum_abs(m, t, p * q);
            if (!isfinite(dual)) DMI_RETURN_IF_ERROR(finish_norm(dual, m, t, p * q, 1, &norm));
            break;
        }
        panel->duals[b] = dual;
    }
    return DM_OK;
}

/* In place: sign, or multiplication by the divisor selected by (b, i, j) for the norm kind. */
#define DEFINE_APPLY(T, SUFFIX)                                                                    \
    DMI_VECTORIZE static void apply_##SUFFIX(dmi_panel *panel) {                                   \
        T *x = panel->data;                                                                        \
        const size_t p = (size_t)panel->p, q = (size_t)panel->q;                                   \
        for (size_t b = 0; b < (size_t)panel->batch; ++b) {                                        \
            T *m = x + b * p * q;                                                                  \
            const double *s = panel->scale;                                                        \
            switch (panel->norm) {                                                                 \
            case DM_NORM_SIGN:                                                                     \
                for (size_t k = 0; k < p * q; ++k) m[k] = (T)((m[k] > 0) - (m[k] < 0));            \
                break;                                                                             \
            /* Products in double: 1 / ||x|| of a tiny float32 x need not fit a float. */          \
            case DM_NORM_COLUMN:                                                                   \
                for (size_t i = 0; i < p; ++i)                                                     \
                    for (size_t j = 0; j < q; ++j)                                                 \
                        m[i * q + j] = (T)((double)m[i * q + j] * s[b * q + j]);                   \
                break;                                                                             \
            case DM_NORM_ROW:                                                                      \
                for (size_t i = 0; i < p; ++i) {                                                   \
                    const double f = s[b * p + i];                                                 \
                    for (size_t j = 0; j < q; ++j) m[i * q + j] = (T)((double)m[i * q + j] * f);   \
                }                                                                                  \
                break;                                                                             \
            case DM_NORM_FROBENIUS: {                                                              \
                const double f = s[b];                                                             \
                for (size_t k = 0; k < p * q; ++k) m[k] = (T)((double)m[k] * f);                   \
                break;                                                                             \
            }                                                                                      \
            case DM_NORM_SPECTRAL: break; /* see dmi_panel_apply */                                \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_APPLY(float, f32)
DEFINE_APPLY(double, f64)

/* torch.optim.Muon's bfloat16 normalisation, rounding where it rounds: X = bf16(M), then
 * X / bf16(max(norm_scale * bf16(||X||_F) + norm_offset, eps)) divided in float32 and rounded,
 * so that our bfloat16 iterates start from the very values torch's do. Rounding and the sum of
 * squares share one pass, which also rejects NaN/Inf (or a value bfloat16 overflows). */
typedef struct round_job {
    const void *m;
    dm_dtype compute;
    uint16_t *x;
} round_job;

/* Rounds a chunk, then sums its squares while it is still in cache. */
static double round_and_sum_chunk(void *arg, size_t begin, size_t end) {
    const round_job *job = arg;
    const unsigned char *src = (const unsigned char *)job->m + begin * dmi_dtype_size(job->compute);
    dmi_convert(NULL, src, job->compute, job->x + begin, DM_BFLOAT16, end - begin, 1.0);
    return dmi_sum_squares_bf16(job->x + begin, end - begin);
}

static dm_status normalise_like_torch_bf16(const dm_gemm_provider *threads, const void *m,
                                           dm_dtype compute, void *x0, size_t n,
                                           const dm_sharp_config *config) {
    uint16_t *x = x0;
    round_job job = {m, compute, x};
    const double sumsq = dmi_parallel_sum(threads, n, round_and_sum_chunk, &job);
    if (!isfinite(sumsq)) return DM_ERR_NONFINITE;
    const double norm = (double)dmi_bf16_to_f32(dmi_f32_to_bf16((float)sqrt(sumsq)));
    double divisor = config->norm_scale * norm + config->norm_offset;
    if (divisor < config->eps) divisor = config->eps;
    const float d = dmi_bf16_to_f32(dmi_f32_to_bf16((float)divisor));
    dmi_bf16_divide(threads, x, n, d);
    return DM_OK;
}

dm_status dmi_panel_apply(dmi_panel *panel, const dm_sharp_config *config) {
    if (panel->norm != DM_NORM_SPECTRAL) {
        if (panel->compute == DM_FLOAT64)
            apply_f64(panel);
        else
            apply_f32(panel);
        return DM_OK;
    }
    /* X0 = M / d enters the NS scratch in the iteration dtype; M stays in data for the duals. */
    const size_t per = (size_t)panel->p * (size_t)panel->q;
    for (int64_t b = 0; b < panel->batch; ++b) {
        const void *m = dmi_panel_matrix(panel, panel->data, panel->compute, b);
        void *x0 = dmi_panel_matrix(panel, panel->ns_scratch, panel->iteration, b);
        if (panel->iteration == DM_BFLOAT16)
            DMI_RETURN_IF_ERROR(
                normalise_like_torch_bf16(panel->provider, m, panel->compute, x0, per, config));
        else
            dmi_convert(panel->provider, m, panel->compute, x0, panel->iteration, per,
                        panel->scale[b]);
    }
    DMI_RETURN_IF_ERROR(dmi_ns_iterate(config, panel->iteration, panel->batch, panel->p, panel->q,
                                       panel->ns_scratch, &panel->result, panel->provider));
    panel->result_dtype = panel->iteration;
    for (int64_t b = 0; panel->want_duals && b < panel->batch; ++b)
        panel->duals[b] =
            dmi_dot(panel->provider, dmi_panel_matrix(panel, panel->data, panel->compute, b),
                    panel->compute, dmi_panel_matrix(panel, panel->result, panel->iteration, b),
                    panel->iteration, per);
    return DM_OK;
}

/* Copies user matrix b (rows x cols, leading dimension ld) into the panel. */
static void panel_load(dmi_panel *panel, int64_t b, const void *matrix, dm_dtype dtype,
                       int64_t ld) {
    unsigned char *dst = dmi_panel_matrix(panel, panel->data, panel->compute, b);
    const size_t src_row = (size_t)ld * dmi_dtype_size(dtype);
    const size_t dst_row = (size_t)panel->q * dmi_dtype_size(panel->compute);
    if (panel->transposed) {
        dmi_convert_transposed(panel->provider, matrix, dtype, ld, dst, panel->compute, panel->q,
                               panel->rows, panel->cols, 1.0);
    } else if (ld == panel->cols) {
        dmi_convert(panel->provider, matrix, dtype, dst, panel->compute,
                    (size_t)panel->rows * panel->cols, 1.0);
    } else {
        for (int64_t i = 0; i < panel->rows; ++i)
            dmi_convert(NULL, (const unsigned char *)matrix + (size_t)i * src_row, dtype,
                        dst + (size_t)i * dst_row, panel->compute, (size_t)panel->cols, 1.0);
    }
}

/* Copies panel matrix b back into a user matrix (rows x cols, leading dimension ld). */
static void panel_store(const dmi_panel *panel, int64_t b, void *matrix, dm_dtype dtype,
                        int64_t ld) {
    const dm_dtype from = panel->result_dtype;
    const unsigned char *src = dmi_panel_matrix(panel, panel->result, from, b);
    const size_t src_row = (size_t)panel->q * dmi_dtype_size(from);
    const size_t dst_row = (size_t)ld * dmi_dtype_size(dtype);
    if (panel->transposed) {
        dmi_convert_transposed(panel->provider, src, from, panel->q, matrix, dtype, ld, panel->p,
                               panel->q, 1.0);
    } else if (ld == panel->cols) {
        dmi_convert(panel->provider, src, from, matrix, dtype, (size_t)panel->rows * panel->cols,
                    1.0);
    } else {
        for (int64_t i = 0; i < panel->rows; ++i)
            dmi_convert(NULL, src + (size_t)i * src_row, from,
                        (unsigned char *)matrix + (size_t)i * dst_row, dtype, (size_t)panel->cols,
                        1.0);
    }
}

/* Whether the spectral operator can read the inputs where they are: already in the panel's
 * layout (wide, compute dtype, no padding, the batch contiguous), which saves a copy. */
static int spectral_reads_inputs_in_place(const dmi_panel *panel, dm_dtype dtype,
                                          const void *const *inputs, int64_t ld) {
    if (panel->batch == 0 || panel->norm != DM_NORM_SPECTRAL || panel->transposed ||
        dtype != panel->compute || ld != panel->cols)
        return 0;
    const size_t bytes = (size_t)panel->rows * (size_t)panel->cols * dmi_dtype_size(dtype);
    for (int64_t b = 1; b < panel->batch; ++b)
        if ((const unsigned char *)inputs[b] != (const unsigned char *)inputs[0] + b * bytes)
            return 0;
    return 1;
}

dm_status dm_sharp_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                  int64_t rows, int64_t cols, size_t *bytes) {
    return dmi_panel_workspace_size(config, dtype, batch, rows, cols, bytes);
}

dm_status dm_sharp(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                   int64_t cols, const void *const *inputs, int64_t in_ld, void *const *outputs,
                   int64_t out_ld, double *duals, void *workspace, size_t workspace_bytes,
                   const dm_gemm_provider *gemm) {
    size_t needed;
    DMI_RETURN_IF_ERROR(dm_sharp_workspace_size(config, dtype, batch, rows, cols, &needed));
    DMI_RETURN_IF_ERROR(
        dmi_check_sharp_pointers(batch, rows, cols, inputs, in_ld, outputs, out_ld));
    if (needed > 0 && (!workspace || workspace_bytes < needed)) return DM_ERR_WORKSPACE;
    DMI_RETURN_IF_ERROR(dmi_check_sharp_strides(batch, rows, cols, in_ld, out_ld));

    if (batch == 0) return DM_OK; /* nothing to do; the workspace may be NULL */
    if (rows == 0 || cols == 0) {
        for (int64_t b = 0; duals && b < batch; ++b) duals[b] = 0.0;
        return DM_OK;
    }
    /* Every input is read before the first write, so outputs may alias inputs. */
    dmi_panel panel;
    dmi_panel_init(&panel, config, dtype, batch, rows, cols, workspace, gemm);
    panel.want_duals = duals != NULL;
    if (spectral_reads_inputs_in_place(&panel, dtype, inputs, in_ld))
        panel.data = (void *)inputs[0]; /* only read: Newton-Schulz works in its scratch */
    else
        for (int64_t b = 0; b < batch; ++b) panel_load(&panel, b, inputs[b], dtype, in_ld);
    DMI_RETURN_IF_ERROR(dmi_panel_measure(&panel, config));
    DMI_RETURN_IF_ERROR(dmi_panel_apply(&panel, config));
    for (int64_t b = 0; b < batch; ++b) panel_store(&panel, b, outputs[b], dtype, out_ld);
    for (int64_t b = 0; duals && b < batch; ++b) duals[b] = panel.duals[b];
    return DM_OK;
}
