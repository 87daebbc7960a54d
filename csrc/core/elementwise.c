/* elementwise.c - the typed O(mn) passes around the products: conversions between storage and
 * compute types (plain and transposing), dot products and sums of squares.
 *
 * Each is instantiated per dtype pair so that the inner loops are straight typed code the
 * compiler vectorises; arithmetic runs in float32 unless a float64 operand is involved. */
#include "internal.h"

/* out = sum over k < n of TERM(k), in double, over eight lanes: a single accumulator would
 * serialise on the add latency (FP adds may not be reordered without -ffast-math); lanes in an
 * array vectorise, and the order of additions is the same for every compiled version. */
#define DMI_REDUCE(n, TERM, out)                                                                   \
    do {                                                                                           \
        double lane_[8] = {0, 0, 0, 0, 0, 0, 0, 0}, tail_ = 0;                                     \
        size_t k_ = 0;                                                                             \
        for (; k_ + 8 <= (n); k_ += 8)                                                             \
            for (size_t l_ = 0; l_ < 8; ++l_) lane_[l_] += TERM(k_ + l_);                          \
        for (; k_ < (n); ++k_) tail_ += TERM(k_);                                                  \
        (out) = ((lane_[0] + lane_[1]) + (lane_[2] + lane_[3])) +                                  \
                ((lane_[4] + lane_[5]) + (lane_[6] + lane_[7])) + tail_;                           \
    } while (0)

/* Scaled copies multiply in double: the scale (an inverse norm) need not fit a float, and the
 * result is then rounded once. Unscaled copies stay in CT. */
#define DEFINE_CONVERT(S, D, CT)                                                                   \
    DMI_VECTORIZE static void convert_##S##_##D(const void *src, void *dst, size_t n,              \
                                                double scale) {                                    \
        if (scale == 1.0) {                                                                        \
            for (size_t k = 0; k < n; ++k) STORE_##D(dst, k, (CT)LOAD_##S(src, k));                \
            return;                                                                                \
        }                                                                                          \
        for (size_t k = 0; k < n; ++k) STORE_##D(dst, k, (double)LOAD_##S(src, k) * scale);        \
    }                                                                                              \
    DMI_VECTORIZE static void transpose_##S##_##D(const void *src, int64_t src_ld, void *dst,      \
                                                  int64_t dst_ld, int64_t rows, int64_t cols,      \
                                                  double scale) {                                  \
        DMI_FOR_TILED(rows, cols, i, j) {                                                          \
            STORE_##D(dst, j * dst_ld + i, (double)LOAD_##S(src, i * src_ld + j) * scale);         \
        }                                                                                          \
    }                                                                                              \
    DMI_VECTORIZE static double dot_##S##_##D(const void *x, const void *y, size_t n) {            \
        double acc;                                                                                \
        DMI_REDUCE(n, DOT_TERM_##S##_##D, acc);                                                    \
        return acc;                                                                                \
    }

#define DOT_TERM(S, D, k) ((double)LOAD_##S(x, k) * (double)LOAD_##D(y, k))
#define DOT_TERM_f32_f32(k) DOT_TERM(f32, f32, k)
#define DOT_TERM_f32_f64(k) DOT_TERM(f32, f64, k)
#define DOT_TERM_f32_bf16(k) DOT_TERM(f32, bf16, k)
#define DOT_TERM_f64_f32(k) DOT_TERM(f64, f32, k)
#define DOT_TERM_f64_f64(k) DOT_TERM(f64, f64, k)
#define DOT_TERM_f64_bf16(k) DOT_TERM(f64, bf16, k)
#define DOT_TERM_bf16_f32(k) DOT_TERM(bf16, f32, k)
#define DOT_TERM_bf16_f64(k) DOT_TERM(bf16, f64, k)
#define DOT_TERM_bf16_bf16(k) DOT_TERM(bf16, bf16, k)

DEFINE_CONVERT(f32, f32, float)
DEFINE_CONVERT(f32, f64, double)
DEFINE_CONVERT(f32, bf16, float)
DEFINE_CONVERT(f64, f32, double)
DEFINE_CONVERT(f64, f64, double)
DEFINE_CONVERT(f64, bf16, double)
DEFINE_CONVERT(bf16, f32, float)
DEFINE_CONVERT(bf16, f64, double)
DEFINE_CONVERT(bf16, bf16, float)

/* Calls the instantiation of FN (convert, transpose or dot) for the (SRC, DST) dtypes, as
 * `ASSIGN FN_src_dst ARGS;` (ASSIGN is empty or `result =`). */
#define DISPATCH_PAIR(FN, SRC, DST, ARGS, ASSIGN)                                                  \
    switch ((SRC) * 3 + (DST)) {                                                                   \
    case DM_FLOAT32 * 3 + DM_FLOAT32: ASSIGN FN##_f32_f32 ARGS; break;                             \
    case DM_FLOAT32 * 3 + DM_FLOAT64: ASSIGN FN##_f32_f64 ARGS; break;                             \
    case DM_FLOAT32 * 3 + DM_BFLOAT16: ASSIGN FN##_f32_bf16 ARGS; break;                           \
    case DM_FLOAT64 * 3 + DM_FLOAT32: ASSIGN FN##_f64_f32 ARGS; break;                             \
    case DM_FLOAT64 * 3 + DM_FLOAT64: ASSIGN FN##_f64_f64 ARGS; break;                             \
    case DM_FLOAT64 * 3 + DM_BFLOAT16: ASSIGN FN##_f64_bf16 ARGS; break;                           \
    case DM_BFLOAT16 * 3 + DM_FLOAT32: ASSIGN FN##_bf16_f32 ARGS; break;                           \
    case DM_BFLOAT16 * 3 + DM_FLOAT64: ASSIGN FN##_bf16_f64 ARGS; break;                           \
    case DM_BFLOAT16 * 3 + DM_BFLOAT16: ASSIGN FN##_bf16_bf16 ARGS; break;                         \
    }

/* The public passes below cut their range for the provider's threads; the typed functions
 * above do each piece. */
typedef struct pair_job {
    const void *x;
    dm_dtype x_dtype;
    const void *y; /* dmi_dot's second operand */
    dm_dtype y_dtype;
    void *dst;
    dm_dtype dst_dtype;
    int64_t x_ld, dst_ld, cols; /* dmi_convert_transposed */
    double scale;
} pair_job;

static inline const void *element_at(const void *base, dm_dtype dtype, int64_t k) {
    return (const unsigned char *)base + (size_t)k * dmi_dtype_size(dtype);
}

static void convert_range(void *arg, int64_t begin, int64_t end) {
    const pair_job *job = arg;
    DISPATCH_PAIR(convert, job->x_dtype, job->dst_dtype,
                  (element_at(job->x, job->x_dtype, begin),
                   (void *)element_at(job->dst, job->dst_dtype, begin), (size_t)(end - begin),
                   job->scale), )
}

void dmi_convert(const dm_gemm_provider *threads, const void *src, dm_dtype src_dtype, void *dst,
                 dm_dtype dst_dtype, size_t n, double scale) {
    const pair_job job = {
        .x = src, .x_dtype = src_dtype, .dst = dst, .dst_dtype = dst_dtype, .scale = scale};
    dmi_parallel_for(threads, (int64_t)n, DMI_PARALLEL_GRAIN, convert_range, (void *)&job);
}

/* Source rows [begin, end): destination columns [begin, end). */
static void transpose_range(void *arg, int64_t begin, int64_t end) {
    const pair_job *job = arg;
    DISPATCH_PAIR(transpose, job->x_dtype, job->dst_dtype,
                  (element_at(job->x, job->x_dtype, begin * job->x_ld), job->x_ld,
                   (void *)element_at(job->dst, job->dst_dtype, begin), job->dst_ld, end - begin,
                   job->cols, job->scale), )
}

void dmi_convert_transposed(const dm_gemm_provider *threads, const void *src, dm_dtype src_dtype,
                            int64_t src_ld, void *dst, dm_dtype dst_dtype, int64_t dst_ld,
                            int64_t rows, int64_t cols, double scale) {
    const pair_job job = {.x = src,
                          .x_dtype = src_dtype,
                          .dst = dst,
                          .dst_dtype = dst_dtype,
                          .x_ld = src_ld,
                          .dst_ld = dst_ld,
                          .cols = cols,
                          .scale = scale};
    dmi_parallel_for(threads, rows, dmi_row_grain(cols), transpose_range, (void *)&job);
}

static double dot_chunk(void *arg, size_t begin, size_t end) {
    const pair_job *job = arg;
    double result = NAN;
    DISPATCH_PAIR(dot, job->x_dtype, job->y_dtype,
                  (element_at(job->x, job->x_dtype, (int64_t)begin),
                   element_at(job->y, job->y_dtype, (int64_t)begin), end - begin),
                  result =)
    return result;
}

double dmi_dot(const dm_gemm_provider *threads, const void *x, dm_dtype x_dtype, const void *y,
               dm_dtype y_dtype, size_t n) {
    pair_job job = {.x = x, .x_dtype = x_dtype, .y = y, .y_dtype = y_dtype};
    return dmi_parallel_sum(threads, n, dot_chunk, &job);
}

#define SQUARE_f32(k) ((double)LOAD_f32(x, k) * (double)LOAD_f32(x, k))
#define SQUARE_f64(k) (LOAD_f64(x, k) * LOAD_f64(x, k))
#define ABS_f32(k) ((double)fabsf(LOAD_f32(x, k)))
#define ABS_f64(k) fabs(LOAD_f64(x, k))

/* NAME(x, dtype, n) = sum over k < n of TERM_f64(k) or TERM_f32(k): the compute types only
 * (float32 or float64). */
#define DEFINE_SUM(NAME, TERM)                                                                     \
    DMI_VECTORIZE static double NAME(const void *x, dm_dtype dtype, size_t n) {                    \
        double acc;                                                                                \
        if (dtype == DM_FLOAT64)                                                                   \
            DMI_REDUCE(n, TERM##_f64, acc);                                                        \
        else                                                                                       \
            DMI_REDUCE(n, TERM##_f32, acc);                                                        \
        return acc;                                                                                \
    }

DEFINE_SUM(sum_squares, SQUARE)
DEFINE_SUM(sum_abs, ABS)

static double sum_squares_chunk(void *arg, size_t begin, size_t end) {
    const pair_job *job = arg;
    return sum_squares(element_at(job->x, job->x_dtype, (int64_t)begin), job->x_dtype, end - begin);
}

double dmi_sum_squares(const dm_gemm_provider *threads, const void *x, dm_dtype dtype, size_t n) {
    pair_job job = {.x = x, .x_dtype = dtype};
    return dmi_parallel_sum(threads, n, sum_squares_chunk, &job);
}

DMI_VECTORIZE static void column_sum_squares(const void *x, dm_dtype dtype, int64_t rows,
                                             int64_t cols, double *acc) {
    for (int64_t j = 0; j < cols; ++j) acc[j] = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
        if (dtype == DM_FLOAT64) {
            const double *row = (const double *)x + i * cols;
            for (int64_t j = 0; j < cols; ++j) acc[j] += row[j] * row[j];
        } else {
            const float *row = (const float *)x + i * cols;
            for (int64_t j = 0; j < cols; ++j) acc[j] += (double)row[j] * (double)row[j];
        }
    }
}

DMI_VECTORIZE static void bf16_divide(uint16_t *x, size_t n, float d) {
    for (size_t k = 0; k < n; ++k) x[k] = d > 0.0f ? dmi_f32_to_bf16(dmi_bf16_to_f32(x[k]) / d) : 0;
}

typedef struct divide_job {
    uint16_t *x;
    float d;
} divide_job;

static void divide_range(void *arg, int64_t begin, int64_t end) {
    const divide_job *job = arg;
    bf16_divide(job->x + begin, (size_t)(end - begin), job->d);
}

void dmi_bf16_divide(const dm_gemm_provider *threads, uint16_t *x, size_t n, float d) {
    divide_job job = {x, d};
    dmi_parallel_for(threads, (int64_t)n, DMI_PARALLEL_GRAIN, divide_range, &job);
}

DMI_VECTORIZE static double sum_squares_bf16(const uint16_t *x, size_t n) {
    enum { LANES = 16, BLOCK = 4096 };
    double total = 0.0;
    for (size_t start = 0; start < n; start += BLOCK) {
        const size_t end = n - start < BLOCK ? n : start + BLOCK;
        float lane[LANES] = {0};
        size_t k = start;
        for (; k + LANES <= end; k += LANES)
            for (size_t l = 0; l < LANES; ++l) {
                const float v = dmi_bf16_to_f32(x[k + l]);
                lane[l] += v * v;
            }
        double block = 0.0;
        for (; k < end; ++k) block += (double)dmi_bf16_to_f32(x[k]) * dmi_bf16_to_f32(x[k]);
        for (size_t l = 0; l < LANES; ++l) block += lane[l];
        total += block;
    }
    return total;
}

/* The multi-versioned functions above are static, and these plain wrappers are what the other
 * files call: the ifunc symbol of a non-static target_clones function keeps default visibility
 * whatever -fvisibility says (GCC 12, clang 14), which would export it from a shared build. */
double dmi_sum_abs(const void *x, dm_dtype dtype, size_t n) { return sum_abs(x, dtype, n); }

void dmi_column_sum_squares(const void *x, dm_dtype dtype, int64_t rows, int64_t cols,
                            double *acc) {
    column_sum_squares(x, dtype, rows, cols, acc);
}

double dmi_sum_squares_bf16(const uint16_t *x, size_t n) { return sum_squares_bf16(x, n); }
