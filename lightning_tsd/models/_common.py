"""Mask helpers shared by the reference models (plain torch).

A mask is ``(B, T)`` bool, True on real steps; ``None`` means every step is real.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def zero_padded(h: Tensor, mask: Tensor | None) -> Tensor:
    """Return ``h`` (``(B, C, T)``) with padded steps set to 0, so they cannot leak into a convolution."""
    if mask is None:
        return h
    return h.masked_fill(~mask.unsqueeze(1), 0.0)


def masked_mean(h: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Mean of ``h`` over its time axis ``dim`` (``-1`` for ``(B, C, T)``, ``1`` for ``(B, T, C)``),
    counting real steps only."""
    if mask is None:
        return h.mean(dim=dim)
    m = mask.unsqueeze(1) if dim == -1 else mask.unsqueeze(-1)
    m = m.to(h.dtype)
    return (h * m).sum(dim=dim) / m.sum(dim=dim).clamp_min(1.0)


def masked_max(h: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Max of ``h`` over its time axis ``dim``, over real steps only (see :func:`masked_mean`)."""
    if mask is None:
        return h.amax(dim=dim)
    m = mask.unsqueeze(1) if dim == -1 else mask.unsqueeze(-1)
    return h.masked_fill(~m, float("-inf")).amax(dim=dim)


def last_real(h: Tensor, mask: Tensor | None) -> Tensor:
    """The ``(B, T, C)`` state ``h`` at each sample's last real step, as ``(B, C)``."""
    if mask is None:
        return h[:, -1]
    steps = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, steps, -1).amax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last]


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


def activation_layer(name: str) -> nn.Module:
    """A new activation module by name (:data:`ACTIVATIONS`).

    ReLU has a zero second derivative, so a saliency loss differentiated through a ReLU network cannot
    move where its units switch on; GELU, SiLU and softplus are smooth, and can.

    Example:
        >>> activation_layer("silu")
        SiLU()
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class SameConv1d(nn.Conv1d):
    """A ``Conv1d`` that keeps the length ``T`` for any kernel size (zero padding; for an even kernel the
    extra step goes on the right, as ``padding="same"`` does, without its warning)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size[0]
        return super().forward(F.pad(x, ((k - 1) // 2, k // 2)) if k > 1 else x)


class TimeSeriesModel(nn.Module):
    """Base of the reference models: records the init arguments in ``init_args`` so that
    ``type(model)(**model.init_args)`` rebuilds the architecture (a checkpoint stores only plain data)."""

    def __init__(self, **init_args: int | float | str) -> None:
        super().__init__()
        self.init_args = dict(init_args)
