"""AdamW for the parameters on the ``"adamw"`` norm (``fallback="adamw"``: the usual "Muon for
matrices, AdamW for the rest"), with torch.optim.AdamW's arithmetic and state key names
(``step``, ``exp_avg``, ``exp_avg_sq``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..dtensors import local_tensor

ADAMW_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def adamw_initial_state(s: dict, p: Tensor) -> None:
    """AdamW's state of ``p`` before its first step (zeros; moments shaped and placed like
    ``p``, a DTensor for a DTensor), where missing."""
    if "step" not in s:
        s["step"] = torch.tensor(0.0)
        s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def adamw_step_(params: list[Tensor], state, group: dict) -> None:
    """One AdamW step in place for ``params`` (all of ``group``) from their ``.grad``. The lr is
    the group's lr times its ``adamw_lr_ratio``, so LR schedulers scale both. DTensor
    parameters (FSDP2) are updated on their local shards."""
    lr = float(group["lr"]) * group["adamw_lr_ratio"]
    beta1, beta2 = group["betas"]
    for p in params:
        s = state[p]
        adamw_initial_state(s, p)
        s["step"] += 1
        step = s["step"].item()
        x, grad = local_tensor(p), local_tensor(p.grad)
        exp_avg, exp_avg_sq = local_tensor(s["exp_avg"]), local_tensor(s["exp_avg_sq"])
        x.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["adamw_eps"])
        x.addcdiv_(exp_avg, denom, value=-lr / bias1)
