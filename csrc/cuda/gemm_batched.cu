/* gemm_batched.cu - the batched product kernel of Newton-Schulz for small and medium matrices:
 * one launch computes one product for every matrix of a call (grid = output tiles x batch).
 *
 * Each 256-thread block owns a BM x BM output tile (BM = 64, or 32 when 64-tiles would leave
 * multiprocessors idle or the matrix is that small), walks K in steps of 16 through shared
 * memory, and each thread accumulates a (BM/16) x (BM/16) sub-tile in registers, rows
 * ty + 16 i and columns tx + 16 j (so that a warp's shared-memory reads are broadcasts or
 * consecutive words: no bank conflicts). The next K step is loaded into registers while the
 * current one is multiplied. Operands are widened on load (bfloat16 -> float32), so bfloat16
 * iterates get float32 accumulation as on the tensor-core path, and float64 stays float64.
 *
 * Symmetric products (X X^T, and A A^T = A A for the exactly symmetric A this kernel makes)
 * launch only the tiles on and above the diagonal; an off-diagonal tile writes its values at
 * (i, j) and (j, i). Every element is computed by one thread with one summation order, so the
 * result is exactly symmetric, which the next product relies on.
 *
 * Large matrices go through the provider instead (newton_schulz.cu): this kernel does not use
 * tensor cores, and it is meant for the sizes where launch count, not arithmetic, dominates.
 */
#include "common.cuh"

namespace {

template <typename T> struct dmi_cuda_accumulator {
    using type = float;
};
template <> struct dmi_cuda_accumulator<double> {
    using type = double;
};

template <typename Acc> struct dmi_cuda_gemm_params {
    int64_t batch, m, n, k;
    Acc alpha, beta;
    const void *a, *b, *c_in;
    void *c;
    int64_t lda, ldb, ldc, stride_a, stride_b, stride_c;
};

constexpr int DMI_GEMM_THREADS = 256;
constexpr int DMI_GEMM_BK = 16;

template <typename T, int BM, bool TRANS_B, bool SYMMETRIC>
__global__ void __launch_bounds__(DMI_GEMM_THREADS)
    dmi_cuda_gemm_kernel(const dmi_cuda_gemm_params<typename dmi_cuda_accumulator<T>::type> prm) {
    using Acc = typename dmi_cuda_accumulator<T>::type;
    constexpr int BN = BM, BK = DMI_GEMM_BK, TM = BM / 16, TN = BN / 16;
    constexpr int A_LOADS = BM * BK / DMI_GEMM_THREADS, B_LOADS = BN * BK / DMI_GEMM_THREADS;
    static_assert(A_LOADS * DMI_GEMM_THREADS == BM * BK, "A tile must split evenly");
    __shared__ Acc As[BK][BM + 4];
    __shared__ Acc Bs[BK][BN + 4];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

    /* The output tile: row-major over all tiles, or over the upper triangle. */
    int64_t bi, bj;
    if (SYMMETRIC) {
        const int64_t tiles = (prm.m + BM - 1) / BM;
        int64_t t = blockIdx.x;
        bi = 0;
        while (t >= tiles - bi) {
            t -= tiles - bi;
            ++bi;
        }
        bj = bi + t;
    } else {
        const int64_t tiles_n = (prm.n + BN - 1) / BN;
        bi = blockIdx.x / tiles_n;
        bj = blockIdx.x % tiles_n;
    }
    const int64_t m0 = bi * BM, n0 = bj * BN;

    for (int64_t batch = blockIdx.y; batch < prm.batch; batch += gridDim.y) {
        const T *A = (const T *)prm.a + batch * prm.stride_a;
        const T *B = (const T *)prm.b + batch * prm.stride_b;
        Acc acc[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = (Acc)0;

        /* Global -> registers: A row-major m x k read along k; B as n x k (TRANS_B, read along
         * k) or k x n (read along n); consecutive threads take consecutive addresses. */
        Acc ra[A_LOADS], rb[B_LOADS];
        auto load = [&](int64_t k0) {
#pragma unroll
            for (int r = 0; r < A_LOADS; ++r) {
                const int idx = tid + DMI_GEMM_THREADS * r, kk = idx % BK, ii = idx / BK;
                const int64_t row = m0 + ii, col = k0 + kk;
                ra[r] = row < prm.m && col < prm.k ? (Acc)dmi_cuda_value(A[row * prm.lda + col])
                                                   : (Acc)0;
            }
#pragma unroll
            for (int r = 0; r < B_LOADS; ++r) {
                const int idx = tid + DMI_GEMM_THREADS * r;
                if (TRANS_B) {
                    const int kk = idx % BK, jj = idx / BK;
                    const int64_t row = n0 + jj, col = k0 + kk;
                    rb[r] = row < prm.n && col < prm.k ? (Acc)dmi_cuda_value(B[row * prm.ldb + col])
                                                       : (Acc)0;
                } else {
                    const int jj = idx % BN, kk = idx / BN;
                    const int64_t row = k0 + kk, col = n0 + jj;
                    rb[r] = row < prm.k && col < prm.n ? (Acc)dmi_cuda_value(B[row * prm.ldb + col])
                                                       : (Acc)0;
                }
            }
        };
        /* Registers -> shared memory, both tiles stored k-major. */
        auto store = [&]() {
#pragma unroll
            for (int r = 0; r < A_LOADS; ++r) {
                const int idx = tid + DMI_GEMM_THREADS * r;
                As[idx % BK][idx / BK] = ra[r];
            }
#pragma unroll
            for (int r = 0; r < B_LOADS; ++r) {
                const int idx = tid + DMI_GEMM_THREADS * r;
                if (TRANS_B)
                    Bs[idx % BK][idx / BK] = rb[r];
                else
                    Bs[idx / BN][idx % BN] = rb[r];
            }
        };

        if (prm.k > 0) {
            load(0);
            store();
        }
        __syncthreads();
        for (int64_t k0 = 0; k0 < prm.k; k0 += BK) {
            const bool more = k0 + BK < prm.k;
            if (more) load(k0 + BK); /* in flight while this step multiplies */
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                Acc av[TM], bv[TN];
#pragma unroll
                for (int i = 0; i < TM; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < TN; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
            }
            __syncthreads(); /* every thread is done reading this step */
            if (more) {
                store();
                __syncthreads();
            }
        }

        const T *Cin = (const T *)prm.c_in + batch * prm.stride_c;
        T *C = (T *)prm.c + batch * prm.stride_c;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int64_t row = m0 + ty + 16 * i;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int64_t col = n0 + tx + 16 * j;
                if (row >= prm.m || col >= prm.n) continue;
                Acc v = prm.alpha * acc[i][j];
                /* c_in may be c: this thread reads the element before it writes it. */
                if (prm.beta != (Acc)0)
                    v += prm.beta * (Acc)dmi_cuda_value(Cin[row * prm.ldc + col]);
                const T out = dmi_cuda_to<T>(v);
                C[row * prm.ldc + col] = out;
                /* The mirror lies in a block below the diagonal: no launched tile reads or
                 * writes it, so this is its only write (and c_in there is never read). */
                if (SYMMETRIC && bi != bj) C[col * prm.ldc + row] = out;
            }
        }
    }
}

template <typename T, int BM, bool TRANS_B, bool SYMMETRIC>
dm_status dmi_cuda_gemm_launch(const dmi_cuda_gemm_args *args, cudaStream_t stream) {
    using Acc = typename dmi_cuda_accumulator<T>::type;
    dmi_cuda_gemm_params<Acc> prm;
    prm.batch = args->batch;
    prm.m = args->m;
    prm.n = args->n;
    prm.k = args->k;
    prm.alpha = (Acc)args->alpha;
    prm.beta = (Acc)args->beta;
    prm.a = args->a;
    prm.b = args->b;
    prm.c_in = args->beta != 0.0 ? args->c_in : args->c; /* never read then; never NULL */
    prm.c = args->c;
    prm.lda = args->lda;
    prm.ldb = args->ldb;
    prm.ldc = args->ldc;
    prm.stride_a = args->stride_a;
    prm.stride_b = args->stride_b;
    prm.stride_c = args->stride_c;
    const int64_t tiles_m = dmi_cuda_ceil_div(args->m, BM),
                  tiles_n = dmi_cuda_ceil_div(args->n, BM);
    const int64_t tiles = SYMMETRIC ? tiles_m * (tiles_m + 1) / 2 : tiles_m * tiles_n;
    if (tiles > (int64_t)INT32_MAX) return DM_ERR_SHAPE;
    const dim3 grid((unsigned)tiles, (unsigned)dmi_cuda_min64(args->batch, DMI_CUDA_MAX_GRID_Y), 1);
    dmi_cuda_gemm_kernel<T, BM, TRANS_B, SYMMETRIC><<<grid, DMI_GEMM_THREADS, 0, stream>>>(prm);
    DMI_CUDA_LAUNCHED();
    return DM_OK;
}

/* 64-tiles unless they would leave multiprocessors idle (or the product is that small). */
template <typename T, bool TRANS_B, bool SYMMETRIC>
dm_status dmi_cuda_gemm_pick_tile(const dmi_cuda_gemm_args *args, cudaStream_t stream) {
    const int64_t tm = dmi_cuda_ceil_div(args->m, 64), tn = dmi_cuda_ceil_div(args->n, 64);
    const int64_t tiles64 = (SYMMETRIC ? tm * (tm + 1) / 2 : tm * tn) * args->batch;
    const bool small = (args->m <= 32 && args->n <= 32) || tiles64 < dmi_cuda_multiprocessors();
    return small ? dmi_cuda_gemm_launch<T, 32, TRANS_B, SYMMETRIC>(args, stream)
                 : dmi_cuda_gemm_launch<T, 64, TRANS_B, SYMMETRIC>(args, stream);
}

template <typename T>
dm_status dmi_cuda_gemm_typed(const dmi_cuda_gemm_args *args, cudaStream_t s) {
    if (args->trans_b && args->symmetric) return dmi_cuda_gemm_pick_tile<T, true, true>(args, s);
    if (!args->trans_b && !args->symmetric)
        return dmi_cuda_gemm_pick_tile<T, false, false>(args, s);
    return DM_ERR_INVALID_ARG;
}

} // namespace

dm_status dmi_cuda_gemm_batched(dm_dtype dtype, const dmi_cuda_gemm_args *args,
                                cudaStream_t stream) {
    if (!args || args->batch < 0 || args->m < 0 || args->n < 0 || args->k < 0)
        return DM_ERR_INVALID_ARG;
    if (args->symmetric && args->m != args->n) return DM_ERR_INVALID_ARG;
    if (args->batch == 0 || args->m == 0 || args->n == 0) return DM_OK;
    if (!args->a || !args->b || !args->c || (args->beta != 0.0 && !args->c_in))
        return DM_ERR_INVALID_ARG;
    switch (dtype) {
    case DM_FLOAT32: return dmi_cuda_gemm_typed<float>(args, stream);
    case DM_FLOAT64: return dmi_cuda_gemm_typed<double>(args, stream);
    case DM_BFLOAT16: return dmi_cuda_gemm_typed<__nv_bfloat16>(args, stream);
    }
    return DM_ERR_DTYPE;
}
