"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier per step (LambdaLR). Counted in the loop's steps on every rank: the scheduler
    is stepped once per step, never once per process, and skipped steps count too."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_for(model: torch.nn.Module, cfg, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' 1-D parameters. Fused (one kernel
    for all parameters, on CPU and CUDA): faster, and it can skip a step on the device."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def schedule_for(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine over the run's max_steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        config.optim.warmup_steps, config.max_steps, config.optim.min_lr_ratio))
