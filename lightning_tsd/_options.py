"""The distiller's option checks and its optimizer and scheduler factories (plain torch).

Every option is checked when the distiller is built, so a typo in a config fails before the fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from lightning_tsd.gradients import TSD_GRADIENTS
from lightning_tsd.losses import BASE_LOSSES

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
SCHEDULERS = ("cosine", "onecycle")


def check_options(base_loss: Any, optimizer: Any, hparams: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of the distiller's options that is out of its range.

    Example:
        >>> options = {"tsd_weight": -1.0, "tsd_warmup": 0.0, "tsd_start": 0.0, "tsd_every_n_steps": 1,
        ...            "tsd_gradient": "sum", "scheduler": None}
        >>> check_options("kd", "adam", options)
        Traceback (most recent call last):
        ...
        ValueError: tsd_weight must be a finite number >= 0, got -1.0
    """
    tsd_weight, tsd_warmup, tsd_start = hparams["tsd_weight"], hparams["tsd_warmup"], hparams["tsd_start"]
    tsd_every_n_steps, tsd_gradient = hparams["tsd_every_n_steps"], hparams["tsd_gradient"]
    scheduler = hparams["scheduler"]
    recombination_weight = hparams.get("recombination_weight", 0.0)
    recombination_keep = hparams.get("recombination_keep", 0.5)
    tsd_fraction = hparams.get("tsd_fraction", 1.0)
    if not (callable(base_loss) or base_loss in BASE_LOSSES):
        raise ValueError(
            f"unknown base_loss {base_loss!r}; choose one of {list(BASE_LOSSES)} or pass a callable"
        )
    if tsd_weight < 0 or not math.isfinite(tsd_weight):
        raise ValueError(f"tsd_weight must be a finite number >= 0, got {tsd_weight}")
    if recombination_weight < 0 or not math.isfinite(recombination_weight):
        raise ValueError(f"recombination_weight must be a finite number >= 0, got {recombination_weight}")
    if not 0.0 < recombination_keep < 1.0:
        raise ValueError(
            f"recombination_keep is the fraction of each series' steps kept, in (0, 1), got {recombination_keep}"
        )
    if not 0.0 <= tsd_warmup < 1.0:
        raise ValueError(f"tsd_warmup is a fraction of the fit in [0, 1), got {tsd_warmup}")
    if not 0.0 <= tsd_start < 1.0:
        raise ValueError(f"tsd_start is a fraction of the fit in [0, 1), got {tsd_start}")
    if tsd_every_n_steps < 1:
        raise ValueError(f"tsd_every_n_steps must be >= 1, got {tsd_every_n_steps}")
    for flag in ("tsd_every_n_scale", "teacher_cache_precompute"):
        if not isinstance(hparams.get(flag, False), bool):
            raise ValueError(f"{flag} must be True or False, got {hparams[flag]!r}")
    if isinstance(tsd_fraction, bool) or not (
        isinstance(tsd_fraction, (int, float)) and 0 < tsd_fraction <= 1
    ):
        raise ValueError(
            f"tsd_fraction is the fraction of each batch the TSD term sees, in (0, 1], got {tsd_fraction!r}"
        )
    if tsd_gradient not in TSD_GRADIENTS:
        raise ValueError(f"tsd_gradient must be one of {list(TSD_GRADIENTS)}, got {tsd_gradient!r}")
    if not (callable(optimizer) or optimizer in OPTIMIZERS):
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)} or pass a callable"
        )
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose None or one of {list(SCHEDULERS)}")


def build_optimizer(
    params: Iterable[torch.Tensor],
    optimizer: str | Callable[..., torch.optim.Optimizer],
    lr: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The optimizer by name (``lr``, ``weight_decay``), or ``optimizer(params)`` for a callable."""
    if callable(optimizer):
        return optimizer(params)
    build: Callable[..., torch.optim.Optimizer] = OPTIMIZERS[optimizer]  # Optimizer's own __init__ has no lr
    return build(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, scheduler: str, lr: float, total_steps: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing over the fit, or one-cycle, stepped every optimizer step."""
    total = max(1, int(total_steps))
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)


def tsd_weight_at(
    step: int,
    total_steps: float | None,
    weight: float,
    start: float,
    warmup: float,
    every_n_steps: int,
    *,
    scale_by_n: bool = False,
) -> float:
    """``w_tsd`` at optimizer step ``step`` of ``total_steps``: 0 off the ``every_n_steps`` grid (and
    ``every_n_steps * weight`` on it with ``scale_by_n``, the same mean weight per step) and before
    ``start * total_steps``, then ramped linearly over ``warmup * total_steps`` steps.

    Example:
        >>> [tsd_weight_at(s, 10, 1.0, start=0.2, warmup=0.4, every_n_steps=1) for s in range(0, 10, 2)]
        [0.0, 0.0, 0.5, 1.0, 1.0]
        >>> [tsd_weight_at(s, None, 0.5, 0.0, 0.0, every_n_steps=4, scale_by_n=True) for s in range(5)]
        [2.0, 0.0, 0.0, 0.0, 2.0]
    """
    if weight == 0 or step % every_n_steps:
        return 0.0
    if scale_by_n:
        weight = weight * every_n_steps
    if total_steps is None or not (warmup > 0 or start > 0):
        return weight
    begin = int(start * total_steps)
    if step < begin:
        return 0.0
    if warmup <= 0:
        return weight
    return weight * min(1.0, (step - begin) / max(1, int(warmup * total_steps)))
