/*
 * dropmuon.h - the one public C API of dropmuon.
 *
 * Drop-Muon (Gruntkowska, Maziane, Qu, Richtarik, arXiv 2510.02239): Muon-style per-layer
 * non-Euclidean updates where each step only the layers from a random cutoff up to the output
 * are updated. This header holds the torch-free kernels behind the torch operators:
 *
 *   - sharp operators (spectral via Newton-Schulz, sign, column-, row-, Frobenius-normalised)
 *     on a batch of same-shape matrices, each also returning the dual-norm value <M, sharp(M)>;
 *   - the fused Muon update (momentum EMA, Nesterov, sharp, lr scale, weight decay, step);
 *   - the layer sampler (counter-based, keyed by (seed, step)).
 *
 * Conventions (see docs/STYLE.md):
 *   - every function returns dm_status; nothing prints, exits or aborts;
 *   - no hidden allocation: dm_<op>_workspace_size() tells the bytes, the caller passes them;
 *   - matrices are row-major; sizes are int64_t; hyperparameters travel in POD structs;
 *   - bfloat16 is a storage type only: arithmetic runs in float32 (float64 for float64 data).
 */
#ifndef DROPMUON_DROPMUON_H
#define DROPMUON_DROPMUON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DM_VERSION_MAJOR 0
#define DM_VERSION_MINOR 1
#define DM_VERSION_PATCH 0

/* Marks the public functions and data below: the library is compiled with -fvisibility=hidden,
 * so a shared build exports these and nothing else (the internal dmi_ helpers stay hidden). */
#if defined(__GNUC__) || defined(__clang__)
#define DM_API __attribute__((visibility("default")))
#else
#define DM_API
#endif

/* ---------------------------------------------------------------------------------------------
 * Status codes. Values are stable: never renumber, only append.
 * ------------------------------------------------------------------------------------------- */
typedef enum dm_status {
    DM_OK = 0,
    DM_ERR_INVALID_ARG = 1, /* a NULL pointer, a hyperparameter out of range, an unknown enum */
    DM_ERR_SHAPE = 2,       /* negative sizes, a leading dimension too small, size overflow */
    DM_ERR_DTYPE = 3,       /* a dtype the operation does not support */
    DM_ERR_WORKSPACE = 4,   /* workspace missing or smaller than dm_*_workspace_size() said */
    DM_ERR_NONFINITE = 5,   /* NaN or Inf in the input; nothing was written */
    DM_ERR_PROBABILITY = 6, /* probabilities negative, NaN, or not summing to 1 */
    DM_ERR_GEMM = 7,        /* the matrix-product provider reported a failure */
    DM_ERR_CUDA = 8         /* a CUDA launch or runtime call failed (CUDA entry points only) */
} dm_status;

/* A static, human-readable name for a status ("DM_ERR_SHAPE: ..."); never NULL. */
DM_API const char *dm_status_string(dm_status status);

/* The library's version as MAJOR*10000 + MINOR*100 + PATCH (compare with the macros). */
DM_API int dm_version(void);

/* Element types of user memory. Compute precision: float32 for FLOAT32 and BFLOAT16,
 * float64 for FLOAT64. */
typedef enum dm_dtype { DM_FLOAT32 = 0, DM_FLOAT64 = 1, DM_BFLOAT16 = 2 } dm_dtype;

/* ---------------------------------------------------------------------------------------------
 * Matrix products. The kernels do their O(m^2 n) work through a provider so that the core stays
 * torch-free while running at the speed of the BLAS torch uses: the torch shim passes one that
 * calls ATen; NULL selects dm_gemm_reference (plain C, for standalone use and tests).
 *
 * Row-major strided-batched GEMM, for b in [0, batch):
 *   C_b = alpha * op(A_b) * op(B_b) + beta * Cin_b,   op(X) = X or X^T,
 * op(A_b) is m x k, op(B_b) is k x n, C_b and Cin_b are m x n with the same layout (ldc,
 * stride_c); X_b starts at X + b * stride_x elements. c_in may equal c (in place); when
 * beta == 0 it is not read and may be NULL. (A separate c_in spares the caller a copy: torch's
 * addmm_out does it with its thread pool, fused with the product where the BLAS can.)
 * dtype is DM_FLOAT32, DM_FLOAT64 or DM_BFLOAT16 (bfloat16 operands, float32 accumulation,
 * C rounded to bfloat16).
 * ------------------------------------------------------------------------------------------- */
typedef dm_status (*dm_gemm_fn)(void *ctx, dm_dtype dtype, int trans_a, int trans_b, int64_t batch,
                                int64_t m, int64_t n, int64_t k, double alpha, const void *a,
                                int64_t lda, int64_t stride_a, const void *b, int64_t ldb,
                                int64_t stride_b, double beta, const void *c_in, void *c,
                                int64_t ldc, int64_t stride_c);

/* Optional threads for the O(mn) passes around the products (conversions, norms, momentum,
 * the parameter step): parallel_for must call body(arg, begin, end) on disjoint ranges that
 * together cover [0, n) exactly once, each at least grain long where n allows, and return only
 * when all have finished. It cannot fail: it may be called after writes to user memory began.
 * Results never depend on how the range is split (sums use fixed chunks that depend on n only),
 * so a provider without threads (parallel_for NULL) gives the same bits. */
typedef void (*dm_parallel_body)(void *arg, int64_t begin, int64_t end);
typedef void (*dm_parallel_for_fn)(void *ctx, int64_t n, int64_t grain, dm_parallel_body body,
                                   void *arg);

typedef struct dm_gemm_provider {
    dm_gemm_fn gemm;
    void *ctx;                       /* passed back unchanged as the first argument */
    dm_parallel_for_fn parallel_for; /* NULL: the passes run on the calling thread */
} dm_gemm_provider;

/* The plain C product (ctx unused). Same contract as dm_gemm_fn. */
DM_API dm_status dm_gemm_reference(void *ctx, dm_dtype dtype, int trans_a, int trans_b,
                                   int64_t batch, int64_t m, int64_t n, int64_t k, double alpha,
                                   const void *a, int64_t lda, int64_t stride_a, const void *b,
                                   int64_t ldb, int64_t stride_b, double beta, const void *c_in,
                                   void *c, int64_t ldc, int64_t stride_c);

/* ---------------------------------------------------------------------------------------------
 * Sharp operators (docs/method.md section 4). For a matrix M (rows x cols):
 *   SPECTRAL   U V^T of M by Newton-Schulz: transpose so rows <= cols, X = M / d with
 *              d = max(norm_scale * ||M||_F + norm_offset, eps), then for each step j
 *              A = X X^T;  X = a_j X + (b_j A + c_j A^2) X.       (torch.optim.Muon's NS)
 *              The iterates are kept in the data's compute precision (DM_NS_NATIVE) or, as
 *              torch.optim.Muon does, in bfloat16 with float32-accumulated products
 *              (DM_NS_BFLOAT16: ~4x faster where the BLAS has bfloat16 kernels, error ~1e-2).
 *   SIGN       sign(M) (sign(0) = 0)                               (l_inf geometry)
 *   COLUMN     each column divided by max(||column||_2, eps)       (input embedding)
 *   ROW        each row divided by max(||row||_2, eps)             (output head)
 *   FROBENIUS  M / max(||M||_F, eps)                               (Euclidean)
 * The dual-norm value <M, sharp(M)> (sum of elementwise products; the nuclear norm for SPECTRAL,
 * up to Newton-Schulz accuracy) is returned per matrix. A zero matrix gives a zero result.
 * ------------------------------------------------------------------------------------------- */
typedef enum dm_norm {
    DM_NORM_SPECTRAL = 0,
    DM_NORM_SIGN = 1,
    DM_NORM_COLUMN = 2,
    DM_NORM_ROW = 3,
    DM_NORM_FROBENIUS = 4
} dm_norm;

/* Newton-Schulz coefficient schedules (docs/method.md section 4). Each is ns_steps * 3 doubles. */
#define DM_MUON_NS_A 3.4445
#define DM_MUON_NS_B -4.7750
#define DM_MUON_NS_C 2.0315
#define DM_POLAR_EXPRESS_STEPS 5
/* Polar Express (Amsel et al. 2025): pair with norm_scale = 1.02, norm_offset = 1e-6. */
DM_API extern const double dm_polar_express_coefficients[DM_POLAR_EXPRESS_STEPS * 3];

typedef enum dm_ns_precision { DM_NS_NATIVE = 0, DM_NS_BFLOAT16 = 1 } dm_ns_precision;

typedef struct dm_sharp_config {
    dm_norm norm;
    int64_t ns_steps;              /* SPECTRAL: number of iterations, >= 0 */
    const double *ns_coefficients; /* SPECTRAL: ns_steps triples (a_j, b_j, c_j), finite */
    double norm_scale;             /* SPECTRAL: > 0; 1.0 for Muon, 1.02 for Polar Express */
    double norm_offset;            /* SPECTRAL: >= 0; 0.0 for Muon, 1e-6 for Polar Express */
    double eps;                    /* every norm: lower bound of a divisor, >= 0 (Muon: 1e-7) */
    dm_ns_precision ns_precision;  /* SPECTRAL: precision of the iterates (0 = native) */
} dm_sharp_config;

/* A config for Muon's defaults: spectral, 5 steps of (3.4445, -4.7750, 2.0315), eps 1e-7,
 * native precision.
 * coefficients must point to 15 doubles owned by the caller; they are filled in. */
DM_API dm_status dm_sharp_config_muon(dm_sharp_config *config, double coefficients[15]);

/* Workspace bytes for dm_sharp on batch matrices of rows x cols in dtype. */
DM_API dm_status dm_sharp_workspace_size(const dm_sharp_config *config, dm_dtype dtype,
                                         int64_t batch, int64_t rows, int64_t cols, size_t *bytes);

/* outputs[b] = sharp(inputs[b]) for b in [0, batch). Each matrix is rows x cols, row-major with
 * leading dimension in_ld / out_ld (>= cols; elements between rows are neither read nor
 * written). duals (may be NULL) receives batch values <M_b, sharp(M_b)>. outputs may alias
 * inputs (same ld). On any error status nothing has been written to outputs or duals. Passing
 * duals = NULL also saves the spectral operator one pass over the data. */
DM_API dm_status dm_sharp(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                          int64_t rows, int64_t cols, const void *const *inputs, int64_t in_ld,
                          void *const *outputs, int64_t out_ld, double *duals, void *workspace,
                          size_t workspace_bytes, const dm_gemm_provider *gemm);

/* ---------------------------------------------------------------------------------------------
 * Fused update (torch.optim.Muon's step, plus the theory-driven radius). For each same-shape
 * parameter X with gradient G and momentum buffer M (all rows x cols, contiguous, one dtype):
 *   M <- lerp(M, G, 1 - momentum)                  (= momentum*M + (1-momentum)*G)
 *   D <- nesterov ? lerp(G, M, momentum) : M
 *   O <- sharp(D)
 *   X <- X * (1 - lr * weight_decay)               (decoupled decay, unadjusted lr, as torch)
 *   X <- X - t * O, with t =
 *        lr * ratio(rows, cols)                    radius DM_RADIUS_FIXED, where ratio is
 *                                                  1 (NONE), sqrt(max(1, rows/cols)) (ORIGINAL)
 *                                                  or 0.2 * sqrt(max(rows, cols)) (MATCH_RMS_ADAMW)
 *        lr * <D,O> / (L0 + L1 * <D,O>)            radius DM_RADIUS_ADAPTIVE ((L0,L1)-smoothness)
 * Before anything is written, every direction D is checked and every product done: a NaN or
 * Inf anywhere returns DM_ERR_NONFINITE, a failing provider DM_ERR_GEMM, with all parameters and
 * buffers untouched. The adaptive step of a zero direction (dual 0) is 0.
 * ------------------------------------------------------------------------------------------- */
typedef enum dm_lr_adjust {
    DM_LR_ADJUST_NONE = 0,
    DM_LR_ADJUST_ORIGINAL = 1,       /* torch.optim.Muon's default ("original") */
    DM_LR_ADJUST_MATCH_RMS_ADAMW = 2 /* torch.optim.Muon's "match_rms_adamw" */
} dm_lr_adjust;

typedef enum dm_radius { DM_RADIUS_FIXED = 0, DM_RADIUS_ADAPTIVE = 1 } dm_radius;

typedef struct dm_update_config {
    dm_sharp_config sharp;
    double lr;           /* >= 0 */
    double weight_decay; /* >= 0 */
    double momentum;     /* in [0, 1] */
    int nesterov;        /* 0 or 1 */
    dm_lr_adjust lr_adjust;
    dm_radius radius;
    double radius_l0; /* ADAPTIVE: L0 >= 0 */
    double radius_l1; /* ADAPTIVE: L1 >= 0, L0 + L1 > 0 */
} dm_update_config;

DM_API dm_status dm_update_workspace_size(const dm_update_config *config, dm_dtype dtype,
                                          int64_t batch, int64_t rows, int64_t cols, size_t *bytes);

/* Applies the update to batch parameters in place. params, grads and momentum_buffers are
 * arrays of batch pointers to contiguous rows x cols matrices; duals (may be NULL) receives
 * <D_b, O_b>. */
DM_API dm_status dm_update(const dm_update_config *config, dm_dtype dtype, int64_t batch,
                           int64_t rows, int64_t cols, void *const *params,
                           const void *const *grads, void *const *momentum_buffers, double *duals,
                           void *workspace, size_t workspace_bytes, const dm_gemm_provider *gemm);

/* ---------------------------------------------------------------------------------------------
 * Layer sampler (docs/method.md section 2). Layers are 0-based, input (0) to output
 * (num_layers - 1).
 * A draw is a function of (seed, step) only (Philox4x32-10, key = seed, counter = step), so a
 * resumed run and every data-parallel rank draw the same layers with no state or communication.
 *
 *   FULL          cutoff 0 always (Muon).
 *   UNIFORM       P(cutoff = i) = 1 / num_layers.
 *   CUSTOM        P(cutoff = i) = probabilities[i]; each finite and >= 0, summing to 1 within
 *                 1e-6; anything else is DM_ERR_PROBABILITY (never renormalised).
 *   TAU_NICE      tau distinct layers uniformly at random (selection sampling: layer i joins
 *                 when (num_layers - i) * u_i < still needed, u_i = dm_random_uniform(seed,
 *                 step, i)); the cutoff is the lowest of them, and only they are active.
 *   EPOCH_SHIFT   P(cutoff = i) proportional to exp(shift_strength * (2 * progress - 1) * x_i),
 *                 x_i = i / (num_layers - 1): at progress 0 shallow cutoffs dominate (nearly
 *                 full updates), at 0.5 it is uniform, at 1 deep cutoffs dominate. progress is
 *                 the fraction of training done, in [0, 1]. (Our definition; see README.)
 *   COST_OPTIMAL  from smoothness estimates L_i >= 0 (docs/method.md section 3): with the
 *                 running maximum R_i = max(L_0..L_i), P(cutoff = i) = (R_i - R_{i-1}) /
 *                 R_last, R_{-1} = 0, so layer i is active with probability R_i / R_last.
 * For all kinds but TAU_NICE the active layers are {cutoff, .., num_layers - 1}.
 * ------------------------------------------------------------------------------------------- */
typedef enum dm_sampling {
    DM_SAMPLING_FULL = 0,
    DM_SAMPLING_UNIFORM = 1,
    DM_SAMPLING_CUSTOM = 2,
    DM_SAMPLING_TAU_NICE = 3,
    DM_SAMPLING_EPOCH_SHIFT = 4,
    DM_SAMPLING_COST_OPTIMAL = 5
} dm_sampling;

typedef struct dm_sampler_config {
    dm_sampling kind;
    int64_t num_layers;          /* >= 1 */
    uint64_t seed;               /* any value */
    const double *probabilities; /* CUSTOM: num_layers values */
    int64_t tau;                 /* TAU_NICE: 1 <= tau <= num_layers */
    double progress;             /* EPOCH_SHIFT: in [0, 1] */
    double shift_strength;       /* EPOCH_SHIFT: finite, >= 0 (the package's default is 4) */
    const double *smoothness;    /* COST_OPTIMAL: num_layers finite values >= 0, max > 0 */
} dm_sampler_config;

/* P(cutoff = i) for i in [0, num_layers): the distribution of the lowest active layer (for
 * TAU_NICE: C(num_layers - 1 - i, tau - 1) / C(num_layers, tau)). */
DM_API dm_status dm_sampler_distribution(const dm_sampler_config *config,
                                         double *cutoff_probabilities);

/* Draws the layers for optimizer step `step`: active_mask[i] = 1 if layer i is updated, else 0
 * (num_layers bytes, may be NULL), *cutoff = the lowest active layer (may be NULL). */
DM_API dm_status dm_sample_layers(const dm_sampler_config *config, uint64_t step,
                                  uint8_t *active_mask, int64_t *cutoff);

/* The sampler's random numbers, exposed so that other implementations can match them:
 * uniform in [0, 1) with 53 random bits, from Philox4x32-10 with key (seed low 32 bits, seed
 * high 32 bits) and counter (step low, step high, index low, index high); with the first two
 * output words as w = (word0 << 32) | word1, the value is (w >> 11) * 2^-53. */
DM_API double dm_random_uniform(uint64_t seed, uint64_t step, uint64_t index);

/* =============================================================================================
 * CUDA entry points (the .cu files in csrc/cuda). Defined only in a CUDA build of the library;
 * this header stays CUDA-free: `stream` is a cudaStream_t passed as void * (NULL: the legacy
 * default stream).
 *
 * dm_cuda_sharp / dm_cuda_update compute exactly what dm_sharp / dm_update compute (same
 * configs, dtypes, rounding of every elementwise step, zero matrix -> zero result, adaptive
 * 0 / 0 -> 0), enqueued on `stream`. The differences:
 *
 *   Memory. Matrices, duals and the workspace are DEVICE memory. The pointer arrays (inputs,
 *     outputs, params, grads, momentum_buffers) are HOST arrays of device pointers, read during
 *     the call only: each launch carries up to DM_CUDA_TENSORS_PER_LAUNCH of them by value in
 *     its kernel parameters, so nothing is copied to the device and a captured CUDA graph keeps
 *     them (the tensors must then stay where they are while the graph is replayed). Nothing is
 *     allocated; the workspace (dm_cuda_*_workspace_size bytes, 256-byte aligned, which
 *     cudaMalloc and the caching allocators give) must stay untouched until the work is done.
 *
 *   Errors. Host-side checks (arguments, sizes, workspace) return their status before anything
 *     is enqueued; a failed launch or CUDA call returns DM_ERR_CUDA, a failing provider
 *     DM_ERR_GEMM, and in both cases no user memory is written (the passes that write it are
 *     enqueued last). What only the device can see (NaN/Inf: DM_ERR_NONFINITE; out-of-range
 *     device hyperparameters: DM_ERR_INVALID_ARG) is raised in a flag in the workspace, and the
 *     final passes write nothing when it is set. `status` selects how it comes back:
 *       NULL      synchronous: the call waits for the stream and returns the device's verdict,
 *                 as the CPU functions do. Refused (DM_ERR_INVALID_ARG) while `stream` is being
 *                 captured into a CUDA graph, since it must wait.
 *       non-NULL  asynchronous and capturable: a DEVICE int32. The call never waits and returns
 *                 DM_OK once the work is enqueued; when the work runs, a device error is stored
 *                 into *status (first error wins; nothing ever clears it). *status is also a
 *                 gate: when it is already nonzero as the final pass starts, that pass writes
 *                 nothing. So a caller can zero it once per optimizer step, optionally set it
 *                 from its own screening of every gradient first (an all-or-nothing step), run
 *                 every update of the step, and read it once, or never inside a graph.
 *
 *   Products. Newton-Schulz (p x q iterates, p <= q) runs its products on the library's own
 *     batched kernel (one launch per product for the whole batch; 32x32 or 64x64 output tiles
 *     in shared memory, float32 accumulation for float32/bfloat16 iterates, float64 for float64)
 *     when p <= tuning->batched_max_p or gemm is NULL, else through the provider, which must
 *     take device pointers and enqueue its products on `stream` (the torch shim passes ATen's
 *     cuBLAS products on the current stream: tensor cores for bfloat16). X X^T and A A are
 *     symmetric: the batched kernel computes only the upper-triangle tiles and writes each
 *     twice; with the provider and p >= tuning->symmetric_min_p each is computed as three
 *     blocks of a 2x2 split (both diagonal blocks and the upper one: 3/4 of the flops) and the
 *     lower block is mirrored. The iterates are the same up to rounding on every route.
 * ------------------------------------------------------------------------------------------- */

/* Most tensors one kernel launch carries (the launchers loop over chunks of this many). */
#define DM_CUDA_TENSORS_PER_LAUNCH 64

/* Routing of the Newton-Schulz products (see above); NULL takes these defaults. */
#define DM_CUDA_BATCHED_MAX_P 256
#define DM_CUDA_SYMMETRIC_MIN_P 2048
typedef struct dm_cuda_tuning {
    int64_t batched_max_p;   /* batched kernel for p <= this (0: always the provider, if any) */
    int64_t symmetric_min_p; /* provider: symmetric products by blocks for p >= this (0: never) */
} dm_cuda_tuning;

/* dm_update's five numeric hyperparameters, in DEVICE memory so that they can change between
 * replays of a captured step (a float64 tensor of 5 elements has this layout). */
typedef struct dm_cuda_update_hyperparameters {
    double lr;           /* >= 0, finite */
    double weight_decay; /* >= 0, finite */
    double momentum;     /* in [0, 1] */
    double radius_l0;    /* ADAPTIVE: L0 >= 0, L1 >= 0, L0 + L1 > 0, both finite */
    double radius_l1;
} dm_cuda_update_hyperparameters;

/* Workspace bytes for dm_cuda_sharp (validates like dm_sharp_workspace_size). */
DM_API dm_status dm_cuda_sharp_workspace_size(const dm_sharp_config *config, dm_dtype dtype,
                                              int64_t batch, int64_t rows, int64_t cols,
                                              size_t *bytes);

/* dm_sharp on the device: the same arguments plus status, tuning (may be NULL) and stream. */
DM_API dm_status dm_cuda_sharp(const dm_sharp_config *config, dm_dtype dtype, int64_t batch,
                               int64_t rows, int64_t cols, const void *const *inputs, int64_t in_ld,
                               void *const *outputs, int64_t out_ld, double *duals, void *workspace,
                               size_t workspace_bytes, const dm_gemm_provider *gemm,
                               int32_t *status, const dm_cuda_tuning *tuning, void *stream);

/* Workspace bytes for dm_cuda_update (validates like dm_update_workspace_size). */
DM_API dm_status dm_cuda_update_workspace_size(const dm_update_config *config, dm_dtype dtype,
                                               int64_t batch, int64_t rows, int64_t cols,
                                               size_t *bytes);

/* dm_update on the device: the same arguments plus hyperparameters, status, tuning (may be NULL)
 * and stream. hyperparameters NULL: lr, weight_decay, momentum, radius_l0 and radius_l1 come
 * from config. Non-NULL: a DEVICE struct read when the kernels run, validated there
 * (DM_ERR_INVALID_ARG through the flag, nothing written); config's five values are then
 * unused but must still be valid (e.g. 0, 0, 0, 1, 0). */
DM_API dm_status dm_cuda_update(const dm_update_config *config, dm_dtype dtype, int64_t batch,
                                int64_t rows, int64_t cols, void *const *params,
                                const void *const *grads, void *const *momentum_buffers,
                                double *duals, void *workspace, size_t workspace_bytes,
                                const dm_gemm_provider *gemm,
                                const dm_cuda_update_hyperparameters *hyperparameters,
                                int32_t *status, const dm_cuda_tuning *tuning, void *stream);
/* ========================================= end of CUDA entry points ========================== */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DROPMUON_DROPMUON_H */
