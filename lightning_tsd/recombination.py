"""Saliency-guided recombination: transfer points on which a shortcut and the teacher disagree.

A student distilled on data where an artefact predicts the teacher's class can learn the artefact instead of
the teacher's evidence, and no saliency loss on those data stops it: the local gradient of a student that
follows a 3-step spike is no larger at the spike than anywhere else (``benchmarks/behaviour``). The teacher's
maps say which steps it uses; this module turns that into inputs. Each series keeps its steps that the
teacher's (smoothed) map ranks in the top ``keep`` fraction and takes all other steps from a partner series
of another teacher class. The teacher, queried on the new series, keeps its prediction where its evidence
was kept; whatever else in the partner (its artefact included) now co-occurs with the *other* class. The
distiller trains the student with the base loss on these points (``recombination_weight``).

Plain torch; no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tsd.behaviour import top_steps
from lightning_tsd.losses import smooth_saliency

__all__ = ["kept_steps", "other_class_partners", "recombine"]


def kept_steps(saliency: Tensor, keep: float, mask: Tensor | None = None, smoothing: int = 1) -> Tensor:
    """``(B, T)`` bool: the top ``keep`` fraction of each map's real steps (at least one; ties go to the
    earlier step: :func:`~lightning_tsd.behaviour.top_steps`), after a moving average of ``smoothing`` steps
    (so that kept steps form segments, not isolated points).

    Example:
        >>> kept_steps(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), 0.5).tolist()
        [[False, True, False, True]]
    """
    if not 0.0 < keep < 1.0:
        raise ValueError(f"recombination keep must lie in (0, 1), got {keep!r}")
    return top_steps(smooth_saliency(saliency.detach().float(), smoothing, mask), keep, mask)


def other_class_partners(classes: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``(B,)`` row indices: for each row, a random row of the batch with another class; a row whose class
    is the only one in the batch gets a random other row (itself in a batch of one).

    Example:
        >>> partners = other_class_partners(torch.tensor([0, 0, 1]))
        >>> partners[2].item() in (0, 1), partners[0].item()
        (True, 2)
    """
    batch = classes.shape[0]
    differs = classes.unsqueeze(0) != classes.unsqueeze(1)  # (B, B): row i, candidate j
    others = ~torch.eye(batch, dtype=torch.bool, device=classes.device)
    pool = torch.where(differs.any(dim=1, keepdim=True), differs, others if batch > 1 else ~others)
    noise = torch.rand(
        batch, batch, generator=generator, device=classes.device if generator is None else generator.device
    )
    return noise.to(classes.device).masked_fill(~pool, -1.0).argmax(dim=1)


def recombine(
    x: Tensor,
    saliency: Tensor,
    classes: Tensor,
    keep: float = 0.5,
    *,
    mask: Tensor | None = None,
    smoothing: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """New series: each row of ``x`` ``(B, C, T)`` keeps its top-``keep`` steps by the teacher's ``saliency``
    ``(B, T)`` and takes every other step from a partner of another teacher ``classes`` ``(B,)``.

    Args:
        x: the batch.
        saliency: the teacher's maps of ``x`` (any estimator; larger is more important).
        classes: the teacher's predicted classes (partners are drawn among the other classes).
        keep: fraction of each series' real steps kept, in ``(0, 1)``.
        mask: ``(B, T)`` bool, True on real steps; padded steps are kept as they are.
        smoothing: moving-average window of the maps before ranking (default ``max(1, T // 10)``).
        generator: random source of the partners.

    Example:
        >>> x = torch.stack([torch.zeros(1, 4), torch.ones(1, 4)])
        >>> saliency = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
        >>> recombine(x, saliency, torch.tensor([0, 1]), 0.5, smoothing=1)[:, 0].tolist()
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    """
    if x.ndim != 3 or saliency.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"recombine needs x (B, C, T) and saliency (B, T); got {tuple(x.shape)} and {tuple(saliency.shape)}"
        )
    window = smoothing if smoothing is not None else max(1, x.shape[2] // 10)
    kept = kept_steps(saliency, keep, mask, window)
    if mask is not None:
        kept = kept | ~mask  # padded steps stay the series' own
    partner = x[other_class_partners(classes, generator)]
    return torch.where(kept.unsqueeze(1), x, partner)
