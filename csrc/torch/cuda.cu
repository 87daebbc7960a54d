// cuda.cu - the CUDA part of the dropmuon operators (dropmuon/aten/operators.h does the checks
// and configs): the C API's CUDA entry points (csrc/cuda) on the current stream, with ATen's
// cuBLAS products as the matrix-product provider. Compiled by nvcc only in the CUDA build
// (setup.py).
//
// Errors: sharp and muon_update_ raise like the CPU kernels, which means waiting for the device
// to learn about NaN/Inf. Inside a CUDA-graph capture they cannot wait: sharp then fills its
// outputs with NaN first (they stay NaN when the input holds NaN/Inf), muon_update_ refuses and
// points to _muon_update_capturable_, whose status tensor carries the error instead.
#include <ATen/ATen.h>
#include <ATen/ops/addmm_cuda_dispatch.h>
#include <ATen/ops/baddbmm_cuda_dispatch.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "dropmuon/aten/operators.h"

namespace dropmuon {
namespace {

// The provider's context: the device of the call, and the message of a failing product (the
// C API can only say DM_ERR_GEMM; the shim then raises with ATen's own words).
struct GemmContext {
    c10::DeviceIndex device;
    std::string error;
};

// dm_gemm_fn over ATen on the current stream (the stream the C API was given): views the
// caller's buffers as strided tensors and lets addmm/baddbmm pick the cuBLAS call (tensor cores
// for bfloat16, float32 accumulation). at::cuda:: calls the CUDA kernels without the dispatcher.
dm_status aten_cuda_gemm(void *ctx, dm_dtype dtype, int trans_a, int trans_b, int64_t batch,
                         int64_t m, int64_t n, int64_t k, double alpha, const void *a, int64_t lda,
                         int64_t stride_a, const void *b, int64_t ldb, int64_t stride_b,
                         double beta, const void *c_in, void *c, int64_t ldc, int64_t stride_c) {
    auto *context = static_cast<GemmContext *>(ctx);
    try {
        const auto options = at::TensorOptions()
                                 .dtype(dtype == DM_FLOAT64    ? at::kDouble
                                        : dtype == DM_BFLOAT16 ? at::kBFloat16
                                                               : at::kFloat)
                                 .device(at::Device(at::kCUDA, context->device));
        auto view = [&](const void *p, int64_t rows, int64_t cols, int64_t ld, int64_t stride,
                        bool transpose) {
            at::Tensor t =
                at::from_blob(const_cast<void *>(p), {batch, rows, cols}, {stride, ld, 1}, options);
            return transpose ? t.transpose(1, 2) : t;
        };
        at::Tensor A = view(a, trans_a ? k : m, trans_a ? m : k, lda, stride_a, trans_a);
        at::Tensor B = view(b, trans_b ? n : k, trans_b ? k : n, ldb, stride_b, trans_b);
        at::Tensor C = view(c, m, n, ldc, stride_c, false);
        at::Tensor C_in = beta == 0.0 || c_in == c ? C : view(c_in, m, n, ldc, stride_c, false);
        if (batch == 1) {
            at::Tensor C0 = C.select(0, 0);
            at::cuda::addmm_out(C0, C_in.select(0, 0), A.select(0, 0), B.select(0, 0), beta, alpha);
        } else {
            at::cuda::baddbmm_out(C, C_in, A, B, beta, alpha);
        }
        return DM_OK;
    } catch (const std::exception &e) {
        context->error = e.what();
        return DM_ERR_GEMM;
    }
}

// Routing knobs of the Newton-Schulz products (dm_cuda_tuning), read at every call so that
// benchmarks and tests can compare the routes in one process:
//   DROPMUON_CUDA_BATCHED_MAX_P    batched kernel for p <= this (default 256; 0: cuBLAS always)
//   DROPMUON_CUDA_SYMMETRIC_MIN_P  cuBLAS: symmetric products by blocks for p >= this
//                                  (default 2048; 0: never)
int64_t env_int(const char *name, int64_t fallback) {
    const char *value = std::getenv(name);
    if (!value || !*value) return fallback;
    char *end = nullptr;
    const long long parsed = std::strtoll(value, &end, 10);
    TORCH_CHECK(end && *end == '\0' && parsed >= 0, "dropmuon: ", name,
                " must be a non-negative integer, got '", value, "'");
    return parsed;
}

dm_cuda_tuning tuning_from_environment() {
    dm_cuda_tuning tuning;
    tuning.batched_max_p = env_int("DROPMUON_CUDA_BATCHED_MAX_P", DM_CUDA_BATCHED_MAX_P);
    tuning.symmetric_min_p = env_int("DROPMUON_CUDA_SYMMETRIC_MIN_P", DM_CUDA_SYMMETRIC_MIN_P);
    return tuning;
}

bool capturing() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// A status -> TORCH_CHECK that also tells a failing product's own message.
void check_status(dm_status status, const char *name, const GemmContext &gemm) {
    TORCH_CHECK(status != DM_ERR_GEMM || gemm.error.empty(), name,
                " failed: DM_ERR_GEMM: the cuBLAS product failed: ", gemm.error);
    TORCH_CHECK(status == DM_OK, name, " failed: ", dm_status_string(status));
}

// The workspace from the caching allocator, on the current stream (freed back to it when the
// tensor goes: later work on this stream is ordered after the kernels that use it; inside a
// capture it comes from the graph's private pool).
at::Tensor workspace(size_t bytes, const at::Device &device) {
    return at::empty({static_cast<int64_t>(bytes)},
                     at::TensorOptions().dtype(at::kByte).device(device));
}

void *data_or_null(const at::Tensor &t) { return t.numel() > 0 ? t.mutable_data_ptr() : nullptr; }

// Runs dm_cuda_update on checked lists; hyperparameters/status: device pointers or nullptr.
at::Tensor run_update(const dm_update_config &config, at::TensorList params, at::TensorList grads,
                      at::TensorList momentum_buffers, const double *hyperparameters,
                      int32_t *status, bool with_duals) {
    const at::Tensor &first = params[0];
    const c10::cuda::CUDAGuard guard(first.device());
    const UpdateArgs args = gather_update_args(params, grads, momentum_buffers);
    size_t bytes = 0;
    DMI_TORCH_CHECK_STATUS(dm_cuda_update_workspace_size(&config, args.dtype, args.batch, args.rows,
                                                         args.cols, &bytes),
                           "dm_cuda_update_workspace_size");
    const at::Tensor ws = workspace(bytes, first.device());
    // With a status the kernels may skip every write: the duals then read NaN, not garbage.
    at::Tensor duals = update_duals(first, args.batch, with_duals, status != nullptr);
    GemmContext context{first.device().index(), {}};
    const dm_gemm_provider gemm = {&aten_cuda_gemm, &context, nullptr};
    const dm_cuda_tuning tuning = tuning_from_environment();
    const dm_status st = dm_cuda_update(
        &config, args.dtype, args.batch, args.rows, args.cols, args.params.data(),
        args.grads.data(), args.momentum_buffers.data(), duals_or_null(duals), data_or_null(ws),
        bytes, &gemm, reinterpret_cast<const dm_cuda_update_hyperparameters *>(hyperparameters),
        status, &tuning, c10::cuda::getCurrentCUDAStream().stream());
    check_status(st, "dm_cuda_update", context);
    return duals;
}

struct Cuda {
    static constexpr at::DeviceType type = at::kCUDA;

    static std::tuple<at::Tensor, at::Tensor> sharp(const dm_sharp_config &config,
                                                    const at::Tensor &input, bool with_duals) {
        const c10::cuda::CUDAGuard guard(input.device());
        SharpArgs args = gather_sharp_args(input, with_duals);
        size_t bytes = 0;
        DMI_TORCH_CHECK_STATUS(dm_cuda_sharp_workspace_size(&config, args.dtype, args.batch,
                                                            args.rows, args.cols, &bytes),
                               "dm_cuda_sharp_workspace_size");
        const at::Tensor ws = workspace(bytes, args.in.device());
        // Inside a capture nothing may wait: a NaN/Inf input then leaves these NaN fills in place.
        at::Tensor status;
        if (capturing()) {
            status = at::zeros({1}, args.in.options().dtype(at::kInt));
            args.out.fill_(std::numeric_limits<double>::quiet_NaN());
            args.duals.fill_(std::numeric_limits<double>::quiet_NaN());
        }
        GemmContext context{args.in.device().index(), {}};
        const dm_gemm_provider gemm = {&aten_cuda_gemm, &context, nullptr};
        const dm_cuda_tuning tuning = tuning_from_environment();
        const dm_status st =
            dm_cuda_sharp(&config, args.dtype, args.batch, args.rows, args.cols, args.inputs.data(),
                          args.cols, args.outputs.data(), args.cols,
                          with_duals ? static_cast<double *>(data_or_null(args.duals)) : nullptr,
                          data_or_null(ws), bytes, &gemm,
                          status.defined() ? status.mutable_data_ptr<int32_t>() : nullptr, &tuning,
                          c10::cuda::getCurrentCUDAStream().stream());
        check_status(st, "dm_cuda_sharp", context);
        return {args.out, args.duals};
    }

    static void check_not_capturing() {
        TORCH_CHECK(!capturing(),
                    "dropmuon.muon_update_ waits for the device to report NaN/Inf, so it cannot be "
                    "captured in a CUDA graph; use torch.ops.dropmuon._muon_update_capturable_ "
                    "(hyperparameters and status as device tensors)");
    }

    static at::Tensor update(const dm_update_config &config, at::TensorList params,
                             at::TensorList grads, at::TensorList momentum_buffers,
                             bool with_duals) {
        return run_update(config, params, grads, momentum_buffers, nullptr, nullptr, with_duals);
    }

    static void check_capturable_inputs(const at::Tensor &hyperparameters, const at::Tensor &status,
                                        const char *op) {
        TORCH_CHECK(hyperparameters.is_cuda() && status.is_cuda(), op,
                    ": hyperparameters and status must be CUDA tensors, got ",
                    hyperparameters.device(), " and ", status.device());
        check_capturable_tensors(hyperparameters, status, op, true);
    }

    // The kernels read the values on the device and report into status: nothing waits.
    static at::Tensor update_capturable(const dm_update_config &config, at::TensorList params,
                                        at::TensorList grads, at::TensorList momentum_buffers,
                                        const at::Tensor &hyperparameters, const at::Tensor &status,
                                        bool with_duals) {
        return run_update(config, params, grads, momentum_buffers,
                          hyperparameters.const_data_ptr<double>(),
                          status.mutable_data_ptr<int32_t>(), with_duals);
    }
};

} // namespace

TORCH_LIBRARY_IMPL(dropmuon, CUDA, m) { register_operators<Cuda>(m); }

} // namespace dropmuon
