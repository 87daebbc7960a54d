/*
 * fuzz_c_api.c - a libFuzzer harness over every CPU entry point of dropmuon.h.
 *
 * The first input byte picks the entry point; the rest is read field by field (past the end,
 * every field reads 0) into sizes, enum values (valid and not), hyperparameters (NaN, Inf,
 * negative, denormal, huge, raw bits), leading dimensions, workspace sizes (exact, short, NULL,
 * generous), pointer arrays with NULL entries, data with NaN/Inf/denormals and matrix-product
 * providers that fail. The harness keeps the caller's side of the contract (buffers as large as
 * the arguments say, pointer arrays of `batch` entries) and checks the library's side:
 *
 *   - every call returns a dm_status value, and dm_status_string() names it;
 *   - an error status leaves every output untouched (outputs, duals, parameters, buffers);
 *   - inputs are never written, nor elements between rows (padding) read or written;
 *   - the workspace query and the call agree on argument errors; a valid call with a short
 *     workspace says DM_ERR_WORKSPACE, with NaN/Inf data DM_ERR_NONFINITE, with a failing
 *     provider DM_ERR_GEMM, and with moderate finite data DM_OK;
 *   - the provider is only ever handed memory inside the workspace;
 *   - sampler draws are deterministic, pick only layers of positive probability, and their
 *     masks have the documented shape; distributions are probabilities summing to 1.
 *
 * A broken check calls __builtin_trap(), which libFuzzer reports as a crash with its input.
 * Shapes are capped so that the caller can allocate what it promises and a run stays fast.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dropmuon/dropmuon.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);         \
            __builtin_trap();                                                                      \
        }                                                                                          \
    } while (0)

/* Caps on what one input may make the harness allocate or compute. */
#define MAX_ELEMENTS (1 << 18)    /* per allocation, elements */
#define MAX_WORKSPACE (64u << 20) /* bytes */
#define MAX_FLOPS 4.0e7           /* Newton-Schulz work of one call */
#define MAX_POINTERS 4096         /* entries of a pointer array */
#define MAX_LAYERS (1 << 16)      /* sampler layers */
/* Finite data below this must go through: its squares sum in float32 without overflow (the
 * bfloat16 iterates normalise like torch, accumulating in float32). */
#define MODERATE 1e15

/* ---- reading the input ---------------------------------------------------------------------- */

typedef struct reader {
    const uint8_t *data;
    size_t size, pos;
} reader;

static uint8_t u8(reader *r) { return r->pos < r->size ? r->data[r->pos++] : 0; }
static uint16_t u16(reader *r) { return (uint16_t)(u8(r) | (u8(r) << 8)); }
static uint32_t u32(reader *r) { return (uint32_t)u16(r) | ((uint32_t)u16(r) << 16); }
static uint64_t u64(reader *r) { return (uint64_t)u32(r) | ((uint64_t)u32(r) << 32); }

static const int64_t kSizes[] = {0,  1,  2,  3,  4,  5,  7,   8,   9,   15,  16,  17,
                                 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4097};
static const int64_t kWildSizes[] = {
    -1,        -2,        INT64_MIN, INT64_MAX,    INT64_MAX / 2, 1LL << 31, (1LL << 31) - 1,
    1LL << 32, 1LL << 40, 1LL << 62, 3037000500LL, 4294967297LL,  100000,    1000000};

/* A size: mostly the usual suspects, sometimes anything up to 5000, sometimes absurd. */
static int64_t pick_size(reader *r) {
    const uint8_t mode = u8(r);
    switch (mode % 8) {
    case 6: return u16(r) % 5000;
    case 7: return kWildSizes[u8(r) % (sizeof kWildSizes / sizeof kWildSizes[0])];
    case 4:
    case 5: return u8(r) % 70;
    default: return kSizes[u8(r) % (sizeof kSizes / sizeof kSizes[0])];
    }
}

static double special(reader *r) {
    static const double values[] = {0.0,      -0.0,     NAN,       -NAN,      INFINITY, -INFINITY,
                                    1.0,      -1.0,     0.5,       2.0,       1e-7,     1e-45,
                                    1e-310,   4.9e-324, FLT_MIN,   FLT_MAX,   DBL_MIN,  DBL_MAX,
                                    -DBL_MAX, 1e30,     -1e30,     1e38,      3.4e38,   1e300,
                                    65504.0,  0.95,     1.0000001, 0.9999999, 1e-300,   -1e-310};
    return values[u8(r) % (sizeof values / sizeof values[0])];
}

/* A hyperparameter: a typical value, a special one, or raw bits. */
static double pick_double(reader *r, double typical) {
    const uint8_t mode = u8(r) % 8;
    if (mode < 4) return typical;
    if (mode < 7) return special(r);
    uint64_t bits = u64(r);
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* An enum value: usually valid, sometimes one past the end, negative or huge. */
static int pick_enum(reader *r, int count) {
    const uint8_t mode = u8(r);
    if (mode % 8 < 6) return (int)(u8(r) % count);
    static const int wild[] = {-1, -2, 3, 5, 6, 7, 8, 9, 100, 0x7fffffff, (int)0x80000000};
    (void)count;
    return wild[u8(r) % (sizeof wild / sizeof wild[0])];
}

/* a + b, saturated to the int64 range (the harness's own arithmetic must not overflow). */
static int64_t add_sat(int64_t a, int64_t b) {
    int64_t sum;
    if (__builtin_add_overflow(a, b, &sum)) return b > 0 ? INT64_MAX : INT64_MIN;
    return sum;
}

/* ---- typed data ------------------------------------------------------------------------------ */

static int dtype_ok(int dtype) {
    return dtype == DM_FLOAT32 || dtype == DM_FLOAT64 || dtype == DM_BFLOAT16;
}
/* Element bytes; invalid dtypes get 8 so that a (wrong) read would stay in bounds. */
static size_t elem_size(int dtype) {
    return dtype == DM_FLOAT32 ? 4 : dtype == DM_BFLOAT16 ? 2 : 8;
}

static uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) return (uint16_t)((bits >> 16) | 0x0040u);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static double load(const void *base, int dtype, size_t k) {
    if (dtype == DM_FLOAT32) return ((const float *)base)[k];
    if (dtype == DM_BFLOAT16) {
        uint32_t bits = (uint32_t)((const uint16_t *)base)[k] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return ((const double *)base)[k];
}

static void store(void *base, int dtype, size_t k, double v) {
    if (dtype == DM_FLOAT32)
        ((float *)base)[k] = (float)v;
    else if (dtype == DM_BFLOAT16)
        ((uint16_t *)base)[k] = to_bf16((float)v);
    else
        ((double *)base)[k] = v;
}

static uint64_t splitmix(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Fills a rows x cols matrix (leading dimension ld) with scaled pseudo-random values and a few
 * specials from the input; the padding between rows gets NaN, which must never be read.
 * Returns 1 when a NaN/Inf landed inside the matrix, and the largest |value| in *max_abs. */
static int fill_matrix(reader *r, void *m, int dtype, int64_t rows, int64_t cols, int64_t ld,
                       double *max_abs) {
    uint64_t state = u64(r);
    static const double scales[] = {1.0, 1e-3, 1e3, 1e-30, 1e30, 1e-40, 0.0, 1e-310};
    double scale = scales[u8(r) % 8];
    if (dtype != DM_FLOAT64 && fabs(scale) < 1e-38 && scale != 0.0) scale = 1e-38;
    int nonfinite = 0;
    *max_abs = 0.0;
    if (rows == 0 || cols == 0) return 0; /* nothing is read: span() allocated no elements */
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < (i + 1 < rows ? ld : cols); ++j) { /* (rows-1)*ld + cols */
            const size_t k = (size_t)i * (size_t)ld + (size_t)j;
            if (j >= cols) {
                store(m, dtype, k, NAN);
                continue;
            }
            const double u = (double)(splitmix(&state) >> 11) * 0x1.0p-53;
            store(m, dtype, k, (2.0 * u - 1.0) * scale);
        }
    const int injections = rows > 0 && cols > 0 ? u8(r) % 4 : 0;
    for (int n = 0; n < injections; ++n) {
        const int64_t i = (int64_t)(u32(r) % (uint64_t)rows),
                      j = (int64_t)(u32(r) % (uint64_t)cols);
        store(m, dtype, (size_t)i * (size_t)ld + (size_t)j, special(r));
    }
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
            const double v = load(m, dtype, (size_t)i * (size_t)ld + (size_t)j);
            if (!isfinite(v))
                nonfinite = 1;
            else if (fabs(v) > *max_abs)
                *max_abs = fabs(v);
        }
    return nonfinite;
}

/* ---- matrix-product providers ---------------------------------------------------------------- */

typedef struct provider_ctx {
    int fail_after; /* fail on call number fail_after (counting from 1); 0: never */
    int status;     /* what a failure returns (any nonzero value) */
    int calls;
    const unsigned char *ws;
    size_t ws_bytes;
} provider_ctx;

/* Whether the `count` rows of `width` elements with stride ld, repeated batch times with stride
 * `stride`, lie inside the workspace. */
static int inside(const provider_ctx *ctx, const void *p, int dtype, int64_t batch, int64_t count,
                  int64_t width, int64_t ld, int64_t stride) {
    if (batch == 0 || count == 0 || width == 0) return 1;
    const __int128 last = (__int128)(batch - 1) * stride + (__int128)(count - 1) * ld + width;
    const __int128 begin = (const unsigned char *)p - ctx->ws;
    return begin >= 0 && begin + last * (__int128)elem_size(dtype) <= (__int128)ctx->ws_bytes;
}

static dm_status checking_gemm(void *vctx, dm_dtype dtype, int ta, int tb, int64_t batch, int64_t m,
                               int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                               int64_t sa, const void *b, int64_t ldb, int64_t sb, double beta,
                               const void *c_in, void *c, int64_t ldc, int64_t sc) {
    provider_ctx *ctx = vctx;
    ++ctx->calls;
    if (ctx->fail_after && ctx->calls >= ctx->fail_after) return (dm_status)ctx->status;
    /* The core must hand its provider workspace memory only, with consistent sizes. */
    CHECK(inside(ctx, a, dtype, batch, ta ? k : m, ta ? m : k, lda, sa));
    CHECK(inside(ctx, b, dtype, batch, tb ? n : k, tb ? k : n, ldb, sb));
    CHECK(inside(ctx, c, dtype, batch, m, n, ldc, sc));
    if (beta != 0.0 && c_in) CHECK(inside(ctx, c_in, dtype, batch, m, n, ldc, sc));
    return dm_gemm_reference(NULL, dtype, ta, tb, batch, m, n, k, alpha, a, lda, sa, b, ldb, sb,
                             beta, c_in, c, ldc, sc);
}

/* A parallel_for on this thread that cuts [0, n) into grain-long ranges, last first: the
 * passes must not depend on the order or the cut (sanitizers watch the ranges' bounds). */
static void splitting_parallel_for(void *vctx, int64_t n, int64_t grain, dm_parallel_body body,
                                   void *arg) {
    (void)vctx;
    CHECK(n > 0 && grain > 0);
    for (int64_t end = n; end > 0;) {
        const int64_t begin = (end - 1) / grain * grain;
        body(arg, begin, end);
        end = begin;
    }
}

/* NULL (the reference), a checking provider (mode 2: with a splitting parallel_for), or one
 * that fails on some call. */
static const dm_gemm_provider *pick_provider(reader *r, provider_ctx *ctx, dm_gemm_provider *p) {
    memset(ctx, 0, sizeof *ctx);
    const uint8_t mode = u8(r) % 4;
    if (mode == 0) return NULL;
    p->gemm = checking_gemm;
    p->ctx = ctx;
    p->parallel_for = mode == 2 ? splitting_parallel_for : NULL;
    if (mode == 3) {
        ctx->fail_after = 1 + u8(r) % 16;
        static const int statuses[] = {DM_ERR_GEMM, DM_ERR_INVALID_ARG, 1000, -1};
        ctx->status = statuses[u8(r) % 4];
    }
    return p;
}

/* ---- helpers --------------------------------------------------------------------------------- */

/* st, once checked to be a dm_status value that dm_status_string() names. */
static dm_status check_status(dm_status st) {
    CHECK((int)st >= DM_OK && (int)st <= DM_ERR_CUDA);
    const char *name = dm_status_string(st);
    CHECK(name != NULL && strncmp(name, "DM_", 3) == 0);
    return st;
}

/* A call that the library must refuse, with the query's error where the query found one. */
static void check_refused(dm_status st, dm_status query) {
    check_status(st);
    CHECK(st != DM_OK);
    if (query != DM_OK) CHECK(st == query);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) abort(); /* the caps keep this far from happening */
    return p;
}

static void *copy_of(const void *p, size_t bytes) {
    void *q = xmalloc(bytes);
    memcpy(q, p, bytes);
    return q;
}

/* rows x cols with leading dimension ld holds (rows - 1) * ld + cols elements; -1 if that is
 * more than the caps allow (or the arguments are such that the library must refuse them). */
static int64_t span(int64_t rows, int64_t cols, int64_t ld) {
    if (rows < 0 || cols < 0 || ld < cols) return -1;
    if (rows == 0 || cols == 0) return 0;
    const __int128 n = (__int128)(rows - 1) * ld + cols;
    return n > MAX_ELEMENTS ? -1 : (int64_t)n;
}

/* The call's workspace, from the input: *bytes exact, one byte short, half, or generous, and
 * sometimes a NULL pointer; the checking provider is told where it lies. *enough: whether the
 * call has what it needs (nothing, or a non-NULL workspace of at least `needed` bytes). */
static void *pick_workspace(reader *r, size_t needed, provider_ctx *ctx, size_t *bytes,
                            int *enough) {
    const uint8_t mode = u8(r) % 8;
    size_t n = needed;
    if (mode == 5) n = needed ? needed - 1 : 0;
    if (mode == 6) n = needed / 2;
    if (mode == 7) n = needed + 4096;
    const int null_ws = u8(r) % 16 == 0;
    void *ws = null_ws ? NULL : xmalloc(n);
    ctx->ws = ws;
    ctx->ws_bytes = n;
    *bytes = n;
    *enough = needed == 0 || (!null_ws && n >= needed);
    return ws;
}

/* The status a call must return, as far as its arguments let us know the answer: the query's
 * argument error; with valid arguments, DM_ERR_WORKSPACE without enough workspace, and with it
 * DM_OK for an empty call, DM_ERR_NONFINITE for NaN/Inf data (found before any product),
 * DM_ERR_GEMM from a failing provider, and DM_OK for moderate finite data. */
static void check_outcome(dm_status st, dm_status query, int valid_args, int workspace_ok,
                          int empty, int nonfinite, double max_abs, const provider_ctx *ctx) {
    if (query != DM_OK) CHECK(st == query);
    if (valid_args && !workspace_ok) CHECK(st == DM_ERR_WORKSPACE);
    if (valid_args && workspace_ok && !empty) {
        if (nonfinite)
            CHECK(st == DM_ERR_NONFINITE);
        else if (ctx->fail_after == 0 && max_abs <= MODERATE)
            CHECK(st == DM_OK);
        if (ctx->calls >= ctx->fail_after && ctx->fail_after) CHECK(st == DM_ERR_GEMM);
    }
    if (valid_args && workspace_ok && empty) CHECK(st == DM_OK);
}

static void pick_sharp_config(reader *r, dm_sharp_config *config, double *coefficients,
                              int max_steps) {
    config->norm = (dm_norm)pick_enum(r, 5);
    config->ns_precision = (dm_ns_precision)pick_enum(r, 2);
    const uint8_t steps_mode = u8(r) % 16;
    int64_t steps = steps_mode < 12 ? steps_mode % (max_steps + 1) : 5;
    if (steps_mode == 12) steps = -1;
    config->ns_steps = steps;
    config->ns_coefficients = coefficients;
    const uint8_t coefficients_mode = u8(r) % 8;
    for (int64_t j = 0; j < (steps > 0 ? steps : 0); ++j) {
        coefficients[3 * j] = coefficients_mode == 7 ? pick_double(r, 3.4445) : 3.4445;
        coefficients[3 * j + 1] = coefficients_mode == 7 ? pick_double(r, -4.7750) : -4.7750;
        coefficients[3 * j + 2] = coefficients_mode == 7 ? pick_double(r, 2.0315) : 2.0315;
    }
    if (coefficients_mode == 6) { /* a NULL schedule, perhaps with an absurd step count */
        config->ns_coefficients = NULL;
        if (u8(r) % 2) config->ns_steps = INT64_MAX / (1 + u8(r));
    }
    config->norm_scale = pick_double(r, 1.0);
    config->norm_offset = pick_double(r, 0.0);
    config->eps = pick_double(r, 1e-7);
}

/* Newton-Schulz flops of a call, to keep each run short. */
static double ns_flops(const dm_sharp_config *c, int64_t batch, int64_t rows, int64_t cols) {
    if (c->norm != DM_NORM_SPECTRAL || c->ns_steps <= 0) return 0.0;
    const double p = (double)(rows < cols ? rows : cols), q = (double)(rows < cols ? cols : rows);
    return (double)batch * (double)c->ns_steps * (4.0 * p * p * q + 2.0 * p * p * p);
}

/* ---- dm_sharp -------------------------------------------------------------------------------- */

static void fuzz_sharp(reader *r) {
    double coefficients[3 * 8];
    dm_sharp_config config;
    pick_sharp_config(r, &config, coefficients, 8);
    const int dtype = pick_enum(r, 3);
    const int64_t batch = pick_size(r) % 9 == 0 ? pick_size(r) : (int64_t)(u8(r) % 4);
    const int64_t rows = pick_size(r), cols = pick_size(r);
    const uint8_t ld_mode = u8(r);
    static const int64_t pads[] = {0, 0, 0, 1, 3, 17, -1, INT64_MAX / 4};
    const int64_t in_ld = add_sat(cols, pads[ld_mode % 8]);
    const int aliased = (ld_mode >> 3) % 4 == 0;
    const int64_t out_ld = aliased ? in_ld : add_sat(cols, pads[(ld_mode >> 5) % 8]);
    const int want_duals = u8(r) % 4 != 0;
    const int null_entry = u8(r) % 8 == 0;
    /* One block for the whole batch (the spectral operator may then read it in place). */
    const int one_block = u8(r) % 2;
    provider_ctx ctx;
    dm_gemm_provider provider;
    const dm_gemm_provider *gemm = pick_provider(r, &ctx, &provider);

    size_t needed = 0;
    const dm_status query =
        check_status(dm_sharp_workspace_size(&config, (dm_dtype)dtype, batch, rows, cols, &needed));
    const int64_t in_span = span(rows, cols, in_ld), out_span = span(rows, cols, out_ld);
    const int fits = batch >= 0 && batch <= MAX_POINTERS && in_span >= 0 && out_span >= 0 &&
                     (double)batch * (double)(in_span + out_span) <= MAX_ELEMENTS &&
                     needed <= MAX_WORKSPACE && ns_flops(&config, batch, rows, cols) <= MAX_FLOPS;
    if (!fits) {
        /* The caller cannot hold what these arguments describe: call only where the library
         * must stop before touching the data (an argument error, or no workspace). */
        if (query == DM_OK && needed == 0) return;
        const void *dummy_in[1] = {coefficients};
        void *dummy_out[1] = {coefficients};
        const int have_arrays = batch >= 0 && batch <= 1;
        check_refused(dm_sharp(&config, (dm_dtype)dtype, batch, rows, cols,
                               have_arrays ? dummy_in : NULL, in_ld, have_arrays ? dummy_out : NULL,
                               out_ld, NULL, NULL, 0, gemm),
                      query);
        return;
    }

    const size_t es = elem_size(dtype);
    const size_t in_bytes = (size_t)in_span * es, out_bytes = (size_t)out_span * es;
    void **in = xmalloc(sizeof(void *) * (size_t)(batch ? batch : 1));
    void **out = xmalloc(sizeof(void *) * (size_t)(batch ? batch : 1));
    void **in_copy = xmalloc(sizeof(void *) * (size_t)(batch ? batch : 1));
    void **out_copy = xmalloc(sizeof(void *) * (size_t)(batch ? batch : 1));
    int nonfinite = 0;
    double max_abs = 0.0;
    unsigned char *in_block = one_block ? xmalloc(in_bytes * (size_t)(batch ? batch : 1)) : NULL;
    for (int64_t b = 0; b < batch; ++b) {
        double m;
        in[b] = one_block ? in_block + (size_t)b * in_bytes : xmalloc(in_bytes);
        if (dtype_ok(dtype))
            nonfinite |= fill_matrix(r, in[b], dtype, rows, cols, in_ld, &m);
        else
            memset(in[b], 0x7f, in_bytes), m = 0.0;
        if (m > max_abs) max_abs = m;
        if (aliased) {
            out[b] = in[b];
        } else {
            out[b] = xmalloc(out_bytes);
            memset(out[b], 0xA5, out_bytes);
        }
        in_copy[b] = copy_of(in[b], in_bytes);
        out_copy[b] = copy_of(out[b], out_bytes);
    }
    double *duals = want_duals ? xmalloc(sizeof(double) * (size_t)(batch ? batch : 1)) : NULL;
    for (int64_t b = 0; duals && b < batch; ++b) duals[b] = -12345.0;
    const int64_t null_at = null_entry && batch > 0 ? (int64_t)(u8(r) % batch) : -1;
    void *saved = NULL;
    if (null_at >= 0) {
        saved = (u8(r) % 2) ? in[null_at] : out[null_at];
        if (saved == in[null_at])
            in[null_at] = NULL;
        else
            out[null_at] = NULL;
    }
    size_t ws_bytes;
    int workspace_ok;
    void *ws = pick_workspace(r, needed, &ctx, &ws_bytes, &workspace_ok);

    const dm_status st =
        check_status(dm_sharp(&config, (dm_dtype)dtype, batch, rows, cols, (const void *const *)in,
                              in_ld, out, out_ld, duals, ws, ws_bytes, gemm));
    if (null_at >= 0) {
        if (in[null_at] == NULL)
            in[null_at] = saved;
        else
            out[null_at] = saved;
    }

    const int empty = batch == 0 || rows == 0 || cols == 0;
    const int valid_args =
        query == DM_OK && in_ld >= cols && out_ld >= cols && (null_at < 0 || empty);
    check_outcome(st, query, valid_args, workspace_ok, empty, nonfinite, max_abs, &ctx);
    for (int64_t b = 0; b < batch; ++b) {
        if (!aliased || st != DM_OK) CHECK(memcmp(in[b], in_copy[b], in_bytes) == 0);
        if (st != DM_OK) {
            CHECK(memcmp(out[b], out_copy[b], out_bytes) == 0);
        } else if (!aliased && out_span > 0) { /* padding between output rows untouched */
            for (int64_t i = 0; i + 1 < rows; ++i)
                CHECK(memcmp((char *)out[b] + ((size_t)i * out_ld + cols) * es,
                             (char *)out_copy[b] + ((size_t)i * out_ld + cols) * es,
                             (size_t)(out_ld - cols) * es) == 0);
        }
        if (st != DM_OK && duals) CHECK(duals[b] == -12345.0);
    }
    for (int64_t b = 0; b < batch; ++b) {
        if (!aliased) free(out[b]);
        if (!one_block) free(in[b]);
        free(in_copy[b]);
        free(out_copy[b]);
    }
    free(in), free(out), free(in_copy), free(out_copy), free(duals), free(ws), free(in_block);
}

/* ---- dm_update ------------------------------------------------------------------------------- */

static void fuzz_update(reader *r) {
    double coefficients[3 * 8];
    dm_update_config config;
    pick_sharp_config(r, &config.sharp, coefficients, 8);
    config.lr = pick_double(r, 0.02);
    config.weight_decay = pick_double(r, 0.1);
    config.momentum = pick_double(r, 0.95);
    config.nesterov = (int)(u8(r) % 8 == 7 ? pick_enum(r, 2) : u8(r) % 2);
    config.lr_adjust = (dm_lr_adjust)pick_enum(r, 3);
    config.radius = (dm_radius)pick_enum(r, 2);
    config.radius_l0 = pick_double(r, 1.0);
    config.radius_l1 = pick_double(r, 0.0);
    const int dtype = pick_enum(r, 3);
    const int64_t batch = pick_size(r) % 9 == 0 ? pick_size(r) : (int64_t)(u8(r) % 4);
    const int64_t rows = pick_size(r), cols = pick_size(r);
    const int want_duals = u8(r) % 4 != 0;
    const int null_entry = u8(r) % 8 == 0;
    provider_ctx ctx;
    dm_gemm_provider provider;
    const dm_gemm_provider *gemm = pick_provider(r, &ctx, &provider);

    size_t needed = 0;
    const dm_status query = check_status(
        dm_update_workspace_size(&config, (dm_dtype)dtype, batch, rows, cols, &needed));
    const int64_t n = span(rows, cols, cols);
    const int fits = batch >= 0 && batch <= MAX_POINTERS && n >= 0 &&
                     (double)batch * 3.0 * (double)n <= MAX_ELEMENTS && needed <= MAX_WORKSPACE &&
                     ns_flops(&config.sharp, batch, rows, cols) <= MAX_FLOPS;
    if (!fits) {
        if (query == DM_OK && needed == 0) return;
        void *dummy[1] = {coefficients};
        const int have_arrays = batch >= 0 && batch <= 1;
        check_refused(dm_update(&config, (dm_dtype)dtype, batch, rows, cols,
                                have_arrays ? dummy : NULL,
                                have_arrays ? (const void *const *)dummy : NULL,
                                have_arrays ? dummy : NULL, NULL, NULL, 0, gemm),
                      query);
        return;
    }

    const size_t es = elem_size(dtype), bytes = (size_t)n * es;
    const size_t count = (size_t)(batch ? batch : 1);
    void **params = xmalloc(sizeof(void *) * count), **grads = xmalloc(sizeof(void *) * count);
    void **bufs = xmalloc(sizeof(void *) * count);
    void **copies = xmalloc(sizeof(void *) * count * 3);
    int nonfinite = 0;
    double max_abs = 0.0, m;
    for (int64_t b = 0; b < batch; ++b) {
        params[b] = xmalloc(bytes), grads[b] = xmalloc(bytes), bufs[b] = xmalloc(bytes);
        if (dtype_ok(dtype)) {
            fill_matrix(r, params[b], dtype, rows, cols, cols, &m); /* NaN weights are allowed */
            nonfinite |= fill_matrix(r, grads[b], dtype, rows, cols, cols, &m);
            if (m > max_abs) max_abs = m;
            nonfinite |= fill_matrix(r, bufs[b], dtype, rows, cols, cols, &m);
            if (m > max_abs) max_abs = m;
        } else {
            memset(params[b], 1, bytes), memset(grads[b], 2, bytes), memset(bufs[b], 3, bytes);
        }
        copies[3 * b] = copy_of(params[b], bytes);
        copies[3 * b + 1] = copy_of(grads[b], bytes);
        copies[3 * b + 2] = copy_of(bufs[b], bytes);
    }
    double *duals = want_duals ? xmalloc(sizeof(double) * count) : NULL;
    for (int64_t b = 0; duals && b < batch; ++b) duals[b] = -12345.0;
    const int64_t null_at = null_entry && batch > 0 ? (int64_t)(u8(r) % batch) : -1;
    const int null_which = u8(r) % 3;
    void **arrays[3] = {params, grads, bufs};
    void *saved = NULL;
    if (null_at >= 0) saved = arrays[null_which][null_at], arrays[null_which][null_at] = NULL;
    size_t ws_bytes;
    int workspace_ok;
    void *ws = pick_workspace(r, needed, &ctx, &ws_bytes, &workspace_ok);

    const dm_status st =
        check_status(dm_update(&config, (dm_dtype)dtype, batch, rows, cols, params,
                               (const void *const *)grads, bufs, duals, ws, ws_bytes, gemm));
    if (null_at >= 0) arrays[null_which][null_at] = saved;

    const int empty = batch == 0 || rows == 0 || cols == 0;
    const int valid_args = query == DM_OK && (null_at < 0 || empty);
    check_outcome(st, query, valid_args, workspace_ok, empty, nonfinite, max_abs, &ctx);
    for (int64_t b = 0; b < batch; ++b) {
        CHECK(memcmp(grads[b], copies[3 * b + 1], bytes) == 0); /* gradients are const */
        if (st != DM_OK) {
            CHECK(memcmp(params[b], copies[3 * b], bytes) == 0);
            CHECK(memcmp(bufs[b], copies[3 * b + 2], bytes) == 0);
            if (duals) CHECK(duals[b] == -12345.0);
        }
    }
    for (int64_t b = 0; b < batch; ++b) {
        free(params[b]), free(grads[b]), free(bufs[b]);
        free(copies[3 * b]), free(copies[3 * b + 1]), free(copies[3 * b + 2]);
    }
    free(params), free(grads), free(bufs), free(copies), free(duals), free(ws);
}

/* ---- dm_gemm_reference ----------------------------------------------------------------------- */

static void fuzz_gemm(reader *r) {
    const int dtype = pick_enum(r, 3);
    const int ta = u8(r) % 4 == 3 ? pick_enum(r, 2) : u8(r) % 2;
    const int tb = u8(r) % 4 == 3 ? pick_enum(r, 2) : u8(r) % 2;
    const int64_t batch = u8(r) % 8 == 0 ? pick_size(r) : (int64_t)(u8(r) % 4);
    const int64_t m = pick_size(r) % 80 == 0 ? pick_size(r) : pick_size(r) % 80;
    const int64_t n = pick_size(r) % 80, k = pick_size(r) % 80;
    static const int64_t pads[] = {0, 0, 0, 1, 5, -1};
    const int64_t lda = add_sat(ta ? m : k, pads[u8(r) % 6]);
    const int64_t ldb = add_sat(tb ? k : n, pads[u8(r) % 6]);
    const int64_t ldc = add_sat(n, pads[u8(r) % 6]);
    const double alpha = pick_double(r, 1.0), beta = pick_double(r, u8(r) % 2 ? 0.0 : 1.0);
    const uint8_t c_in_mode = u8(r) % 3;   /* separate, aliasing c, NULL */
    const uint8_t stride_mode = u8(r) % 4; /* 0 packed, 1 padded, 2 zero (shared A and B) */

    const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k,
                  b_cols = tb ? k : n;
    const int64_t a_span = span(a_rows, a_cols, lda), b_span = span(b_rows, b_cols, ldb);
    const int64_t c_span = span(m, n, ldc);
    const int sizes_ok = batch >= 0 && m >= 0 && n >= 0 && k >= 0 && dtype_ok(dtype);
    const int lds_ok = ldc >= n && lda >= a_cols && ldb >= b_cols;
    if (!sizes_ok || !lds_ok || a_span < 0 || b_span < 0 || c_span < 0 || batch > 64 ||
        (double)batch * (double)m * (double)n * (double)(k + 1) > MAX_FLOPS) {
        /* Arguments the library must refuse (or that do nothing): no memory behind them. */
        const dm_status st =
            check_status(dm_gemm_reference(NULL, (dm_dtype)dtype, ta, tb, batch, m, n, k, alpha,
                                           NULL, lda, 0, NULL, ldb, 0, beta, NULL, NULL, ldc, 0));
        if (batch < 0 || m < 0 || n < 0 || k < 0)
            CHECK(st == DM_ERR_SHAPE);
        else if (!dtype_ok(dtype))
            CHECK(st == DM_ERR_DTYPE);
        else if (batch == 0 || m == 0 || n == 0)
            CHECK(st == DM_OK);
        else
            CHECK(st != DM_OK);
        return;
    }
    const int64_t pad = stride_mode == 1 ? 3 : 0;
    const int64_t sa = stride_mode == 2 ? 0 : a_span + pad,
                  sb = stride_mode == 2 ? 0 : b_span + pad;
    const int64_t sc = c_span + pad; /* C batches never overlap */
    const size_t es = elem_size(dtype);
    const size_t a_n = (size_t)(batch ? (batch - 1) * sa + a_span : 0) + 1;
    const size_t b_n = (size_t)(batch ? (batch - 1) * sb + b_span : 0) + 1;
    const size_t c_n = (size_t)(batch ? (batch - 1) * sc + c_span : 0) + 1;
    void *a = xmalloc(a_n * es), *b = xmalloc(b_n * es), *c = xmalloc(c_n * es);
    void *c_in = c_in_mode == 0 ? xmalloc(c_n * es) : c_in_mode == 1 ? c : NULL;
    double ignored;
    fill_matrix(r, a, dtype, 1, (int64_t)a_n, (int64_t)a_n, &ignored);
    fill_matrix(r, b, dtype, 1, (int64_t)b_n, (int64_t)b_n, &ignored);
    fill_matrix(r, c, dtype, 1, (int64_t)c_n, (int64_t)c_n, &ignored);
    if (c_in_mode == 0) fill_matrix(r, c_in, dtype, 1, (int64_t)c_n, (int64_t)c_n, &ignored);
    void *a0 = copy_of(a, a_n * es), *b0 = copy_of(b, b_n * es), *c0 = copy_of(c, c_n * es);

    const dm_status st =
        check_status(dm_gemm_reference(NULL, (dm_dtype)dtype, ta, tb, batch, m, n, k, alpha, a, lda,
                                       sa, b, ldb, sb, beta, c_in, c, ldc, sc));
    const int needs_c_in = beta != 0.0 && batch > 0 && m > 0 && n > 0;
    if (needs_c_in && c_in == NULL)
        CHECK(st == DM_ERR_INVALID_ARG);
    else
        CHECK(st == DM_OK);
    CHECK(memcmp(a, a0, a_n * es) == 0 && memcmp(b, b0, b_n * es) == 0);
    if (st != DM_OK) CHECK(memcmp(c, c0, c_n * es) == 0);
    if (st == DM_OK && dtype == DM_FLOAT64 && c_in_mode == 0 && isfinite(alpha) && isfinite(beta)) {
        /* Spot-check one element against a long-double sum, with the product's error bound. */
        for (int64_t bi = 0; bi < batch && m > 0 && n > 0; ++bi) {
            const int64_t i = m - 1, j = n - 1;
            long double acc = 0, bound = 0, b_sum = 0;
            for (int64_t l = 0; l < k; ++l) {
                const double av =
                    load(a, dtype, (size_t)(bi * sa + (ta ? l * lda + i : i * lda + l)));
                const double bv =
                    load(b, dtype, (size_t)(bi * sb + (tb ? j * ldb + l : l * ldb + j)));
                acc += (long double)av * bv;
                bound += fabsl((long double)av * bv);
                b_sum += fabsl((long double)bv);
            }
            const double cin =
                beta == 0.0 ? 0.0 : load(c_in, dtype, (size_t)(bi * sc + i * ldc + j));
            const long double want = alpha * acc + (beta == 0.0 ? 0 : (long double)beta * cin);
            const double got = load(c, dtype, (size_t)(bi * sc + i * ldc + j));
            /* Where a rounding falls among the subnormals its error is up to DBL_TRUE_MIN, not a
             * relative one: alpha * A[i][l] before it multiplies B[l][j] (the A B form: error
             * times |B|), or each product A[i][l] * B[j][l] before the sum is scaled by alpha
             * (the A B^T form: error times |alpha|, which a huge alpha makes visible). */
            const long double tol =
                1e-12L * (fabsl(alpha) * bound * (k + 2) + fabsl((long double)beta * cin)) +
                (long double)DBL_TRUE_MIN * (b_sum + 2 + fabsl(alpha) * (k + 2)) + 1e-300L;
            if (isfinite((double)want) && isfinite((double)bound) && isfinite(got) &&
                fabs(cin) < 1e300)
                CHECK(fabsl((long double)got - want) <= tol);
        }
    }
    free(a), free(b), free(c), free(a0), free(b0), free(c0);
    if (c_in_mode == 0) free(c_in);
}

/* ---- the sampler ----------------------------------------------------------------------------- */

static void fuzz_sampler(reader *r, int draw) {
    dm_sampler_config config;
    memset(&config, 0, sizeof config);
    config.kind = (dm_sampling)pick_enum(r, 6);
    int64_t layers = pick_size(r);
    if (u8(r) % 8 == 0) layers = (int64_t)(u32(r) % MAX_LAYERS);
    config.num_layers = layers;
    config.seed = u64(r);
    const uint8_t tau_mode = u8(r) % 4;
    config.tau = tau_mode == 0 ? pick_size(r)
                 : layers > 0  ? 1 + (int64_t)(u32(r) % (uint64_t)layers)
                               : 1;
    config.progress = pick_double(r, (double)(u8(r) % 11) / 10.0);
    config.shift_strength = pick_double(r, 4.0);
    const int64_t n = layers > 0 && layers <= MAX_LAYERS ? layers : 0;
    double *probabilities = NULL, *smoothness = NULL;
    const uint8_t arrays = u8(r) % 8;
    if (n > 0 && arrays != 0) {
        probabilities = xmalloc(sizeof(double) * (size_t)n);
        smoothness = xmalloc(sizeof(double) * (size_t)n);
        uint64_t state = u64(r);
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const double u = (double)(splitmix(&state) >> 11) * 0x1.0p-53;
            probabilities[i] = u < 0.3 ? 0.0 : u;
            smoothness[i] = u < 0.2 ? 0.0 : u * 10.0;
            sum += probabilities[i];
        }
        for (int64_t i = 0; i < n; ++i)
            probabilities[i] = sum > 0 ? probabilities[i] / sum : 1.0 / (double)n;
        const int specials = u8(r) % 4;
        for (int s = 0; s < specials; ++s) {
            const size_t at = u32(r) % (uint64_t)n;
            if (u8(r) % 2)
                probabilities[at] = special(r);
            else
                smoothness[at] = special(r);
        }
        if (arrays == 7) probabilities[0] += 1e-7 * (double)(u8(r) % 30); /* near the tolerance */
    }
    config.probabilities = probabilities;
    config.smoothness = smoothness;

    if (n == 0) { /* no buffer can be provided: only the argument checks may run */
        if (layers >= 1 &&
            (config.kind == DM_SAMPLING_CUSTOM || config.kind == DM_SAMPLING_COST_OPTIMAL))
            check_status(dm_sampler_distribution(&config, NULL));
        check_status(dm_sampler_distribution(NULL, NULL));
        const dm_status st = dm_sample_layers(NULL, 0, NULL, NULL);
        CHECK(st == DM_ERR_INVALID_ARG);
        if (layers < 1) CHECK(dm_sample_layers(&config, 0, NULL, NULL) == DM_ERR_INVALID_ARG);
        free(probabilities), free(smoothness);
        return;
    }
    double *distribution = xmalloc(sizeof(double) * (size_t)n);
    const dm_status st_d =
        check_status(dm_sampler_distribution(&config, u8(r) % 16 == 0 ? NULL : distribution));
    if (st_d == DM_OK) {
        long double sum = 0;
        for (int64_t i = 0; i < n; ++i) {
            CHECK(distribution[i] >= 0.0 &&
                  distribution[i] <= 1.0 + 2e-6); /* custom: unnormalised */
            sum += distribution[i];
        }
        CHECK(fabsl(sum - 1.0L) <= 1e-6L * (1 + (long double)n * 1e-9L) + 1e-9L);
    }
    if (draw) {
        const uint64_t step = u8(r) % 2 ? u64(r) : u8(r);
        uint8_t *mask = xmalloc((size_t)n), *again = xmalloc((size_t)n);
        memset(mask, 0xEE, (size_t)n);
        int64_t cutoff = -7, cutoff2 = -7;
        const int with_mask = u8(r) % 8 != 0;
        const dm_status st =
            check_status(dm_sample_layers(&config, step, with_mask ? mask : NULL, &cutoff));
        const dm_status st2 =
            check_status(dm_sample_layers(&config, step, again, u8(r) % 4 ? &cutoff2 : NULL));
        CHECK(st == st2);
        if (st_d != DM_OK && st_d != DM_ERR_INVALID_ARG) CHECK(st == st_d);
        if (st == DM_OK) {
            CHECK(st_d == DM_OK || st_d == DM_ERR_INVALID_ARG); /* (NULL output buffer above) */
            CHECK(cutoff >= 0 && cutoff < n);
            if (cutoff2 != -7) CHECK(cutoff2 == cutoff);
            int64_t active = 0, lowest = -1;
            for (int64_t i = 0; i < n; ++i) {
                CHECK(again[i] == 0 || again[i] == 1);
                if (with_mask) CHECK(mask[i] == again[i]);
                if (again[i] && lowest < 0) lowest = i;
                active += again[i];
            }
            CHECK(lowest == cutoff);
            if (config.kind == DM_SAMPLING_TAU_NICE)
                CHECK(active == config.tau);
            else
                CHECK(active == n - cutoff); /* a suffix */
            if (st_d == DM_OK) CHECK(distribution[cutoff] > 0.0);
        } else if (with_mask) {
            for (int64_t i = 0; i < n; ++i) CHECK(mask[i] == 0xEE); /* nothing written */
        }
        free(mask), free(again);
    }
    free(distribution), free(probabilities), free(smoothness);
}

/* ---- workspace queries with absurd arguments, and the small functions ------------------------ */

static void fuzz_queries(reader *r) {
    double coefficients[3 * 8];
    dm_update_config config;
    memset(&config, 0, sizeof config);
    pick_sharp_config(r, &config.sharp, coefficients, 8);
    config.lr = pick_double(r, 0.02);
    config.weight_decay = pick_double(r, 0.1);
    config.momentum = pick_double(r, 0.95);
    config.radius = (dm_radius)pick_enum(r, 2);
    config.radius_l0 = pick_double(r, 1.0);
    config.lr_adjust = (dm_lr_adjust)pick_enum(r, 3);
    const int dtype = pick_enum(r, 3);
    const int64_t batch = pick_size(r), rows = pick_size(r), cols = pick_size(r);
    size_t bytes = 12345;
    const int null_bytes = u8(r) % 8 == 0, null_config = u8(r) % 16 == 0;
    dm_status st = dm_sharp_workspace_size(null_config ? NULL : &config.sharp, (dm_dtype)dtype,
                                           batch, rows, cols, null_bytes ? NULL : &bytes);
    check_status(st);
    if (null_bytes || null_config) CHECK(st == DM_ERR_INVALID_ARG);
    if (batch < 0 || rows < 0 || cols < 0) CHECK(st != DM_OK);
    if (st == DM_OK && dtype_ok(dtype)) /* at least the data panel */
        CHECK((double)bytes >=
              (double)batch * (double)rows * (double)cols * (dtype == DM_FLOAT64 ? 8 : 4));
    if (st != DM_OK && !null_bytes) CHECK(bytes == 12345 || bytes == 0);
    bytes = 12345;
    st = dm_update_workspace_size(null_config ? NULL : &config, (dm_dtype)dtype, batch, rows, cols,
                                  null_bytes ? NULL : &bytes);
    check_status(st);
    if (null_bytes || null_config) CHECK(st == DM_ERR_INVALID_ARG);

    for (int i = 0; i < 4; ++i) {
        const int code = (int)u32(r);
        const char *name = dm_status_string((dm_status)code);
        CHECK(name != NULL && strncmp(name, "DM_", 3) == 0);
    }
    CHECK(dm_version() == DM_VERSION_MAJOR * 10000 + DM_VERSION_MINOR * 100 + DM_VERSION_PATCH);
    const double u = dm_random_uniform(u64(r), u64(r), u64(r));
    CHECK(u >= 0.0 && u < 1.0);
    double muon[15];
    dm_sharp_config muon_config;
    CHECK(dm_sharp_config_muon(NULL, muon) == DM_ERR_INVALID_ARG);
    CHECK(dm_sharp_config_muon(&muon_config, NULL) == DM_ERR_INVALID_ARG);
    CHECK(dm_sharp_config_muon(&muon_config, muon) == DM_OK);
    CHECK(dm_sharp_workspace_size(&muon_config, DM_FLOAT32, 1, 4, 4, &bytes) == DM_OK);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    reader r = {data, size, 0};
    switch (u8(&r) % 7) {
    case 0: fuzz_sharp(&r); break;
    case 1: fuzz_update(&r); break;
    case 2: fuzz_gemm(&r); break;
    case 3: fuzz_sampler(&r, 0); break;
    case 4: fuzz_sampler(&r, 1); break;
    case 5: fuzz_queries(&r); break;
    default: fuzz_sharp(&r); break; /* the widest surface gets a second share */
    }
    return 0;
}
