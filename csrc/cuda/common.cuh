/* common.cuh - what the CUDA kernels share: storage types, arithmetic that rounds exactly where
 * the C core rounds, warp and block reductions, the workspace layout, and the internal launchers
 * that one op's file calls in another's (gemm_batched.cu, newton_schulz.cu, pipeline.cu).
 * Internal names carry the prefix dmi_cuda_ (macros DMI_CUDA_); only dropmuon.h's dm_cuda_ entry
 * points are the library's API.
 *
 * Layout of every call (dm_cuda_sharp, dm_cuda_update), so that errors never leave partial
 * results behind, as in the C core (sharp.c, update.c):
 *   init      one thread: zero the device flags, resolve and check the hyperparameters;
 *   reduce    per 32x32 tile of the user's matrices: sums of squares (|x| for sign) and max |x|,
 *             written as per-tile partials (no atomics, so every result is deterministic);
 *   finish    a warp per norm group (matrix, row or column): sums its partials in a fixed
 *             order, raises NaN/Inf in the flags, turns the norm into a divisor;
 *   scale     SPECTRAL: X0 = M / d into the Newton-Schulz scratch (transposed for tall M);
 *   NS        the products (gemm_batched.cu or the provider; newton_schulz.cu);
 *   duals     SPECTRAL: <M, O> by tiles, then summed per matrix;
 *   final     the only pass that writes user memory, and only when the flags are clear.
 * The element sources (passes.cuh) recompute the update direction D from G and M in every pass
 * instead of storing it: reading G and M costs what storing and re-reading D would.
 */
#ifndef DROPMUON_CUDA_COMMON_CUH
#define DROPMUON_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* internal.h is C and declares its own functions without extern "C"; its system headers are
 * included above, so their include guards keep them out of this extern "C" block. */
extern "C" {
#include "internal.h"
}

/* ---- launch checks ------------------------------------------------------------------------ */

/* After every launch: a bad configuration or an earlier asynchronous fault shows up here. */
#define DMI_CUDA_LAUNCHED()                                                                        \
    do {                                                                                           \
        if (cudaGetLastError() != cudaSuccess) return DM_ERR_CUDA;                                 \
    } while (0)

#define DMI_CUDA_TRY(call)                                                                         \
    do {                                                                                           \
        if ((call) != cudaSuccess) return DM_ERR_CUDA;                                             \
    } while (0)

/* ---- geometry ------------------------------------------------------------------------------ */

/* Elementwise passes walk the user's matrices in 32x32 tiles with (32, 8) thread blocks: a warp
 * covers 32 consecutive columns of a row (coalesced), each thread 4 rows 8 apart; transposed
 * panels go through a padded shared-memory tile. */
#define DMI_CUDA_TILE 32
#define DMI_CUDA_TILE_ROWS 8
#define DMI_CUDA_TILE_STEPS (DMI_CUDA_TILE / DMI_CUDA_TILE_ROWS)
#define DMI_CUDA_BLOCK 256
#define DMI_CUDA_WARPS (DMI_CUDA_BLOCK / 32)

/* Workspace regions start on this boundary (what cuBLAS and 16-byte accesses like). */
#define DMI_CUDA_ALIGN ((size_t)256)

/* Most blocks in gridDim.y; batch loops stride by it. */
#define DMI_CUDA_MAX_GRID_Y 65535

/* Below this a float64 sum of squares may have lost digits to underflow (sharp.c's rule). */
#define DMI_CUDA_SUMSQ_SAFE_MIN 1e-280

enum { DMI_CUDA_GROUP_MATRIX = 0, DMI_CUDA_GROUP_ROW = 1, DMI_CUDA_GROUP_COLUMN = 2 };

/* What the reduce pass accumulates per element x (in compute precision). */
enum {
    DMI_CUDA_SQUARES = 0,      /* x^2: FROBENIUS, ROW, COLUMN, SPECTRAL with native iterates */
    DMI_CUDA_SQUARES_BF16 = 1, /* bf16(x)^2: SPECTRAL with bfloat16 iterates (torch's order) */
    DMI_CUDA_ABS = 2           /* |x|: SIGN (its dual is sum |x|) */
};

/* Bits of dmi_cuda_header::flags; the status they stand for is fixed by priority, so that the
 * answer does not depend on which block raised first. */
enum : unsigned { DMI_CUDA_FLAG_NONFINITE = 1u, DMI_CUDA_FLAG_INVALID = 2u };

__host__ __device__ inline int32_t dmi_cuda_flag_status(unsigned flags) {
    return (flags & DMI_CUDA_FLAG_INVALID)     ? (int32_t)DM_ERR_INVALID_ARG
           : (flags & DMI_CUDA_FLAG_NONFINITE) ? (int32_t)DM_ERR_NONFINITE
                                               : (int32_t)DM_OK;
}

/* The head of every workspace. */
struct dmi_cuda_header {
    unsigned flags;
    unsigned reserved;
    dm_cuda_update_hyperparameters hyper; /* resolved (device or config values) by init */
    double decay;                         /* 1 - lr * weight_decay, in float64 as update.c */
};

struct dmi_cuda_partial {
    double sum; /* of x^2, or |x| */
    double max; /* of |x|: tells NaN/Inf from an overflowing sum, and rescales float64 norms */
};

/* One launch's share of a call: up to DM_CUDA_TENSORS_PER_LAUNCH matrices from `first`. */
struct dmi_cuda_pass {
    int64_t rows, cols;       /* the user's matrices */
    int64_t tiles_r, tiles_c; /* 32x32 tiles over them */
    int64_t first;            /* global index of this launch's first matrix */
    int count;                /* matrices in this launch */
    int transposed;           /* SPECTRAL: the panel holds M^T (rows > cols) */
};

/* Where a call keeps what: byte offsets into the workspace, and the geometry they follow. */
struct dmi_cuda_layout {
    dm_norm norm;
    dm_dtype dtype, iteration;
    int64_t batch, rows, cols, p, q;
    int transposed;
    int64_t tiles_r, tiles_c, tiles;
    int group;      /* DMI_CUDA_GROUP_* */
    int64_t groups; /* norm groups per matrix: 1, rows or cols */
    int64_t parts;  /* reduce partials per group: tiles, tiles_c or tiles_r */
    size_t header, partials, scale, group_duals, duals, dual_parts, scratch, total;
};

/* The per-norm constants of the finish pass. */
struct dmi_cuda_norm_params {
    int mode;           /* DMI_CUDA_SQUARES* or DMI_CUDA_ABS */
    int spectral;       /* SPECTRAL: the dual comes later, from the iterates */
    int float64;        /* compute precision is float64 (sums of squares may underflow) */
    double norm_scale;  /* SPECTRAL: config's; 1 otherwise */
    double norm_offset; /* SPECTRAL: config's; 0 otherwise */
    double eps;         /* every divisor's lower bound */
};

/* ---- storage types ------------------------------------------------------------------------ */

template <typename S> struct dmi_cuda_storage;
template <> struct dmi_cuda_storage<float> {
    using compute = float;
    static constexpr dm_dtype dtype = DM_FLOAT32;
};
template <> struct dmi_cuda_storage<double> {
    using compute = double;
    static constexpr dm_dtype dtype = DM_FLOAT64;
};
template <> struct dmi_cuda_storage<__nv_bfloat16> {
    using compute = float;
    static constexpr dm_dtype dtype = DM_BFLOAT16;
};

/* A stored value in its compute type (exact). */
__device__ __forceinline__ float dmi_cuda_value(float x) { return x; }
__device__ __forceinline__ double dmi_cuda_value(double x) { return x; }
__device__ __forceinline__ float dmi_cuda_value(__nv_bfloat16 x) { return __bfloat162float(x); }

/* A compute value stored as S, rounded once (to nearest even), as the C core's STORE_x: a
 * float64 value goes to bfloat16 through float32, like dmi_f32_to_bf16((float)v). */
template <typename S> __device__ __forceinline__ S dmi_cuda_to(double v);
template <> __device__ __forceinline__ float dmi_cuda_to<float>(double v) { return (float)v; }
template <> __device__ __forceinline__ double dmi_cuda_to<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 dmi_cuda_to<__nv_bfloat16>(double v) {
    return __float2bfloat16_rn((float)v);
}
/* float arguments go straight to float32 or bfloat16 (a float is exact in double anyway). */
template <typename S> __device__ __forceinline__ S dmi_cuda_to(float v) {
    return dmi_cuda_to<S>((double)v);
}
template <> __device__ __forceinline__ float dmi_cuda_to<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 dmi_cuda_to<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

/* v rounded as storing it as S would (ROUND_x in internal.h), in v's own type. */
template <typename S, typename T> __device__ __forceinline__ T dmi_cuda_round(T v) {
    return (T)dmi_cuda_value(dmi_cuda_to<S>(v));
}

/* bf16(v) as a float: torch's bfloat16 rounding of an iterate. */
template <typename T> __device__ __forceinline__ float dmi_cuda_bf16_round(T v) {
    return __bfloat162float(__float2bfloat16_rn((float)v));
}

/* ---- arithmetic that rounds after every operation --------------------------------------------
 * The C core is compiled with -ffp-contract=off; nvcc would fuse a * b + c into one FMA. These
 * intrinsics are never contracted, so elementwise results equal the CPU kernels' bit for bit. */
__device__ __forceinline__ float dmi_cuda_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double dmi_cuda_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float dmi_cuda_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double dmi_cuda_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float dmi_cuda_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double dmi_cuda_sub(double a, double b) { return __dsub_rn(a, b); }

/* torch's lerp (update.c's LERP): self + w (end - self) for w < 0.5, else
 * end - (end - self)(1 - w). */
template <typename T> __device__ __forceinline__ T dmi_cuda_lerp(T self, T end, T w) {
    return w < (T)0.5
               ? dmi_cuda_add(self, dmi_cuda_mul(w, dmi_cuda_sub(end, self)))
               : dmi_cuda_sub(end, dmi_cuda_mul(dmi_cuda_sub(end, self), dmi_cuda_sub((T)1, w)));
}

/* 1 / max(scale * norm + offset, eps), and 0 where that divisor is 0 (sharp.c). */
__device__ __forceinline__ double dmi_cuda_inverse_divisor(double norm, double scale, double offset,
                                                           double eps) {
    double divisor = __dadd_rn(__dmul_rn(scale, norm), offset);
    if (divisor < eps) divisor = eps;
    return divisor > 0.0 && isfinite(divisor) ? __ddiv_rn(1.0, divisor) : 0.0;
}

/* ---- reductions (fixed order: the same inputs always give the same bits) -------------------- */

/* Butterfly over the 32 lanes; every lane ends with the same value (a + b == b + a exactly). */
__device__ __forceinline__ double dmi_cuda_warp_sum(double v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ double dmi_cuda_warp_max(double v) {
    for (int offset = 16; offset > 0; offset /= 2)
        v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

/* Sum and max over a (32, 8) block; the result is valid in thread (0, 0). Uses shared memory
 * once per kernel (no barrier after it). */
__device__ __forceinline__ dmi_cuda_partial dmi_cuda_block_reduce(double sum, double max) {
    __shared__ double sums[DMI_CUDA_TILE_ROWS], maxes[DMI_CUDA_TILE_ROWS];
    sum = dmi_cuda_warp_sum(sum);
    max = dmi_cuda_warp_max(max);
    if (threadIdx.x == 0) {
        sums[threadIdx.y] = sum;
        maxes[threadIdx.y] = max;
    }
    __syncthreads();
    dmi_cuda_partial result = {0.0, 0.0};
    if (threadIdx.y == 0) {
        const bool lane_has = threadIdx.x < DMI_CUDA_TILE_ROWS;
        result.sum = dmi_cuda_warp_sum(lane_has ? sums[threadIdx.x] : 0.0);
        result.max = dmi_cuda_warp_max(lane_has ? maxes[threadIdx.x] : 0.0);
    }
    return result;
}

/* ---- host helpers ------------------------------------------------------------------------- */

__host__ __device__ inline int64_t dmi_cuda_ceil_div(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}
__host__ __device__ inline int64_t dmi_cuda_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline size_t dmi_cuda_align_up(size_t n) {
    return (n + DMI_CUDA_ALIGN - 1) & ~(DMI_CUDA_ALIGN - 1);
}

/* Adds count * elem bytes, 256-byte aligned, at *offset = the running total. */
dm_status dmi_cuda_ws_add(size_t *total, size_t *offset, size_t count, size_t elem);

/* The layout of a call (config, dtype and sizes already validated by the C core's checks). */
dm_status dmi_cuda_plan(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                        int64_t cols, dmi_cuda_layout *layout);

/* The pass descriptor of chunk `chunk` (DM_CUDA_TENSORS_PER_LAUNCH matrices each). */
dmi_cuda_pass dmi_cuda_chunk(const dmi_cuda_layout *layout, int64_t chunk);
int64_t dmi_cuda_chunks(int64_t batch);

/* The finish pass's constants for a config. */
dmi_cuda_norm_params dmi_cuda_norm_constants(const dm_sharp_config *config,
                                             const dmi_cuda_layout *layout);

/* Multiprocessors of the current device (0 if it cannot be read). */
int dmi_cuda_multiprocessors(void);

/* DM_ERR_INVALID_ARG while `stream` is being captured (a synchronous call cannot wait there). */
dm_status dmi_cuda_require_not_capturing(cudaStream_t stream);

/* Enqueues the init pass: flags = 0 (or INVALID), hyperparameters resolved from `device_values`
 * (device memory, may be NULL) or `values`, decay = 1 - lr * weight_decay. */
dm_status dmi_cuda_launch_init(dmi_cuda_header *header,
                               const dm_cuda_update_hyperparameters *device_values,
                               dm_cuda_update_hyperparameters values, int check, int adaptive,
                               cudaStream_t stream);

/* out[g] = sum of parts[g * per_group .. + per_group) in a fixed order, for g < groups. */
dm_status dmi_cuda_launch_sum_parts(const double *parts, int64_t per_group, int64_t groups,
                                    double *out, cudaStream_t stream);

/* The synchronous ending: waits for the stream and returns the flags' status. */
dm_status dmi_cuda_wait_for_status(const dmi_cuda_header *header, cudaStream_t stream);

/* ---- the batched products and Newton-Schulz ---------------------------------------------- */

/* Row-major strided-batched C_b = alpha * A_b * op(B_b) + beta * Cin_b (dm_gemm_fn's contract,
 * with trans_a = 0), on the library's own tiled kernel, for FLOAT32/BFLOAT16 (float32
 * accumulation) and FLOAT64 (float64). symmetric: the caller knows the result is symmetric
 * (m == n, Cin symmetric): only upper-triangle tiles are computed, each written twice. Supported:
 * (trans_b, symmetric) = (1, 1) for X X^T and A A^T, and (0, 0) for P X. */
struct dmi_cuda_gemm_args {
    int trans_b, symmetric;
    int64_t batch, m, n, k;
    double alpha, beta;
    const void *a;
    int64_t lda, stride_a;
    const void *b;
    int64_t ldb, stride_b;
    const void *c_in; /* may equal c; unread when beta == 0 */
    void *c;
    int64_t ldc, stride_c;
};
dm_status dmi_cuda_gemm_batched(dm_dtype dtype, const dmi_cuda_gemm_args *args,
                                cudaStream_t stream);

/* Scratch bytes of dmi_cuda_ns_iterate: [X | X' (batch p q) | A | P (batch p p)], each region
 * 256-byte aligned, in the iteration dtype. */
dm_status dmi_cuda_ns_scratch_bytes(int64_t batch, int64_t p, int64_t q, size_t elem,
                                    size_t *bytes);

/* The Newton-Schulz iterations on batch p x q matrices (p <= q) whose X region holds X0;
 * *result is the final iterate (X or X'). Products as the header's "Products" paragraph says. */
dm_status dmi_cuda_ns_iterate(const dm_sharp_config *config, dm_dtype iteration, int64_t batch,
                              int64_t p, int64_t q, void *scratch, void **result,
                              const dm_gemm_provider *gemm, const dm_cuda_tuning *tuning,
                              cudaStream_t stream);

#endif /* DROPMUON_CUDA_COMMON_CUH */
