"""An ensemble of teachers as one model (plain torch): the mean of the members' probabilities.

``TeacherEnsemble([t1, ..., tn])`` is an ``nn.Module`` whose logits are ``log(mean_i softmax(z_i))``, so
everything that takes a teacher takes it: its saliency is that of the ensemble's prediction, the teacher
cache stores its outputs, and a teacher file rebuilds it (its ``init_args`` hold the members' specs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tsd._batch import call_model
from lightning_tsd.adapters import auto_adapt
from lightning_tsd.checkpoint import build_from_spec, load_teacher, model_spec

__all__ = ["TeacherEnsemble", "ensemble_log_probs"]


def ensemble_log_probs(logits: Sequence[Tensor]) -> Tensor:
    """``log(mean_i softmax(z_i))`` of ``n`` logits tensors ``(B, K)``, computed stably as
    ``logsumexp_i log_softmax(z_i) - log n``.

    Example:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> ensemble_log_probs([z, z]).exp()
        tensor([[0.5000, 0.5000]])
    """
    shapes = [tuple(z.shape) for z in logits]
    if not shapes:
        raise ValueError("an ensemble needs at least one member's logits")
    if len(set(shapes)) != 1:
        classes = [s[-1] for s in shapes]
        raise ValueError(
            f"ensemble members must predict the same number of classes, got {classes} (member i predicts "
            "the i-th count); train every member on the same classes"
        )
    log_probs = torch.stack([torch.log_softmax(z, dim=-1) for z in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(shapes))


def _as_member(member: Any, position: int) -> nn.Module:
    if isinstance(member, nn.Module):
        return auto_adapt(member)
    if isinstance(member, dict) and "class_path" in member:
        return build_from_spec(member)
    if isinstance(member, (str, os.PathLike)):
        return load_teacher(member)
    raise TypeError(
        f"ensemble member {position} must be a torch.nn.Module, a teacher file path or a "
        f"{{'class_path', 'init_args'}} dict, got {type(member).__name__}"
    )


class TeacherEnsemble(nn.Module):
    """Teachers averaged in probability: ``forward(x, mask=None)`` returns ``log(mean_i softmax(z_i))``
    ``(B, K)``, each member called with the mask when its forward takes one.

    Args:
        members: the teachers: modules (raw Hugging Face time-series classifiers are adapted), teacher
            file paths, or ``{"class_path", "init_args"}`` specs. All must predict the same ``K``.

    ``init_args`` is ``{"members": [spec, ...]}`` when every member's spec is known (the reference models
    record theirs), so :func:`lightning_tsd.save_teacher` writes an ensemble as one teacher file and
    :func:`lightning_tsd.load_teacher` rebuilds it; it is None otherwise.

    Example:
        >>> from lightning_tsd.models import FCN
        >>> ensemble = TeacherEnsemble([FCN(1, 3), FCN(1, 3)]).eval()
        >>> with torch.no_grad():
        ...     probs = ensemble(torch.randn(4, 1, 32)).exp()
        >>> probs.shape, torch.allclose(probs.sum(dim=1), torch.ones(4))
        (torch.Size([4, 3]), True)
    """

    def __init__(self, members: Sequence[nn.Module | str | os.PathLike | dict[str, Any]]) -> None:
        super().__init__()
        if isinstance(members, (nn.Module, str, os.PathLike, dict)) or not isinstance(members, Sequence):
            raise TypeError(
                "TeacherEnsemble takes a list of teachers, e.g. TeacherEnsemble([t1, t2]); "
                f"got {type(members).__name__}"
            )
        if not members:
            raise ValueError("TeacherEnsemble needs at least one member")
        self.members = nn.ModuleList(_as_member(m, i) for i, m in enumerate(members))

    @property
    def init_args(self) -> dict[str, Any] | None:
        """``{"members": [spec, ...]}`` that rebuilds the ensemble, or None if a member's spec is unknown."""
        specs = [model_spec(m) for m in self.members]
        if any(spec is None for spec in specs):
            return None
        return {"members": specs}

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The ensemble's logits ``log(mean_i softmax(z_i))`` ``(B, K)`` for ``x`` ``(B, C, T)``."""
        return ensemble_log_probs([call_model(m, x, mask) for m in self.members])

    def extra_repr(self) -> str:
        return f"{len(self.members)} members, logits = log(mean of the members' probabilities)"
