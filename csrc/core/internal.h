/* internal.h - helpers shared by the C kernels (and csrc/cuda); not part of the public API.
 * Internal names carry the prefix dmi_ (macros DMI_); dm_ / DM_ belong to dropmuon.h alone. */
#ifndef DROPMUON_CORE_INTERNAL_H
#define DROPMUON_CORE_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dropmuon/dropmuon.h"

#define DMI_RETURN_IF_ERROR(expr)                                                                  \
    do {                                                                                           \
        dm_status dmi_status_ = (expr);                                                            \
        if (dmi_status_ != DM_OK) return dmi_status_;                                              \
    } while (0)

/* Visits (i, j) over rows x cols in 64 x 64 tiles: a transposing copy then touches whole cache
 * lines on both sides. Use as DMI_FOR_TILED(rows, cols, i, j) { body } */
#define DMI_TILE 64
#define DMI_FOR_TILED(rows, cols, i, j) DMI_FOR_TILED_ROWS(0, rows, cols, i, j)
/* The same over rows [first, last) only: one thread's band. */
#define DMI_FOR_TILED_ROWS(first, last, cols, i, j)                                                \
    for (int64_t i##0 = (first); i##0 < (last); i##0 += DMI_TILE)                                  \
        for (int64_t j##0 = 0; j##0 < (cols); j##0 += DMI_TILE)                                    \
            for (int64_t i = i##0; i < DMI_TILE_END(i##0, last); ++i)                              \
                for (int64_t j = j##0; j < DMI_TILE_END(j##0, cols); ++j)
/* The end of the tile starting at start, clamped to limit. */
#define DMI_TILE_END(start, limit) ((start) + DMI_TILE < (limit) ? (start) + DMI_TILE : (limit))

/* The O(mn) loops are compiled for several x86-64 levels and picked at load time (GCC/clang
 * function multi-versioning): the build stays portable yet the loops use AVX-512 where the
 * machine has it. Results do not depend on the version taken: no FMA contraction
 * (-ffp-contract=off) and reductions keep a fixed lane structure (DMI_REDUCE). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DMI_NO_CLONES)
#define DMI_VECTORIZE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DMI_VECTORIZE
#endif

/* Workspace regions start on this boundary so that BLAS sees aligned panels. */
#define DMI_WORKSPACE_ALIGN ((size_t)64)

/* ---- bfloat16 storage: the high 16 bits of an IEEE float32 ---------------------------------- */
static inline float dmi_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, as torch's c10::BFloat16 does; NaN stays a quiet NaN. */
static inline uint16_t dmi_f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) return (uint16_t)((bits >> 16) | 0x0040u);
    uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)((bits + rounding_bias) >> 16);
}

/* The shape-dependent factor of torch.optim.Muon's _adjust_lr (dm_update and dm_cuda_update). */
static inline double dmi_lr_ratio(dm_lr_adjust adjust, int64_t rows, int64_t cols) {
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

static inline size_t dmi_dtype_size(dm_dtype dtype) {
    switch (dtype) {
    case DM_FLOAT32: return 4;
    case DM_FLOAT64: return 8;
    case DM_BFLOAT16: return 2;
    }
    return 0;
}

static inline int dmi_dtype_valid(dm_dtype dtype) {
    return dtype == DM_FLOAT32 || dtype == DM_FLOAT64 || dtype == DM_BFLOAT16;
}

/* Compute precision for a storage dtype: float64 stays float64, the rest run in float32. */
static inline dm_dtype dmi_compute_dtype(dm_dtype dtype) {
    return dtype == DM_FLOAT64 ? DM_FLOAT64 : DM_FLOAT32;
}

/* ---- overflow-checked size arithmetic -------------------------------------------------------- */
static inline int dmi_mul_overflows(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}

static inline size_t dmi_align_up(size_t n) {
    return (n + DMI_WORKSPACE_ALIGN - 1) & ~(DMI_WORKSPACE_ALIGN - 1);
}

/* Adds a region of count elements of elem_bytes to a running workspace total (aligned). */
static inline dm_status dmi_ws_add(size_t *total, size_t count, size_t elem_bytes) {
    size_t bytes;
    if (dmi_mul_overflows(count, elem_bytes, &bytes)) return DM_ERR_SHAPE;
    bytes = dmi_align_up(bytes);
    if (bytes < DMI_WORKSPACE_ALIGN && count != 0) return DM_ERR_SHAPE; /* wrapped */
    if (*total > SIZE_MAX - bytes) return DM_ERR_SHAPE;
    *total += bytes;
    return DM_OK;
}

/* Carves the next region from a workspace laid out by the same dmi_ws_add sequence. */
static inline void *dmi_ws_take(unsigned char **cursor, size_t count, size_t elem_bytes) {
    void *region = *cursor;
    *cursor += dmi_align_up(count * elem_bytes);
    return region;
}

/* Validates (batch, rows, cols) and returns batch * rows * cols elements. */
static inline dm_status dmi_check_sizes(int64_t batch, int64_t rows, int64_t cols, size_t *elems) {
    size_t per;
    if (batch < 0 || rows < 0 || cols < 0) return DM_ERR_SHAPE;
    if (dmi_mul_overflows((size_t)rows, (size_t)cols, &per)) return DM_ERR_SHAPE;
    if (dmi_mul_overflows(per, (size_t)batch, elems)) return DM_ERR_SHAPE;
    if (*elems > (size_t)INT64_MAX / 8) return DM_ERR_SHAPE;
    return DM_OK;
}

/* The argument checks that dm_sharp and dm_cuda_sharp share (their workspace checks differ and
 * come between these two). Pointers: leading dimensions of at least cols, the pointer arrays of
 * a nonempty batch, and each matrix's pointers unless the matrices are empty. */
static inline dm_status dmi_check_sharp_pointers(int64_t batch, int64_t rows, int64_t cols,
                                                 const void *const *inputs, int64_t in_ld,
                                                 void *const *outputs, int64_t out_ld) {
    if (in_ld < cols || out_ld < cols) return DM_ERR_SHAPE;
    if (batch > 0 && (!inputs || !outputs)) return DM_ERR_INVALID_ARG;
    if (rows > 0 && cols > 0)
        for (int64_t b = 0; b < batch; ++b)
            if (!inputs[b] || !outputs[b]) return DM_ERR_INVALID_ARG;
    return DM_OK;
}

/* Strides: the last element of a matrix, (rows - 1) * ld + cols - 1, fits int64_t. */
static inline dm_status dmi_check_sharp_strides(int64_t batch, int64_t rows, int64_t cols,
                                                int64_t in_ld, int64_t out_ld) {
    if (batch > 0 && rows > 0 && cols > 0 &&
        (rows - 1 > (INT64_MAX - cols) / in_ld || rows - 1 > (INT64_MAX - cols) / out_ld))
        return DM_ERR_SHAPE;
    return DM_OK;
}

/* The pointer checks that dm_update and dm_cuda_update share: the arrays of a nonempty batch,
 * and each matrix's pointers unless the matrices are empty. */
static inline dm_status dmi_check_update_pointers(int64_t batch, int64_t rows, int64_t cols,
                                                  void *const *params, const void *const *grads,
                                                  void *const *momentum_buffers) {
    if (batch > 0 && (!params || !grads || !momentum_buffers)) return DM_ERR_INVALID_ARG;
    if (rows > 0 && cols > 0)
        for (int64_t b = 0; b < batch; ++b)
            if (!params[b] || !grads[b] || !momentum_buffers[b]) return DM_ERR_INVALID_ARG;
    return DM_OK;
}

/* ---- threads, in parallel.c ------------------------------------------------------------------ */

/* Elements below which a pass stays on one thread (torch's at::internal::GRAIN_SIZE). */
#define DMI_PARALLEL_GRAIN ((int64_t)32768)

/* body over [0, n) on the provider's threads (ranges of at least grain), or in one call on
 * this thread when there are none or n <= grain. */
void dmi_parallel_for(const dm_gemm_provider *provider, int64_t n, int64_t grain,
                      dm_parallel_body body, void *arg);

/* Rows per range for a pass over a rows x cols matrix: about DMI_PARALLEL_GRAIN elements. */
static inline int64_t dmi_row_grain(int64_t cols) {
    return cols >= DMI_PARALLEL_GRAIN ? 1 : DMI_PARALLEL_GRAIN / (cols > 0 ? cols : 1);
}

/* sum of chunk(arg, begin, end) over fixed chunks of [0, n), added in chunk order. The chunks
 * depend on n only (multiples of 4096 elements, at most 64 of them), so the sum has the same
 * bits on any number of threads; chunk may also write elements [begin, end) of an output. */
typedef double (*dmi_chunk_sum_fn)(void *arg, size_t begin, size_t end);
double dmi_parallel_sum(const dm_gemm_provider *provider, size_t n, dmi_chunk_sum_fn chunk,
                        void *arg);

/* ---- the spectral (Newton-Schulz) core, in newton_schulz.c ----------------------------------- */

/* Validates the NS-specific fields of a spectral config. */
dm_status dmi_ns_check_config(const dm_sharp_config *config);

/* The dtype the Newton-Schulz iterates are kept in, for data of dtype. */
static inline dm_dtype dmi_ns_iteration_dtype(const dm_sharp_config *config, dm_dtype dtype) {
    return config->ns_precision == DM_NS_BFLOAT16 ? DM_BFLOAT16 : dmi_compute_dtype(dtype);
}

/* Runs the iterations on batch matrices p x q (p <= q). The scratch is laid out as
 * [X (batch*p*q) | X' (batch*p*q) | A (batch*p*p) | P (batch*p*p)] in the iteration dtype, each
 * region 64-byte aligned, and X holds X0 / d on entry. *result points at the final iterate. */
dm_status dmi_ns_iterate(const dm_sharp_config *config, dm_dtype iteration, int64_t batch,
                         int64_t p, int64_t q, void *scratch, void **result,
                         const dm_gemm_provider *gemm);

/* Bytes of that scratch. */
static inline dm_status dmi_ns_scratch_bytes(int64_t batch, int64_t p, int64_t q, size_t elem,
                                             size_t *bytes) {
    size_t pq, pp;
    *bytes = 0;
    if (dmi_mul_overflows((size_t)p, (size_t)q, &pq) || dmi_mul_overflows(pq, (size_t)batch, &pq))
        return DM_ERR_SHAPE;
    if (dmi_mul_overflows((size_t)p, (size_t)p, &pp) || dmi_mul_overflows(pp, (size_t)batch, &pp))
        return DM_ERR_SHAPE;
    DMI_RETURN_IF_ERROR(dmi_ws_add(bytes, pq, elem));
    DMI_RETURN_IF_ERROR(dmi_ws_add(bytes, pq, elem));
    DMI_RETURN_IF_ERROR(dmi_ws_add(bytes, pp, elem));
    return dmi_ws_add(bytes, pp, elem);
}

/* Typed element access for code instantiated per dtype (suffixes f32, f64, bf16). */
#define LOAD_f32(p, k) (((const float *)(p))[k])
#define LOAD_f64(p, k) (((const double *)(p))[k])
#define LOAD_bf16(p, k) dmi_bf16_to_f32(((const uint16_t *)(p))[k])
#define STORE_f32(p, k, v) (((float *)(p))[k] = (float)(v))
#define STORE_f64(p, k, v) (((double *)(p))[k] = (double)(v))
#define STORE_bf16(p, k, v) (((uint16_t *)(p))[k] = dmi_f32_to_bf16((float)(v)))
/* v rounded as STORE_x would store it. */
#define ROUND_f32(v) ((float)(v))
#define ROUND_f64(v) ((double)(v))
#define ROUND_bf16(v) dmi_bf16_to_f32(dmi_f32_to_bf16((float)(v)))

/* ---- typed O(mn) passes, in elementwise.c --------------------------------------------------- */

/* Each pass taking `threads` runs on that provider's parallel_for (NULL: this thread only). */

/* dst[k] = src[k] * scale for k < n, converting dtypes (float32 arithmetic unless float64). */
void dmi_convert(const dm_gemm_provider *threads, const void *src, dm_dtype src_dtype, void *dst,
                 dm_dtype dst_dtype, size_t n, double scale);
/* dst[j * dst_ld + i] = src[i * src_ld + j] * scale over rows x cols, in cache tiles. */
void dmi_convert_transposed(const dm_gemm_provider *threads, const void *src, dm_dtype src_dtype,
                            int64_t src_ld, void *dst, dm_dtype dst_dtype, int64_t dst_ld,
                            int64_t rows, int64_t cols, double scale);
/* sum_k x[k] * y[k], accumulated in double (fixed chunks: see dmi_parallel_sum). */
double dmi_dot(const dm_gemm_provider *threads, const void *x, dm_dtype x_dtype, const void *y,
               dm_dtype y_dtype, size_t n);
/* sum_k x[k]^2 of bfloat16 values: float32 lanes (as torch accumulates bfloat16 norms) within
 * blocks of 4096, the blocks summed in double. */
double dmi_sum_squares_bf16(const uint16_t *x, size_t n);
/* x[k] = bf16(float(x[k]) / d) for k < n (d > 0), or 0 everywhere when d == 0. */
void dmi_bf16_divide(const dm_gemm_provider *threads, uint16_t *x, size_t n, float d);
/* Sums over n contiguous elements of a compute type (float32 or float64), in double. */
double dmi_sum_squares(const dm_gemm_provider *threads, const void *x, dm_dtype dtype, size_t n);
double dmi_sum_abs(const void *x, dm_dtype dtype, size_t n);
/* acc[j] = sum_i x[i][j]^2 for a contiguous rows x cols matrix of a compute type. */
void dmi_column_sum_squares(const void *x, dm_dtype dtype, int64_t rows, int64_t cols, double *acc);

/* ---- the shared sharp machinery, in sharp.c ----------------------------------------------------
 * A "panel" is the workspace copy of a batch of matrices in compute precision that a sharp
 * operator transforms: rows x cols as stored, or its transpose (cols x rows) when the spectral
 * operator meets a tall matrix (Newton-Schulz runs on the wide orientation). */
typedef struct dmi_panel {
    dm_norm norm;
    dm_dtype compute;          /* dtype of data: float32, or float64 for float64 input */
    dm_dtype iteration;        /* SPECTRAL: dtype of the Newton-Schulz iterates */
    int64_t batch, rows, cols; /* of the user's matrices */
    int transposed;            /* the panel holds M^T */
    int64_t p, q;              /* the panel's own rows x cols */
    void *data;                /* batch * p * q compute elements: M, as loaded (for dm_sharp's
                                  spectral operator, possibly the caller's input itself) */
    void *result;              /* batch * p * q: sharp(M) after dmi_panel_apply (data itself, or
                                  the final Newton-Schulz iterate) */
    dm_dtype result_dtype;     /* compute, or the iteration dtype for SPECTRAL */
    double *scale;             /* inverse divisors, per matrix or per row / column */
    double *duals;             /* batch values <M, sharp(M)> after dmi_panel_apply */
    int want_duals;            /* 0: SPECTRAL may skip the duals' extra pass */
    void *ns_scratch;          /* SPECTRAL only: see dmi_ns_iterate */
    const dm_gemm_provider *provider; /* the caller's products and threads (NULL: plain C) */
} dmi_panel;

/* Validates a sharp config (not its dtype or sizes). */
dm_status dmi_sharp_check_config(const dm_sharp_config *config);

/* Workspace bytes of a panel (data, divisors, duals, NS scratch); validates everything. */
dm_status dmi_panel_workspace_size(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                                   int64_t rows, int64_t cols, size_t *bytes);

/* Lays the panel out in the workspace (sizes already validated). */
void dmi_panel_init(dmi_panel *panel, const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                    int64_t rows, int64_t cols, void *workspace, const dm_gemm_provider *provider);

/* Matrix b of a batch of panel-shaped matrices of a dtype starting at base (data or result). */
static inline void *dmi_panel_matrix(const dmi_panel *panel, const void *base, dm_dtype dtype,
                                     int64_t b) {
    return (unsigned char *)base +
           (size_t)b * (size_t)panel->p * (size_t)panel->q * dmi_dtype_size(dtype);
}

/* Computes the divisors of the loaded panel (norms clamped by the config) and rejects NaN/Inf:
 * DM_ERR_NONFINITE if any matrix holds one (with bfloat16 iterates, dmi_panel_apply checks
 * instead, in the pass that rounds M). Nothing outside the workspace is touched. */
dm_status dmi_panel_measure(dmi_panel *panel, const dm_sharp_config *config);

/* Puts sharp(M) at panel->result and fills panel->duals (after dmi_panel_measure); may return
 * DM_ERR_NONFINITE or DM_ERR_GEMM, having touched only the workspace. */
dm_status dmi_panel_apply(dmi_panel *panel, const dm_sharp_config *config);

/* ---- typed element access of user memory ----------------------------------------------------- */
static inline double dmi_load(const void *base, dm_dtype dtype, size_t k) {
    switch (dtype) {
    case DM_FLOAT32: return (double)((const float *)base)[k];
    case DM_FLOAT64: return ((const double *)base)[k];
    case DM_BFLOAT16: return (double)dmi_bf16_to_f32(((const uint16_t *)base)[k]);
    }
    return NAN;
}

/* Stores v rounded to the storage dtype (through float32 for the float32/bfloat16 types). */
static inline void dmi_store(void *base, dm_dtype dtype, size_t k, double v) {
    switch (dtype) {
    case DM_FLOAT32: ((float *)base)[k] = (float)v; break;
    case DM_FLOAT64: ((double *)base)[k] = v; break;
    case DM_BFLOAT16: ((uint16_t *)base)[k] = dmi_f32_to_bf16((float)v); break;
    }
}

/* v rounded as dmi_store would store it. */
static inline double dmi_round_to(dm_dtype dtype, double v) {
    switch (dtype) {
    case DM_FLOAT32: return (double)(float)v;
    case DM_FLOAT64: return v;
    case DM_BFLOAT16: return (double)dmi_bf16_to_f32(dmi_f32_to_bf16((float)v));
    }
    return NAN;
}

#endif /* DROPMUON_CORE_INTERNAL_H */
