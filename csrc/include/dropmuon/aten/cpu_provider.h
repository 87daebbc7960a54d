// dropmuon/aten/cpu_provider.h - what the C core needs from torch on the CPU: a matrix-product
// provider over ATen's BLAS and torch's intra-op thread pool, a per-thread workspace, and the
// update call on them. Shared by the operators (csrc/torch/cpu.cpp) and the C++ frontend's
// optimizer (csrc/cpp/optim.cpp), so that both run the same products on the same threads and
// their results agree bit for bit.
#pragma once

#include <cstddef>

#include "dropmuon/aten/operators.h"
#include "dropmuon/dropmuon.h"

namespace dropmuon {

// dm_gemm_fn over at::cpu::addmm_out / baddbmm_out, dm_parallel_for_fn over at::parallel_for.
const dm_gemm_provider *cpu_provider();

// The calling thread's workspace of at least `bytes`, kept and grown, never shrunk.
void *cpu_workspace(size_t bytes);

// dm_update on checked lists (gather_update_args) with the thread's workspace and cpu_provider();
// duals may be NULL. Raises if the workspace query fails; returns dm_update's status, for the
// caller to raise or report.
dm_status cpu_update(const dm_update_config &config, const UpdateArgs &args, double *duals);

} // namespace dropmuon
