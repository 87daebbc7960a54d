/* internal.h - helpers shared by the C kernels; not part of the public API. */
#ifndef DROPMUON_CORE_INTERNAL_H
#define DROPMUON_CORE_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dropmuon/dropmuon.h"

#define DM_RETURN_IF_ERROR(expr)                                                                   \
    do {                                                                                           \
        dm_status dm_status_ = (expr);                                                             \
        if (dm_status_ != DM_OK) return dm_status_;                                                \
    } while (0)

/* Visits (i, j) over rows x cols in 64 x 64 tiles: a transposing copy then touches whole cache
 * lines on both sides. Use as DM_FOR_TILED(rows, cols, i, j) { body } */
#define DM_TILE 64
#define DM_FOR_TILED(rows, cols, i, j)                                                             \
    for (int64_t i##0 = 0; i##0 < (rows); i##0 += DM_TILE)                                         \
        for (int64_t j##0 = 0; j##0 < (cols); j##0 += DM_TILE)                                     \
            for (int64_t i = i##0; i < (i##0 + DM_TILE < (rows) ? i##0 + DM_TILE : (rows)); ++i)   \
                for (int64_t j = j##0; j < (j##0 + DM_TILE < (cols) ? j##0 + DM_TILE : (cols)); ++j)

/* Workspace regions start on this boundary so that BLAS sees aligned panels. */
#define DM_WORKSPACE_ALIGN ((size_t)64)

/* ---- bfloat16 storage: the high 16 bits of an IEEE float32 ---------------------------------- */
static inline float dm_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, as torch's c10::BFloat16 does; NaN stays a quiet NaN. */
static inline uint16_t dm_f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) return (uint16_t)((bits >> 16) | 0x0040u);
    uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)((bits + rounding_bias) >> 16);
}

static inline size_t dm_dtype_size(dm_dtype dtype) {
    switch (dtype) {
    case DM_FLOAT32: return 4;
    case DM_FLOAT64: return 8;
    case DM_BFLOAT16: return 2;
    }
    return 0;
}

static inline int dm_dtype_valid(dm_dtype dtype) {
    return dtype == DM_FLOAT32 || dtype == DM_FLOAT64 || dtype == DM_BFLOAT16;
}

/* Compute precision for a storage dtype: float64 stays float64, the rest run in float32. */
static inline dm_dtype dm_compute_dtype(dm_dtype dtype) {
    return dtype == DM_FLOAT64 ? DM_FLOAT64 : DM_FLOAT32;
}

/* ---- overflow-checked size arithmetic --------------------------------------------------------- */
static inline int dm_mul_overflows(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}

static inline size_t dm_align_up(size_t n) {
    return (n + DM_WORKSPACE_ALIGN - 1) & ~(DM_WORKSPACE_ALIGN - 1);
}

/* Adds a region of count elements of elem_bytes to a running workspace total (aligned). */
static inline dm_status dm_ws_add(size_t *total, size_t count, size_t elem_bytes) {
    size_t bytes;
    if (dm_mul_overflows(count, elem_bytes, &bytes)) return DM_ERR_SHAPE;
    bytes = dm_align_up(bytes);
    if (bytes < DM_WORKSPACE_ALIGN && count != 0) return DM_ERR_SHAPE; /* wrapped */
    if (*total > SIZE_MAX - bytes) return DM_ERR_SHAPE;
    *total += bytes;
    return DM_OK;
}

/* Carves the next region from a workspace laid out by the same dm_ws_add sequence. */
static inline void *dm_ws_take(unsigned char **cursor, size_t count, size_t elem_bytes) {
    void *region = *cursor;
    *cursor += dm_align_up(count * elem_bytes);
    return region;
}

/* Validates (batch, rows, cols) and returns batch * rows * cols elements. */
static inline dm_status dm_check_sizes(int64_t batch, int64_t rows, int64_t cols, size_t *elems) {
    size_t per;
    if (batch < 0 || rows < 0 || cols < 0) return DM_ERR_SHAPE;
    if (dm_mul_overflows((size_t)rows, (size_t)cols, &per)) return DM_ERR_SHAPE;
    if (dm_mul_overflows(per, (size_t)batch, elems)) return DM_ERR_SHAPE;
    if (*elems > (size_t)INT64_MAX / 8) return DM_ERR_SHAPE;
    return DM_OK;
}

/* ---- the spectral (Newton-Schulz) core, in newton_schulz.c ------------------------------------ */

/* Validates the NS-specific fields of a spectral config. */
dm_status dm_ns_check_config(const dm_sharp_config *config);

/* Runs the iterations on batch matrices p x q (p <= q), contiguous in compute precision at x,
 * which holds X0 / d already. scratch must hold batch * (p*q + 2*p*p) elements. On return
 * *result points at the final iterate (x or inside scratch). */
dm_status dm_ns_iterate(const dm_sharp_config *config, dm_dtype compute, int64_t batch, int64_t p,
                        int64_t q, void *x, void *scratch, void **result,
                        const dm_gemm_provider *gemm);

/* Elements of NS scratch for a batch of p x q problems. */
static inline dm_status dm_ns_scratch_elems(int64_t batch, int64_t p, int64_t q, size_t *elems) {
    size_t pq, pp, per;
    if (dm_mul_overflows((size_t)p, (size_t)q, &pq)) return DM_ERR_SHAPE;
    if (dm_mul_overflows((size_t)p, (size_t)p, &pp)) return DM_ERR_SHAPE;
    if (dm_mul_overflows(pp, 2, &per) || per > SIZE_MAX - pq) return DM_ERR_SHAPE;
    per += pq;
    if (dm_mul_overflows(per, (size_t)batch, elems)) return DM_ERR_SHAPE;
    return DM_OK;
}

/* ---- the shared sharp machinery, in sharp.c ----------------------------------------------------
 * A "panel" is the workspace copy of a batch of matrices in compute precision that a sharp
 * operator transforms in place: rows x cols as stored, or its transpose (cols x rows) when the
 * spectral operator meets a tall matrix. */
typedef struct dm_panel {
    dm_norm norm;
    dm_dtype compute;
    int64_t batch, rows, cols; /* of the user's matrices */
    int transposed;            /* the panel holds M^T */
    int64_t p, q;              /* the panel's own rows x cols */
    void *data;                /* batch * p * q compute elements */
    double *scale;             /* per-matrix (FROBENIUS, SPECTRAL) or per row/column divisors */
    void *ns_scratch;          /* SPECTRAL only */
} dm_panel;

/* Validates a sharp config (not its dtype or sizes). */
dm_status dm_sharp_check_config(const dm_sharp_config *config);

/* Workspace bytes of a panel (data, divisors, NS scratch). */
dm_status dm_panel_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                  int64_t rows, int64_t cols, size_t *bytes);

/* Lays the panel out in the workspace (sizes already validated). */
void dm_panel_init(dm_panel *panel, const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                   int64_t rows, int64_t cols, void *workspace);

/* Index of user element (i, j) of matrix b inside the panel's data. */
static inline size_t dm_panel_index(const dm_panel *panel, int64_t b, int64_t i, int64_t j) {
    size_t base = (size_t)b * (size_t)panel->p * (size_t)panel->q;
    return panel->transposed ? base + (size_t)j * (size_t)panel->q + (size_t)i
                             : base + (size_t)i * (size_t)panel->q + (size_t)j;
}

/* Computes the divisors of the loaded panel (norms clamped by the config) and rejects NaN/Inf:
 * DM_ERR_NONFINITE if any matrix holds one. Nothing outside the workspace is touched. */
dm_status dm_panel_measure(dm_panel *panel, const dm_sharp_config *config);

/* Replaces the panel's contents by sharp(M) (after dm_panel_measure). */
dm_status dm_panel_apply(dm_panel *panel, const dm_sharp_config *config,
                         const dm_gemm_provider *gemm);

/* Element (i, j) of matrix b of the panel's result, widened to double. */
static inline double dm_panel_get(const dm_panel *panel, int64_t b, int64_t i, int64_t j) {
    size_t k = dm_panel_index(panel, b, i, j);
    return panel->compute == DM_FLOAT64 ? ((const double *)panel->data)[k]
                                        : (double)((const float *)panel->data)[k];
}

/* ---- typed element access of user memory ------------------------------------------------------ */
static inline double dm_load(const void *base, dm_dtype dtype, size_t k) {
    switch (dtype) {
    case DM_FLOAT32: return (double)((const float *)base)[k];
    case DM_FLOAT64: return ((const double *)base)[k];
    case DM_BFLOAT16: return (double)dm_bf16_to_f32(((const uint16_t *)base)[k]);
    }
    return NAN;
}

/* Stores v rounded to the storage dtype (through float32 for the float32/bfloat16 types). */
static inline void dm_store(void *base, dm_dtype dtype, size_t k, double v) {
    switch (dtype) {
    case DM_FLOAT32: ((float *)base)[k] = (float)v; break;
    case DM_FLOAT64: ((double *)base)[k] = v; break;
    case DM_BFLOAT16: ((uint16_t *)base)[k] = dm_f32_to_bf16((float)v); break;
    }
}

/* v rounded as dm_store would store it. */
static inline double dm_round_to(dm_dtype dtype, double v) {
    switch (dtype) {
    case DM_FLOAT32: return (double)(float)v;
    case DM_FLOAT64: return v;
    case DM_BFLOAT16: return (double)dm_bf16_to_f32(dm_f32_to_bf16((float)v));
    }
    return NAN;
}

#endif /* DROPMUON_CORE_INTERNAL_H */
