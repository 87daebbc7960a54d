// reference.h - float64 references and helpers shared by the GoogleTest suite.
//
// Everything here is written from the contract in dropmuon.h and docs/method.md
// (sections 2-4), not from csrc/core: the tests compare the kernels against these loops.
//   - bfloat16 storage (written independently of internal.h) and typed user buffers;
//   - a small row-major float64 matrix type with products, norms and the sharp operators;
//   - a one-sided Jacobi (Hestenes) SVD for exact polar factors and singular values;
//   - call wrappers that query the workspace size and allocate exactly that many bytes, so that
//     AddressSanitizer catches any kernel that writes past what it asked for.
#ifndef DROPMUON_TESTS_C_REFERENCE_H
#define DROPMUON_TESTS_C_REFERENCE_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "dropmuon/dropmuon.h"

namespace dmtest {

// ---- bfloat16 storage: the high 16 bits of an IEEE float32 -------------------------------------

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
    const uint32_t lower = bits & 0xFFFFu, upper = bits >> 16;
    uint32_t rounded = upper;
    if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) ++rounded;
    return static_cast<uint16_t>(rounded);
}

inline size_t dtype_size(dm_dtype dtype) {
    return dtype == DM_FLOAT64 ? 8 : dtype == DM_FLOAT32 ? 4 : 2;
}

inline const char *dtype_name(dm_dtype dtype) {
    return dtype == DM_FLOAT64 ? "f64" : dtype == DM_FLOAT32 ? "f32" : "bf16";
}

// v as the storage dtype holds it (float32 and bfloat16 round through float32).
inline double round_to(dm_dtype dtype, double v) {
    switch (dtype) {
    case DM_FLOAT64: return v;
    case DM_FLOAT32: return static_cast<double>(static_cast<float>(v));
    case DM_BFLOAT16: return bf16_to_float(float_to_bf16(static_cast<float>(v)));
    }
    return std::nan("");
}

// Writes a value of an enum type that is outside its enumerators, without a C++ enum load
// (which UBSan's -fsanitize=enum would flag): the kernels are C and must reject it.
template <typename E> void set_raw_enum(E *field, int value) {
    static_assert(sizeof(E) == sizeof(int), "C enums are int-sized here");
    std::memcpy(field, &value, sizeof value);
}

// ---- typed user memory
// ---------------------------------------------------------------------------

// count elements of dtype, read and written as doubles (writes round to the dtype).
class Buffer {
  public:
    Buffer() = default;
    Buffer(dm_dtype dtype, size_t count)
        : dtype_(dtype), count_(count), bytes_(count * dtype_size(dtype)) {}

    dm_dtype dtype() const { return dtype_; }
    size_t size() const { return count_; }
    void *data() { return bytes_.empty() ? nullptr : bytes_.data(); }
    const void *data() const { return bytes_.empty() ? nullptr : bytes_.data(); }
    const std::vector<unsigned char> &bytes() const { return bytes_; }

    double get(size_t k) const {
        switch (dtype_) {
        case DM_FLOAT64: {
            double v;
            std::memcpy(&v, &bytes_[k * 8], 8);
            return v;
        }
        case DM_FLOAT32: {
            float v;
            std::memcpy(&v, &bytes_[k * 4], 4);
            return v;
        }
        case DM_BFLOAT16: {
            uint16_t v;
            std::memcpy(&v, &bytes_[k * 2], 2);
            return bf16_to_float(v);
        }
        }
        return std::nan("");
    }

    void set(size_t k, double v) {
        switch (dtype_) {
        case DM_FLOAT64: std::memcpy(&bytes_[k * 8], &v, 8); break;
        case DM_FLOAT32: {
            const float f = static_cast<float>(v);
            std::memcpy(&bytes_[k * 4], &f, 4);
            break;
        }
        case DM_BFLOAT16: {
            const uint16_t h = float_to_bf16(static_cast<float>(v));
            std::memcpy(&bytes_[k * 2], &h, 2);
            break;
        }
        }
    }

    void fill(double v) {
        for (size_t k = 0; k < count_; ++k) set(k, v);
    }

  private:
    dm_dtype dtype_ = DM_FLOAT64;
    size_t count_ = 0;
    std::vector<unsigned char> bytes_;
};

// ---- float64 matrices
// ----------------------------------------------------------------------------

struct Mat {
    int64_t rows = 0, cols = 0;
    std::vector<double> v;

    Mat() = default;
    Mat(int64_t r, int64_t c, double fill = 0.0)
        : rows(r), cols(c), v(static_cast<size_t>(r * c), fill) {}
    double &operator()(int64_t i, int64_t j) { return v[static_cast<size_t>(i * cols + j)]; }
    double operator()(int64_t i, int64_t j) const { return v[static_cast<size_t>(i * cols + j)]; }
};

// Standard normal entries from a fixed seed (deterministic across runs).
inline Mat random_normal(int64_t rows, int64_t cols, uint64_t seed, double scale = 1.0) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    Mat m(rows, cols);
    for (double &x : m.v) x = scale * normal(rng);
    return m;
}

inline Mat identity(int64_t n) {
    Mat m(n, n);
    for (int64_t i = 0; i < n; ++i) m(i, i) = 1.0;
    return m;
}

inline Mat transpose(const Mat &a) {
    Mat t(a.cols, a.rows);
    for (int64_t i = 0; i < a.rows; ++i)
        for (int64_t j = 0; j < a.cols; ++j) t(j, i) = a(i, j);
    return t;
}

inline Mat matmul(const Mat &a, const Mat &b) {
    Mat c(a.rows, b.cols);
    for (int64_t i = 0; i < a.rows; ++i)
        for (int64_t l = 0; l < a.cols; ++l) {
            const double s = a(i, l);
            for (int64_t j = 0; j < b.cols; ++j) c(i, j) += s * b(l, j);
        }
    return c;
}

// alpha * a + beta * b (same shapes).
inline Mat axpby(double alpha, const Mat &a, double beta, const Mat &b) {
    Mat c(a.rows, a.cols);
    for (size_t k = 0; k < c.v.size(); ++k) c.v[k] = alpha * a.v[k] + beta * b.v[k];
    return c;
}

inline double dot(const Mat &a, const Mat &b) {
    double acc = 0.0;
    for (size_t k = 0; k < a.v.size(); ++k) acc += a.v[k] * b.v[k];
    return acc;
}

inline double max_abs(const Mat &a) {
    double m = 0.0;
    for (double x : a.v) m = std::max(m, std::fabs(x));
    return m;
}

inline double max_abs_diff(const Mat &a, const Mat &b) {
    double m = 0.0;
    for (size_t k = 0; k < a.v.size(); ++k) m = std::max(m, std::fabs(a.v[k] - b.v[k]));
    return m;
}

// l2 norm of n values with a stride, scaled by the largest magnitude so that it neither
// overflows (1e200) nor underflows (1e-200).
inline double scaled_norm(const double *x, int64_t n, int64_t stride) {
    double big = 0.0;
    for (int64_t k = 0; k < n; ++k) big = std::max(big, std::fabs(x[k * stride]));
    if (big == 0.0) return 0.0;
    double acc = 0.0;
    for (int64_t k = 0; k < n; ++k) {
        const double y = x[k * stride] / big;
        acc += y * y;
    }
    return big * std::sqrt(acc);
}

inline double frobenius(const Mat &a) {
    return scaled_norm(a.v.data(), static_cast<int64_t>(a.v.size()), 1);
}

// x / max(norm, floor), and 0 when that divisor is 0.
inline double divide_clamped(double x, double norm, double floor) {
    const double d = std::max(norm, floor);
    return d > 0.0 ? x / d : 0.0;
}

// ---- the sharp operators in float64 (dropmuon.h, "Sharp operators") --------------------------

// Newton-Schulz exactly as documented: transpose so rows <= cols,
// X = M / max(norm_scale * ||M||_F + norm_offset, eps), then per step A = X X^T,
// X = a X + (b A + c A A) X.
inline Mat ref_newton_schulz(const Mat &m, int64_t steps, const double *coefficients,
                             double norm_scale, double norm_offset, double eps) {
    const bool tall = m.rows > m.cols;
    Mat x = tall ? transpose(m) : m;
    const double d = std::max(norm_scale * frobenius(m) + norm_offset, eps);
    for (double &e : x.v) e = d > 0.0 ? e / d : 0.0;
    for (int64_t j = 0; j < steps; ++j) {
        const double a = coefficients[3 * j], b = coefficients[3 * j + 1],
                     c = coefficients[3 * j + 2];
        const Mat gram = matmul(x, transpose(x));
        const Mat poly = axpby(b, gram, c, matmul(gram, gram));
        x = axpby(a, x, 1.0, matmul(poly, x));
    }
    return tall ? transpose(x) : x;
}

inline Mat ref_sharp(const dm_sharp_config &config, const Mat &m) {
    Mat out(m.rows, m.cols);
    switch (config.norm) {
    case DM_NORM_SPECTRAL:
        return ref_newton_schulz(m, config.ns_steps, config.ns_coefficients, config.norm_scale,
                                 config.norm_offset, config.eps);
    case DM_NORM_SIGN:
        for (size_t k = 0; k < m.v.size(); ++k) out.v[k] = (m.v[k] > 0) - (m.v[k] < 0);
        return out;
    case DM_NORM_COLUMN:
        for (int64_t j = 0; j < m.cols; ++j) {
            const double norm = scaled_norm(m.v.data() + j, m.rows, m.cols);
            for (int64_t i = 0; i < m.rows; ++i)
                out(i, j) = divide_clamped(m(i, j), norm, config.eps);
        }
        return out;
    case DM_NORM_ROW:
        for (int64_t i = 0; i < m.rows; ++i) {
            const double norm = scaled_norm(m.v.data() + i * m.cols, m.cols, 1);
            for (int64_t j = 0; j < m.cols; ++j)
                out(i, j) = divide_clamped(m(i, j), norm, config.eps);
        }
        return out;
    case DM_NORM_FROBENIUS: {
        const double norm = frobenius(m);
        for (size_t k = 0; k < m.v.size(); ++k) out.v[k] = divide_clamped(m.v[k], norm, config.eps);
        return out;
    }
    }
    return out;
}

// ---- one-sided Jacobi SVD (Hestenes)
// --------------------------------------------------------------

struct Svd {
    Mat u;                 // rows x r, orthonormal columns (r = min(rows, cols))
    std::vector<double> s; // r singular values, unsorted
    Mat v;                 // cols x r, orthonormal columns
};

// A = U diag(s) V^T by rotating column pairs of A until they are mutually orthogonal.
inline Svd jacobi_svd(const Mat &a) {
    if (a.rows < a.cols) {
        Svd t = jacobi_svd(transpose(a));
        return Svd{t.v, t.s, t.u};
    }
    const int64_t m = a.rows, n = a.cols;
    Mat w = a, v = identity(n);
    for (int sweep = 0; sweep < 100; ++sweep) {
        double off = 0.0;
        for (int64_t p = 0; p < n - 1; ++p)
            for (int64_t q = p + 1; q < n; ++q) {
                double alpha = 0.0, beta = 0.0, gamma = 0.0;
                for (int64_t i = 0; i < m; ++i) {
                    alpha += w(i, p) * w(i, p);
                    beta += w(i, q) * w(i, q);
                    gamma += w(i, p) * w(i, q);
                }
                if (alpha == 0.0 || beta == 0.0) continue;
                const double cosine = std::fabs(gamma) / std::sqrt(alpha * beta);
                off = std::max(off, cosine);
                if (cosine < 1e-15) continue;
                const double zeta = (beta - alpha) / (2.0 * gamma);
                const double t =
                    (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1.0 + zeta * zeta));
                const double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
                for (int64_t i = 0; i < m; ++i) {
                    const double wp = w(i, p), wq = w(i, q);
                    w(i, p) = c * wp - s * wq;
                    w(i, q) = s * wp + c * wq;
                }
                for (int64_t i = 0; i < n; ++i) {
                    const double vp = v(i, p), vq = v(i, q);
                    v(i, p) = c * vp - s * vq;
                    v(i, q) = s * vp + c * vq;
                }
            }
        if (off < 1e-15) break;
    }
    Svd out{Mat(m, n), std::vector<double>(static_cast<size_t>(n)), v};
    for (int64_t j = 0; j < n; ++j) {
        const double norm = scaled_norm(w.v.data() + j, m, n);
        out.s[static_cast<size_t>(j)] = norm;
        for (int64_t i = 0; i < m; ++i) out.u(i, j) = norm > 0.0 ? w(i, j) / norm : 0.0;
    }
    return out;
}

// U V^T of a full-rank matrix: the exact polar factor that Newton-Schulz approximates.
inline Mat polar_factor(const Mat &a) {
    const Svd svd = jacobi_svd(a);
    return matmul(svd.u, transpose(svd.v));
}

inline std::vector<double> singular_values(const Mat &a) {
    std::vector<double> s = jacobi_svd(a).s;
    std::sort(s.begin(), s.end());
    return s;
}

// The spectral norm (largest singular value) in float64.
inline double spectral_norm(const Mat &a) { return singular_values(a).back(); }

// ---- moving matrices between Mat and user buffers -----------------------------------------------

// A rows x cols matrix stored with leading dimension ld; the padding holds pad_value.
inline Buffer to_buffer(const Mat &m, dm_dtype dtype, int64_t ld, double pad_value = 0.0) {
    Buffer buf(dtype, static_cast<size_t>(m.rows * ld));
    buf.fill(pad_value);
    for (int64_t i = 0; i < m.rows; ++i)
        for (int64_t j = 0; j < m.cols; ++j) buf.set(static_cast<size_t>(i * ld + j), m(i, j));
    return buf;
}

inline Mat from_buffer(const Buffer &buf, int64_t rows, int64_t cols, int64_t ld) {
    Mat m(rows, cols);
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) m(i, j) = buf.get(static_cast<size_t>(i * ld + j));
    return m;
}

inline bool all_finite(const Mat &m) {
    for (double x : m.v)
        if (!std::isfinite(x)) return false;
    return true;
}

// ---- calling the kernels with exactly the workspace they ask for
// ---------------------------------

inline std::vector<const void *> const_pointers(std::vector<Buffer> &bufs) {
    std::vector<const void *> p;
    for (Buffer &b : bufs) p.push_back(b.data());
    return p;
}

inline std::vector<void *> pointers(std::vector<Buffer> &bufs) {
    std::vector<void *> p;
    for (Buffer &b : bufs) p.push_back(b.data());
    return p;
}

// dm_sharp on buffers; the workspace is exactly dm_sharp_workspace_size() bytes.
inline dm_status call_sharp(const dm_sharp_config &config, dm_dtype dtype, int64_t rows,
                            int64_t cols, std::vector<Buffer> &inputs, int64_t in_ld,
                            std::vector<Buffer> &outputs, int64_t out_ld, double *duals,
                            const dm_gemm_provider *gemm = nullptr) {
    const int64_t batch = static_cast<int64_t>(inputs.size());
    size_t bytes = 0;
    const dm_status size_status =
        dm_sharp_workspace_size(&config, dtype, batch, rows, cols, &bytes);
    if (size_status != DM_OK) return size_status;
    std::vector<unsigned char> workspace(bytes);
    std::vector<const void *> in = const_pointers(inputs);
    std::vector<void *> out = pointers(outputs);
    return dm_sharp(&config, dtype, batch, rows, cols, in.data(), in_ld, out.data(), out_ld, duals,
                    bytes ? workspace.data() : nullptr, bytes, gemm);
}

// dm_sharp on one float64 matrix (contiguous), returned as a Mat.
inline Mat sharp_f64(const dm_sharp_config &config, const Mat &m, dm_status *status,
                     double *dual = nullptr, dm_dtype dtype = DM_FLOAT64) {
    std::vector<Buffer> in{to_buffer(m, dtype, m.cols)}, out{Buffer(dtype, m.v.size())};
    *status = call_sharp(config, dtype, m.rows, m.cols, in, m.cols, out, m.cols, dual);
    return from_buffer(out[0], m.rows, m.cols, m.cols);
}

inline dm_sharp_config muon_config(double coefficients[15]) {
    dm_sharp_config config{};
    dm_sharp_config_muon(&config, coefficients);
    return config;
}

inline dm_sharp_config polar_express_config() {
    dm_sharp_config config{};
    config.norm = DM_NORM_SPECTRAL;
    config.ns_steps = DM_POLAR_EXPRESS_STEPS;
    config.ns_coefficients = dm_polar_express_coefficients;
    config.norm_scale = 1.02;
    config.norm_offset = 1e-6;
    config.eps = 1e-7;
    config.ns_precision = DM_NS_NATIVE;
    return config;
}

inline dm_sharp_config simple_config(dm_norm norm, double eps = 1e-7) {
    dm_sharp_config config{};
    config.norm = norm;
    config.eps = eps;
    config.norm_scale = 1.0;
    return config;
}

// The configuration a test uses for a norm: Muon's (its schedule written into coefficients) for
// SPECTRAL, simple_config otherwise.
inline dm_sharp_config sharp_config_for(dm_norm norm, double coefficients[15]) {
    return norm == DM_NORM_SPECTRAL ? muon_config(coefficients) : simple_config(norm);
}

// Every storage dtype and every norm, for the tests that run each case.
inline constexpr dm_dtype kDtypes[] = {DM_FLOAT32, DM_FLOAT64, DM_BFLOAT16};
inline constexpr dm_norm kNorms[] = {DM_NORM_SPECTRAL, DM_NORM_SIGN, DM_NORM_COLUMN, DM_NORM_ROW,
                                     DM_NORM_FROBENIUS};

inline const char *norm_name(dm_norm norm) {
    switch (norm) {
    case DM_NORM_SPECTRAL: return "spectral";
    case DM_NORM_SIGN: return "sign";
    case DM_NORM_COLUMN: return "column";
    case DM_NORM_ROW: return "row";
    case DM_NORM_FROBENIUS: return "frobenius";
    }
    return "?";
}

} // namespace dmtest

#endif // DROPMUON_TESTS_C_REFERENCE_H
