"""Optimiser and schedule (docs/spec.md, section 6): AdamW without weight decay on
biases, norms and the logit scale; linear warm-up then cosine decay to 0."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norm gains, embeddings' 1-D scales and
    the logit scale (all 1-D or 0-D) do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int):
    """lr multiplier at step: (step + 1) / warmup during warm-up, then cosine to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int, fused: bool = False):
    """(AdamW, LambdaLR). A torch optimiser, so DeepSpeed compiles nothing."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
    return optimizer, schedule
