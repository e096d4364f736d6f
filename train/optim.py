"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def warmup_then(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
                step_every: int = 1000, step_gamma: float = 0.1):
    """LR multiplier per step (LambdaLR): linear warm-up, then the schedule. Counted in the
    loop's steps on every rank: the scheduler is stepped once per step, never once per process,
    and skipped steps count too."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = step - warmup_steps
        progress = min(1.0, done / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1 - (1 - min_ratio) * progress
        if schedule == "step":
            return step_gamma ** (done // step_every)
        return 1.0  # constant

    return factor


def optimizer_for(model: torch.nn.Module, cfg, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' 1-D parameters. Fused (one kernel
    for all parameters, on CPU and CUDA): faster, and it can skip a step on the device."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_factor(config):
    """The run's LR multiplier per step: its warm-up, then its schedule over max_steps."""
    o = config.optim
    return warmup_then(o.schedule, o.warmup_steps, config.max_steps, o.min_lr_ratio,
                       o.step_every, o.step_gamma)


def schedule_for(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
