"""AdamW for the parameters on the ``"adamw"`` norm (``fallback="adamw"``: the usual "Muon for
matrices, AdamW for the rest"), with torch.optim.AdamW's arithmetic and state key names
(``step``, ``exp_avg``, ``exp_avg_sq``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

ADAMW_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def adamw_step_(params: list[Tensor], state, group: dict) -> None:
    """One AdamW step in place for ``params`` (all of ``group``) from their ``.grad``. The lr is
    the group's lr times its ``adamw_lr_ratio``, so LR schedulers scale both."""
    lr = float(group["lr"]) * group["adamw_lr_ratio"]
    beta1, beta2 = group["betas"]
    for p in params:
        s = state[p]
        if "step" not in s:
            s["step"] = torch.tensor(0.0)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["step"] += 1
        step = s["step"].item()
        p.mul_(1 - lr * group["weight_decay"])
        s["exp_avg"].lerp_(p.grad, 1 - beta1)
        s["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        denom = (s["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["adamw_eps"])
        p.addcdiv_(s["exp_avg"], denom, value=-lr / bias1)
