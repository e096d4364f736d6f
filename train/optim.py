"""The optimizer, the learning-rate schedule, and the moving average of the weights (EMA)."""

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


# Parameters of these layers get optim.norm_weight_decay (torchvision's recipes: 0).
NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
               torch.nn.LocalResponseNorm)


def param_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """Weight matrices and kernels decay by weight_decay; normalisation layers' parameters by
    norm_weight_decay, other biases by bias_weight_decay, other 1-D parameters not at all.
    With both of those at 0 (the default) the groups are [decay, no decay], as always: old
    checkpoints' optimizer states still load."""
    decay, no_decay, norm, bias = [], [], [], []
    seen = set()  # a shared (tied) parameter is listed once, as model.parameters() does
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if cfg.norm_weight_decay and isinstance(module, NORM_LAYERS):
                norm.append(p)
            elif cfg.bias_weight_decay and name == "bias":
                bias.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if norm:
        groups.append({"params": norm, "weight_decay": cfg.norm_weight_decay})
    if bias:
        groups.append({"params": bias, "weight_decay": cfg.bias_weight_decay})
    return groups


def optimizer_for(model: torch.nn.Module, cfg, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov) over param_groups. Fused (one kernel for all
    parameters, on CPU and CUDA): faster, and it can skip a step on the device (found_inf)."""
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_factor(config):
    """The run's LR multiplier per step: its warm-up, then its schedule over max_steps (or
    optim.decay_steps)."""
    o = config.optim
    return warmup_then(o.schedule, o.warmup_steps, o.decay_steps or config.max_steps,
                       o.min_lr_ratio, o.step_every, o.step_gamma)


def schedule_for(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))


def make_ema(model: torch.nn.Module, cfg) -> torch.optim.swa_utils.AveragedModel | None:
    """A copy of the model for the exponential moving average of its weights and buffers
    (`ema` config section), on the model's device; None when ema.decay is 0."""
    if not cfg.decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    # Its update counter stays on the host (device=None), so deciding whether to copy or to
    # average never waits for the device.
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.decay), use_buffers=True)


def update_ema(ema, model: torch.nn.Module, step: int, cfg) -> None:
    """Average the model in after optimizer step `step` (one of every ema.every_steps); until
    ema.warmup_steps, copy it instead (the average starts from the warmed-up weights)."""
    if step <= cfg.warmup_steps:
        ema.n_averaged.zero_()  # AveragedModel copies when it has averaged nothing yet
    ema.update_parameters(model)
