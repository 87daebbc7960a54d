/* passes.cuh - the passes that read the user's matrices (reduce, finish, scale, duals), as
 * templates over an element source, and the two sources:
 *   dmi_cuda_input_source<S>      dm_cuda_sharp: element (i, j) of input b (leading dimension ld);
 *   dmi_cuda_direction_source<S>  dm_cuda_update: the direction D = nesterov ? lerp(G, M', mu) : M'
 *                                with M' = lerp(M, G, 1 - mu) rounded to storage (update.c).
 * A source gives elements in the user's layout (never transposed) and compute precision.
 * Kernels take sources as __grid_constant__ parameters: the pointer arrays stay in the
 * parameter bank instead of being copied per thread.
 */
#ifndef DROPMUON_CUDA_PASSES_CUH
#define DROPMUON_CUDA_PASSES_CUH

#include <type_traits>

#include "common.cuh"

template <typename S> struct dmi_cuda_input_source {
    using storage = S;
    using compute = typename dmi_cuda_storage<S>::compute;
    struct context {};
    const S *in[DM_CUDA_TENSORS_PER_LAUNCH];
    int64_t ld;

    /* The source of one chunk of a call's inputs. */
    static dmi_cuda_input_source chunk(const dmi_cuda_pass &pass, const void *const *inputs,
                                       int64_t ld) {
        dmi_cuda_input_source src;
        memset(&src, 0, sizeof src);
        for (int b = 0; b < pass.count; ++b) src.in[b] = (const S *)inputs[pass.first + b];
        src.ld = ld;
        return src;
    }

    __device__ context begin(const dmi_cuda_header *) const { return context{}; }
    __device__ compute load(const context &, int b, int64_t i, int64_t j) const {
        return dmi_cuda_value(in[b][i * ld + j]);
    }
};

template <typename S> struct dmi_cuda_direction_source {
    using storage = S;
    using compute = typename dmi_cuda_storage<S>::compute;
    struct context {
        compute w, mu; /* 1 - momentum and momentum, rounded to compute as update.c does */
    };
    const S *grad[DM_CUDA_TENSORS_PER_LAUNCH];
    const S *buf[DM_CUDA_TENSORS_PER_LAUNCH];
    int64_t cols; /* contiguous matrices */
    int nesterov;

    /* The source of one chunk of a call's gradients and momentum buffers. */
    static dmi_cuda_direction_source chunk(const dmi_cuda_pass &pass, const void *const *grads,
                                           void *const *momentum_buffers, int nesterov) {
        dmi_cuda_direction_source src;
        memset(&src, 0, sizeof src);
        for (int b = 0; b < pass.count; ++b) {
            src.grad[b] = (const S *)grads[pass.first + b];
            src.buf[b] = (const S *)momentum_buffers[pass.first + b];
        }
        src.cols = pass.cols;
        src.nesterov = nesterov;
        return src;
    }

    __device__ context begin(const dmi_cuda_header *header) const {
        const double mu = header->hyper.momentum;
        return context{(compute)(1.0 - mu), (compute)mu};
    }
    __device__ compute load(const context &c, int b, int64_t i, int64_t j) const {
        const int64_t k = i * cols + j;
        const compute g = dmi_cuda_value(grad[b][k]), old = dmi_cuda_value(buf[b][k]);
        const compute m = dmi_cuda_round<S>(dmi_cuda_lerp(old, g, c.w));
        return nesterov ? dmi_cuda_lerp(g, m, c.mu) : m;
    }
};

/* ---- reduce: per-tile partial sums and maxima ------------------------------------------------
 * Partial (g, part) of matrix gb sits at partials[(gb * groups + g) * parts + part]:
 *   MATRIX  groups 1,    part = tile index  (block reduction);
 *   ROW     groups rows, part = tile column (warp reduction of each of the thread's rows);
 *   COLUMN  groups cols, part = tile row    (each thread's 4 rows, then the 8 warps in order). */
template <class Src, int GROUP>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_reduce_kernel(const __grid_constant__ Src src, const dmi_cuda_pass pass,
                           const dmi_cuda_header *header, int mode, dmi_cuda_partial *partials) {
    using CT = typename Src::compute;
    const typename Src::context ctx = src.begin(header);
    const int tx = threadIdx.x, ty = threadIdx.y, b = blockIdx.y;
    const int64_t gb = pass.first + b, t = blockIdx.x;
    const int64_t tr = t / pass.tiles_c, tc = t % pass.tiles_c;
    const int64_t r0 = tr * DMI_CUDA_TILE, j = tc * DMI_CUDA_TILE + tx;
    double sum[DMI_CUDA_TILE_STEPS], max[DMI_CUDA_TILE_STEPS];
#pragma unroll
    for (int s = 0; s < DMI_CUDA_TILE_STEPS; ++s) {
        const int64_t i = r0 + ty + DMI_CUDA_TILE_ROWS * s;
        sum[s] = 0.0;
        max[s] = 0.0;
        if (i < pass.rows && j < pass.cols) {
            const CT v = src.load(ctx, b, i, j);
            const double x = mode == DMI_CUDA_SQUARES_BF16 ? (double)dmi_cuda_bf16_round(v) : v;
            sum[s] = mode == DMI_CUDA_ABS ? fabs(x) : x * x; /* exact for float32 data */
            max[s] = fabs(x);
        }
    }
    if constexpr (GROUP == DMI_CUDA_GROUP_ROW) {
        /* A warp is one ty: its 32 lanes hold 32 columns of the same 4 rows. */
#pragma unroll
        for (int s = 0; s < DMI_CUDA_TILE_STEPS; ++s) {
            const int64_t i = r0 + ty + DMI_CUDA_TILE_ROWS * s;
            const double row_sum = dmi_cuda_warp_sum(sum[s]), row_max = dmi_cuda_warp_max(max[s]);
            if (tx == 0 && i < pass.rows)
                partials[(gb * pass.rows + i) * pass.tiles_c + tc] = {row_sum, row_max};
        }
    } else {
        double total = 0.0, total_max = 0.0;
#pragma unroll
        for (int s = 0; s < DMI_CUDA_TILE_STEPS; ++s) {
            total += sum[s];
            total_max = fmax(total_max, max[s]);
        }
        if constexpr (GROUP == DMI_CUDA_GROUP_COLUMN) {
            __shared__ dmi_cuda_partial column[DMI_CUDA_TILE_ROWS][DMI_CUDA_TILE];
            column[ty][tx] = {total, total_max};
            __syncthreads();
            if (ty == 0 && j < pass.cols) {
                dmi_cuda_partial acc = {0.0, 0.0};
                for (int y = 0; y < DMI_CUDA_TILE_ROWS; ++y) {
                    acc.sum += column[y][tx].sum;
                    acc.max = fmax(acc.max, column[y][tx].max);
                }
                partials[(gb * pass.cols + j) * pass.tiles_r + tr] = acc;
            }
        } else {
            const dmi_cuda_partial block = dmi_cuda_block_reduce(total, total_max);
            if (tx == 0 && ty == 0) partials[gb * pass.tiles_r * pass.tiles_c + t] = block;
        }
    }
}

/* sum (x / max)^2 over a group's elements, by a whole warp (all lanes get the result): the
 * float64 rescue of finish_norm in sharp.c, for sums of squares that overflow or underflow. */
template <class Src, int GROUP>
__device__ double dmi_cuda_rescaled_sum(const Src &src, const typename Src::context &ctx,
                                        const dmi_cuda_pass &pass, int b, int64_t g, double max,
                                        int lane) {
    const int64_t n = GROUP == DMI_CUDA_GROUP_MATRIX ? pass.rows * pass.cols
                      : GROUP == DMI_CUDA_GROUP_ROW  ? pass.cols
                                                     : pass.rows;
    double acc = 0.0;
    for (int64_t k = lane; k < n; k += 32) {
        const int64_t i = GROUP == DMI_CUDA_GROUP_MATRIX ? k / pass.cols
                          : GROUP == DMI_CUDA_GROUP_ROW  ? g
                                                         : k;
        const int64_t j = GROUP == DMI_CUDA_GROUP_MATRIX ? k % pass.cols
                          : GROUP == DMI_CUDA_GROUP_ROW  ? k
                                                         : g;
        const double v = (double)src.load(ctx, b, i, j) / max;
        acc += v * v;
    }
    return dmi_cuda_warp_sum(acc);
}

/* ---- finish: a warp per group turns its partials into a divisor -------------------------------
 * scale[gb * groups + g]: the inverse divisor (SQUARES), or torch's bfloat16 divisor d
 * (SQUARES_BF16); unused for SIGN. duals: MATRIX groups write the matrix's dual (FROBENIUS,
 * SIGN) to duals[gb]; ROW/COLUMN groups their share to duals[gb * groups + g]; SPECTRAL's dual
 * comes from the iterates later. NaN/Inf (or, with bfloat16 iterates, squares that overflow
 * float32 as torch's norm would) raise DMI_CUDA_FLAG_NONFINITE. */
template <class Src, int GROUP>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_finish_kernel(const __grid_constant__ Src src, const dmi_cuda_pass pass,
                           dmi_cuda_header *header, const dmi_cuda_norm_params np, int64_t groups,
                           int64_t parts, const dmi_cuda_partial *partials, double *scale,
                           double *duals) {
    const int lane = threadIdx.x & 31;
    const int64_t w = ((int64_t)blockIdx.x * DMI_CUDA_BLOCK + threadIdx.x) >> 5;
    if (w >= (int64_t)pass.count * groups) return; /* the whole warp leaves together */
    const int b = (int)(w / groups);
    const int64_t g = w % groups, gb = pass.first + b, slot = gb * groups + g;
    const dmi_cuda_partial *part = partials + slot * parts;
    double sum = 0.0, max = 0.0;
    for (int64_t k = lane; k < parts; k += 32) {
        sum += part[k].sum;
        max = fmax(max, part[k].max);
    }
    sum = dmi_cuda_warp_sum(sum);
    max = dmi_cuda_warp_max(max);
    /* Squares and absolute values are >= 0, so a NaN sum means a NaN element and an infinite
     * max an infinite one; fmax skips NaN, the sum does not. */
    const bool nonfinite = isnan(sum) || !isfinite(max) ||
                           (np.mode == DMI_CUDA_SQUARES_BF16 && !(sum <= (double)FLT_MAX));
    if (nonfinite && lane == 0) atomicOr(&header->flags, (unsigned)DMI_CUDA_FLAG_NONFINITE);

    if (np.mode == DMI_CUDA_ABS) { /* SIGN: <M, sign(M)> = sum |M| (may be +Inf: kept) */
        if (lane == 0) duals[gb] = sum;
        return;
    }
    if (np.mode == DMI_CUDA_SQUARES_BF16) { /* sharp.c's normalise_like_torch_bf16 */
        if (lane == 0) {
            const double norm = (double)dmi_cuda_bf16_round((float)sqrt(sum));
            double divisor = __dadd_rn(__dmul_rn(np.norm_scale, norm), np.norm_offset);
            if (divisor < np.eps) divisor = np.eps;
            scale[slot] = (double)dmi_cuda_bf16_round((float)divisor);
        }
        return;
    }
    /* sharp.c's finish_norm: the direct root when the sum is safe, else rescaled by the max. */
    double norm;
    if (isfinite(sum) && (sum >= DMI_CUDA_SUMSQ_SAFE_MIN || (sum == 0.0 && !np.float64))) {
        norm = sqrt(sum);
    } else if (nonfinite || max == 0.0) {
        norm = 0.0;
    } else {
        const typename Src::context ctx = src.begin(header);
        norm = __dmul_rn(max,
                         sqrt(dmi_cuda_rescaled_sum<Src, GROUP>(src, ctx, pass, b, g, max, lane)));
    }
    if (lane != 0) return;
    const double inverse = dmi_cuda_inverse_divisor(norm, np.norm_scale, np.norm_offset, np.eps);
    scale[slot] = inverse;
    if (!np.spectral) duals[slot] = __dmul_rn(norm, __dmul_rn(norm, inverse));
}

/* ---- scale: X0 = M / d into the Newton-Schulz scratch (SPECTRAL) ------------------------------
 * Native iterates: X0 = IT(double(M) * inverse) (dmi_convert with a scale). bfloat16 iterates:
 * X0 = bf16(float(bf16(M)) / d), or 0 when d == 0 (torch's rounding, dmi_bf16_divide). The panel
 * of matrix gb is p x q = rows x cols, or cols x rows when transposed (staged through shared
 * memory so that both the reads and the writes are coalesced). */
template <class Src, typename IT>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_scale_kernel(const __grid_constant__ Src src, const dmi_cuda_pass pass,
                          const dmi_cuda_header *header, int bf16_iterates, const double *scale,
                          IT *panel) {
    __shared__ IT tile[DMI_CUDA_TILE][DMI_CUDA_TILE + 1];
    const typename Src::context ctx = src.begin(header);
    const int tx = threadIdx.x, ty = threadIdx.y, b = blockIdx.y;
    const int64_t gb = pass.first + b, t = blockIdx.x;
    const int64_t r0 = (t / pass.tiles_c) * DMI_CUDA_TILE, c0 = (t % pass.tiles_c) * DMI_CUDA_TILE;
    const double s = scale[gb];
    const float d = (float)s;
    IT *x = panel + gb * pass.rows * pass.cols;
#pragma unroll
    for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
        const int64_t i = r0 + ty + DMI_CUDA_TILE_ROWS * k, j = c0 + tx;
        IT v = dmi_cuda_to<IT>(0.0f);
        if (i < pass.rows && j < pass.cols) {
            const auto m = src.load(ctx, b, i, j);
            if (bf16_iterates)
                v = d > 0.0f ? dmi_cuda_to<IT>(__fdiv_rn(dmi_cuda_bf16_round(m), d)) : v;
            else
                v = dmi_cuda_to<IT>(__dmul_rn((double)m, s));
            if (!pass.transposed) x[i * pass.cols + j] = v;
        }
        if (pass.transposed) tile[ty + DMI_CUDA_TILE_ROWS * k][tx] = v;
    }
    if (!pass.transposed) return;
    __syncthreads();
    /* tile[a][c] holds M(r0 + a, c0 + c); the panel row is the user's column. */
#pragma unroll
    for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
        const int64_t j = c0 + ty + DMI_CUDA_TILE_ROWS * k, i = r0 + tx;
        if (i < pass.rows && j < pass.cols)
            x[j * pass.rows + i] = tile[tx][ty + DMI_CUDA_TILE_ROWS * k];
    }
}

/* Loads the panel's 32x32 tile that matches the user tile at (r0, c0) of a transposed panel
 * into tile[c][a] = O(r0 + a, c0 + c), coalesced; all threads of the block must call it. */
template <typename IT>
__device__ __forceinline__ void
dmi_cuda_load_transposed_tile(IT (*tile)[DMI_CUDA_TILE + 1], const IT *x, const dmi_cuda_pass &pass,
                              int64_t r0, int64_t c0) {
    const int tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
    for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
        const int64_t j = c0 + ty + DMI_CUDA_TILE_ROWS * k, i = r0 + tx;
        if (i < pass.rows && j < pass.cols)
            tile[ty + DMI_CUDA_TILE_ROWS * k][tx] = x[j * pass.rows + i];
    }
    __syncthreads();
}

/* Element (i, j) of the user's layout from the panel x (through the staged tile if
 * transposed), in its own precision widened to float or double. */
template <typename IT>
__device__ __forceinline__ auto dmi_cuda_panel_value(const IT (*tile)[DMI_CUDA_TILE + 1],
                                                     const IT *x, const dmi_cuda_pass &pass,
                                                     int64_t i, int64_t j, int64_t r0, int64_t c0) {
    return dmi_cuda_value(pass.transposed ? tile[j - c0][i - r0] : x[i * pass.cols + j]);
}

/* ---- output: the passes that write user memory (sharp.cu's store, update.cu's final) ---------
 * Both write sharp(M) of one kind per launch: KIND is the norm, as a template argument. */
enum { DMI_KIND_SPECTRAL = 0, DMI_KIND_SIGN, DMI_KIND_COLUMN, DMI_KIND_ROW, DMI_KIND_FROBENIUS };

/* Where a block of an output pass stands: matrix gb's 32x32 tile at (r0, c0), and for SPECTRAL
 * that matrix's final iterate x (with the tile of a transposed panel staged in `tile`). */
template <typename IT> struct dmi_cuda_out_tile {
    bool write; /* false: nothing may be written (the block returns) */
    bool lead;  /* thread (0, 0) of the matrix's first tile: copies the dual */
    int64_t gb, r0, c0;
    const IT *x;
    const IT (*tile)[DMI_CUDA_TILE + 1];

    /* body(i, j) for each of this thread's elements of the tile that lie inside the matrix. */
    template <class Body>
    __device__ __forceinline__ void for_each(const dmi_cuda_pass &pass, Body body) const {
#pragma unroll
        for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
            const int64_t i = r0 + threadIdx.y + DMI_CUDA_TILE_ROWS * k, j = c0 + threadIdx.x;
            if (i < pass.rows && j < pass.cols) body(i, j);
        }
    }

    /* sharp(M)(i, j) in compute type CT: the final iterate's element (SPECTRAL), or M's element
     * m() (called only then) as sign(m), or m times the row's, column's or matrix's inverse
     * divisor in double, as sharp.c's DEFINE_APPLY. */
    template <int KIND, typename CT, class M>
    __device__ __forceinline__ CT sharp(const dmi_cuda_pass &pass, const double *scale, int64_t i,
                                        int64_t j, M m) const {
        if constexpr (KIND == DMI_KIND_SPECTRAL) {
            return (CT)dmi_cuda_panel_value(tile, x, pass, i, j, r0, c0);
        } else if constexpr (KIND == DMI_KIND_SIGN) {
            const CT v = m();
            return (CT)((v > (CT)0) - (v < (CT)0));
        } else {
            const double s = KIND == DMI_KIND_ROW      ? scale[gb * pass.rows + i]
                             : KIND == DMI_KIND_COLUMN ? scale[gb * pass.cols + j]
                                                       : scale[gb];
            return (CT)__dmul_rn((double)m(), s);
        }
    }
};

/* The start of an output pass: write is false when an earlier pass raised a flag (the call's
 * first thread reports it into *status) or the caller's *status is nonzero on entry. All threads
 * of the block must call it: it may stage the tile of a transposed panel. */
template <typename IT, int KIND>
__device__ __forceinline__ dmi_cuda_out_tile<IT>
dmi_cuda_out_begin(IT (*tile)[DMI_CUDA_TILE + 1], const dmi_cuda_pass &pass,
                   const dmi_cuda_header *header, const IT *panel, int32_t *status) {
    dmi_cuda_out_tile<IT> t;
    const int b = blockIdx.y;
    t.write = false;
    t.lead = threadIdx.x == 0 && threadIdx.y == 0 && blockIdx.x == 0;
    t.tile = tile;
    const unsigned flags = header->flags;
    if (flags != 0u) {
        if (status && t.lead && b == 0) atomicCAS(status, 0, dmi_cuda_flag_status(flags));
        return t;
    }
    if (status && *status != 0) return t;
    t.write = true;
    t.gb = pass.first + b;
    t.r0 = (blockIdx.x / pass.tiles_c) * DMI_CUDA_TILE;
    t.c0 = (blockIdx.x % pass.tiles_c) * DMI_CUDA_TILE;
    t.x = KIND == DMI_KIND_SPECTRAL ? panel + t.gb * pass.rows * pass.cols : panel;
    if (KIND == DMI_KIND_SPECTRAL && pass.transposed)
        dmi_cuda_load_transposed_tile(tile, t.x, pass, t.r0, t.c0);
    return t;
}

/* ---- duals: <M, O> per tile (SPECTRAL), summed per matrix by dmi_cuda_launch_sum_parts --------
 */
template <class Src, typename IT>
__global__ void __launch_bounds__(DMI_CUDA_BLOCK)
    dmi_cuda_dual_kernel(const __grid_constant__ Src src, const dmi_cuda_pass pass,
                         const dmi_cuda_header *header, const IT *panel, double *parts) {
    __shared__ IT tile[DMI_CUDA_TILE][DMI_CUDA_TILE + 1];
    const typename Src::context ctx = src.begin(header);
    const int tx = threadIdx.x, ty = threadIdx.y, b = blockIdx.y;
    const int64_t gb = pass.first + b, t = blockIdx.x;
    const int64_t r0 = (t / pass.tiles_c) * DMI_CUDA_TILE, c0 = (t % pass.tiles_c) * DMI_CUDA_TILE;
    const IT *x = panel + gb * pass.rows * pass.cols;
    if (pass.transposed) dmi_cuda_load_transposed_tile(tile, x, pass, r0, c0);
    double acc = 0.0;
#pragma unroll
    for (int k = 0; k < DMI_CUDA_TILE_STEPS; ++k) {
        const int64_t i = r0 + ty + DMI_CUDA_TILE_ROWS * k, j = c0 + tx;
        if (i < pass.rows && j < pass.cols)
            acc += (double)src.load(ctx, b, i, j) *
                   (double)dmi_cuda_panel_value(tile, x, pass, i, j, r0, c0);
    }
    const dmi_cuda_partial block = dmi_cuda_block_reduce(acc, 0.0);
    if (tx == 0 && ty == 0) parts[gb * pass.tiles_r * pass.tiles_c + t] = block.sum;
}

/* ---- host side: the passes over every chunk of a call ------------------------------------ */

/* Grid of a tile pass over one chunk. */
static inline dim3 dmi_cuda_tile_grid(const dmi_cuda_pass &pass) {
    return dim3((unsigned)(pass.tiles_r * pass.tiles_c), (unsigned)pass.count, 1);
}
static inline dim3 dmi_cuda_tile_block() { return dim3(DMI_CUDA_TILE, DMI_CUDA_TILE_ROWS, 1); }

/* launch(pass) for every chunk of a call, in order, each launch checked. */
template <class Launch> dm_status dmi_cuda_for_chunks(const dmi_cuda_layout &L, Launch launch) {
    const int64_t chunks = dmi_cuda_chunks(L.batch);
    for (int64_t c = 0; c < chunks; ++c) {
        launch(dmi_cuda_chunk(&L, c));
        DMI_CUDA_LAUNCHED();
    }
    return DM_OK;
}

/* Launches reduce then finish over every chunk; make_source(chunk) builds the chunk's source. */
template <class Src, class MakeSource>
dm_status dmi_cuda_run_norms(const dmi_cuda_layout &L, const dmi_cuda_norm_params &np,
                             unsigned char *ws, MakeSource make_source, cudaStream_t stream) {
    dmi_cuda_header *header = (dmi_cuda_header *)(ws + L.header);
    dmi_cuda_partial *partials = (dmi_cuda_partial *)(ws + L.partials);
    double *scale = (double *)(ws + L.scale);
    double *duals = (double *)(ws + (L.group == DMI_CUDA_GROUP_MATRIX ? L.duals : L.group_duals));
    DMI_RETURN_IF_ERROR(dmi_cuda_for_chunks(L, [&](const dmi_cuda_pass &pass) {
        const Src src = make_source(pass);
        switch (L.group) {
        case DMI_CUDA_GROUP_ROW:
            dmi_cuda_reduce_kernel<Src, DMI_CUDA_GROUP_ROW>
                <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(src, pass, header,
                                                                                 np.mode, partials);
            break;
        case DMI_CUDA_GROUP_COLUMN:
            dmi_cuda_reduce_kernel<Src, DMI_CUDA_GROUP_COLUMN>
                <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(src, pass, header,
                                                                                 np.mode, partials);
            break;
        default:
            dmi_cuda_reduce_kernel<Src, DMI_CUDA_GROUP_MATRIX>
                <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(src, pass, header,
                                                                                 np.mode, partials);
            break;
        }
    }));
    DMI_RETURN_IF_ERROR(dmi_cuda_for_chunks(L, [&](const dmi_cuda_pass &pass) {
        const Src src = make_source(pass);
        const unsigned blocks = (unsigned)dmi_cuda_ceil_div(pass.count * L.groups, DMI_CUDA_WARPS);
        switch (L.group) {
        case DMI_CUDA_GROUP_ROW:
            dmi_cuda_finish_kernel<Src, DMI_CUDA_GROUP_ROW><<<blocks, DMI_CUDA_BLOCK, 0, stream>>>(
                src, pass, header, np, L.groups, L.parts, partials, scale, duals);
            break;
        case DMI_CUDA_GROUP_COLUMN:
            dmi_cuda_finish_kernel<Src, DMI_CUDA_GROUP_COLUMN>
                <<<blocks, DMI_CUDA_BLOCK, 0, stream>>>(src, pass, header, np, L.groups, L.parts,
                                                        partials, scale, duals);
            break;
        default:
            dmi_cuda_finish_kernel<Src, DMI_CUDA_GROUP_MATRIX>
                <<<blocks, DMI_CUDA_BLOCK, 0, stream>>>(src, pass, header, np, L.groups, L.parts,
                                                        partials, scale, duals);
            break;
        }
    }));
    /* ROW/COLUMN: the matrices' duals are the sums of their groups' shares. */
    if (L.group != DMI_CUDA_GROUP_MATRIX)
        DMI_RETURN_IF_ERROR(dmi_cuda_launch_sum_parts((const double *)(ws + L.group_duals),
                                                      L.groups, L.batch, (double *)(ws + L.duals),
                                                      stream));
    return DM_OK;
}

/* SPECTRAL: scale into the scratch, iterate, and (want_duals) the duals. *result: the final
 * iterate, in IT. */
template <class Src, typename IT, class MakeSource>
dm_status dmi_cuda_run_spectral(const dm_sharp_config *config, const dmi_cuda_layout &L,
                                unsigned char *ws, MakeSource make_source, int want_duals,
                                const dm_gemm_provider *gemm, const dm_cuda_tuning *tuning,
                                const IT **result, cudaStream_t stream) {
    const dmi_cuda_header *header = (const dmi_cuda_header *)(ws + L.header);
    const double *scale = (const double *)(ws + L.scale);
    IT *x0 = (IT *)(ws + L.scratch);
    DMI_RETURN_IF_ERROR(dmi_cuda_for_chunks(L, [&](const dmi_cuda_pass &pass) {
        dmi_cuda_scale_kernel<Src, IT>
            <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(
                make_source(pass), pass, header, L.iteration == DM_BFLOAT16, scale, x0);
    }));
    void *final_iterate = NULL;
    DMI_RETURN_IF_ERROR(dmi_cuda_ns_iterate(config, L.iteration, L.batch, L.p, L.q, ws + L.scratch,
                                            &final_iterate, gemm, tuning, stream));
    *result = (const IT *)final_iterate;
    if (!want_duals) return DM_OK;
    double *parts = (double *)(ws + L.dual_parts);
    DMI_RETURN_IF_ERROR(dmi_cuda_for_chunks(L, [&](const dmi_cuda_pass &pass) {
        dmi_cuda_dual_kernel<Src, IT>
            <<<dmi_cuda_tile_grid(pass), dmi_cuda_tile_block(), 0, stream>>>(
                make_source(pass), pass, header, *result, parts);
    }));
    return dmi_cuda_launch_sum_parts(parts, L.tiles, L.batch, (double *)(ws + L.duals), stream);
}

/* Every tile grid fits CUDA's limits (x < 2^31, y <= 64). */
static inline dm_status dmi_cuda_check_grid(const dmi_cuda_layout &L) {
    return L.tiles > (int64_t)INT32_MAX || L.batch * L.groups / DMI_CUDA_WARPS > (int64_t)INT32_MAX
               ? DM_ERR_SHAPE
               : DM_OK;
}

/* SPECTRAL: the spectral passes in the iteration dtype, then write(kind, iterate); the other
 * norms: write(kind, (const S *)NULL). `kind` is a dmi_cuda_kind<KIND> and write launches the
 * output pass of that kind (sharp.cu's store, update.cu's final). */
template <int KIND> using dmi_cuda_kind = std::integral_constant<int, KIND>;

template <typename S, class Src, class MakeSource, class Write>
dm_status dmi_cuda_run_sharp(const dm_sharp_config *config, const dmi_cuda_layout &L,
                             unsigned char *ws, MakeSource make_source, int want_duals,
                             const dm_gemm_provider *gemm, const dm_cuda_tuning *tuning,
                             cudaStream_t stream, Write write) {
    auto spectral = [&](auto iterate) { /* iterate: a null pointer of the iteration type */
                                        DMI_RETURN_IF_ERROR(dmi_cuda_run_spectral<Src>(
                                            config, L, ws, make_source, want_duals, gemm, tuning,
                                            &iterate, stream));
                                        return write(dmi_cuda_kind<DMI_KIND_SPECTRAL>{}, iterate);
    };
    const S *none = NULL;
    switch (config->norm) {
    case DM_NORM_SPECTRAL:
        /* native iterates: the compute type (float, or double for float64 data) */
        return L.iteration == DM_BFLOAT16
                   ? spectral((const __nv_bfloat16 *)NULL)
                   : spectral((const typename dmi_cuda_storage<S>::compute *)NULL);
    case DM_NORM_SIGN: return write(dmi_cuda_kind<DMI_KIND_SIGN>{}, none);
    case DM_NORM_COLUMN: return write(dmi_cuda_kind<DMI_KIND_COLUMN>{}, none);
    case DM_NORM_ROW: return write(dmi_cuda_kind<DMI_KIND_ROW>{}, none);
    case DM_NORM_FROBENIUS: return write(dmi_cuda_kind<DMI_KIND_FROBENIUS>{}, none);
    }
    return DM_ERR_INVALID_ARG;
}

/* DM_ERR_WORKSPACE unless the workspace holds `needed` bytes from a DMI_CUDA_ALIGN boundary. */
static inline dm_status dmi_cuda_check_workspace(size_t needed, const void *workspace,
                                                 size_t workspace_bytes) {
    return needed > 0 && (!workspace || workspace_bytes < needed ||
                          (uintptr_t)workspace % DMI_CUDA_ALIGN != 0)
               ? DM_ERR_WORKSPACE
               : DM_OK;
}

template <typename S> struct dmi_cuda_type {
    using type = S;
};

/* What dm_cuda_sharp and dm_cuda_update do once their arguments are checked: a synchronous call
 * (no status) refuses a capturing stream; an empty batch does nothing and empty matrices have
 * dual 0; otherwise the call's layout, then run(dmi_cuda_type<S>, layout, workspace, tuning) for
 * the storage type S of dtype, and a synchronous call waits for the device's verdict. */
template <class Run>
dm_status dmi_cuda_call(const dm_sharp_config *config, dm_dtype dtype, int64_t batch, int64_t rows,
                        int64_t cols, double *duals, void *workspace, int32_t *status,
                        const dm_cuda_tuning *tuning, cudaStream_t stream, Run run) {
    const dm_cuda_tuning defaults = {DM_CUDA_BATCHED_MAX_P, DM_CUDA_SYMMETRIC_MIN_P};
    if (!status) DMI_RETURN_IF_ERROR(dmi_cuda_require_not_capturing(stream));
    if (batch == 0) return DM_OK;
    if (rows == 0 || cols == 0) {
        if (duals) DMI_CUDA_TRY(cudaMemsetAsync(duals, 0, (size_t)batch * sizeof(double), stream));
        return DM_OK;
    }

    dmi_cuda_layout L;
    DMI_RETURN_IF_ERROR(dmi_cuda_plan(config, dtype, batch, rows, cols, &L));
    DMI_RETURN_IF_ERROR(dmi_cuda_check_grid(L));
    unsigned char *ws = (unsigned char *)workspace;
    const dm_cuda_tuning *t = tuning ? tuning : &defaults;
    dm_status st = DM_ERR_DTYPE;
    switch (dtype) {
    case DM_FLOAT32: st = run(dmi_cuda_type<float>{}, L, ws, t); break;
    case DM_FLOAT64: st = run(dmi_cuda_type<double>{}, L, ws, t); break;
    case DM_BFLOAT16: st = run(dmi_cuda_type<__nv_bfloat16>{}, L, ws, t); break;
    }
    if (st != DM_OK || status) return st;
    return dmi_cuda_wait_for_status((const dmi_cuda_header *)(ws + L.header), stream);
}

#endif /* DROPMUON_CUDA_PASSES_CUH */
