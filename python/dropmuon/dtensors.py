"""DTensor helpers shared by the step math and the FSDP2 support (:mod:`dropmuon.distributed.fsdp`).

A parameter that ``torch.distributed.fsdp.fully_shard`` made is a DTensor whose local tensor
holds this rank's rows; elementwise work (momentum, AdamW, the parameter step) runs on those
local tensors, never through DTensor's dispatch (which would add communication).
"""

from __future__ import annotations

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (the same storage: in-place work on it updates the
    DTensor), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t
