/* status.c - status names and the library version. */
#include "internal.h"

const char *dm_status_string(dm_status status) {
    switch (status) {
    case DM_OK: return "DM_OK: success";
    case DM_ERR_INVALID_ARG: return "DM_ERR_INVALID_ARG: invalid argument (NULL or out of range)";
    case DM_ERR_SHAPE: return "DM_ERR_SHAPE: invalid sizes or leading dimension";
    case DM_ERR_DTYPE: return "DM_ERR_DTYPE: unsupported dtype";
    case DM_ERR_WORKSPACE: return "DM_ERR_WORKSPACE: workspace missing or too small";
    case DM_ERR_NONFINITE: return "DM_ERR_NONFINITE: NaN or Inf in the input";
    case DM_ERR_PROBABILITY:
        return "DM_ERR_PROBABILITY: probabilities must be finite, >= 0 and sum to 1";
    case DM_ERR_GEMM: return "DM_ERR_GEMM: the matrix-product provider failed";
    case DM_ERR_CUDA: return "DM_ERR_CUDA: a CUDA call failed";
    }
    return "DM_ERR_UNKNOWN: not a dm_status value";
}

int dm_version(void) {
    return DM_VERSION_MAJOR * 10000 + DM_VERSION_MINOR * 100 + DM_VERSION_PATCH;
}
