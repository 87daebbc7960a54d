"""Parallel training with DropMuon: data parallel (:mod:`.ddp`, whose API is also here) and
FSDP2 (:mod:`.fsdp`)."""

from .ddp import CommStats, all_reduce_gradients, broadcast_parameters, check_replicas, wrap_ddp

__all__ = [
    "CommStats",
    "all_reduce_gradients",
    "broadcast_parameters",
    "check_replicas",
    "wrap_ddp",
]
