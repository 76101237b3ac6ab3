"""Where double backward works: the kernels and modes a saliency forward runs under.

Student saliency is differentiated again (``create_graph=True``), and several kernels have no double
backward: the CPU flash-attention kernel (dropout 0 or eval mode), cuDNN RNNs (which also have no backward
in eval mode), graphs compiled by ``torch.compile``. fp16 inner gradients are not loss-scaled, and
train-mode BatchNorm couples the samples of a batch. :func:`saliency_kernels`, :func:`unwrap_compiled` and
:func:`batchnorm_eval` step around each. Plain torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["batchnorm_eval", "saliency_kernels", "train_mode_batchnorms", "unwrap_compiled"]


@contextlib.contextmanager
def saliency_kernels(device: torch.device | str) -> Iterator[None]:
    """Select kernels that support double backward, for the saliency forward only: attention on the math
    backend (the CPU flash kernel has no double backward), cuDNN off (cuDNN RNNs have no double backward,
    nor any backward in eval mode), autocast off (fp16 input gradients underflow and the inner
    ``autograd.grad`` is not loss-scaled: maps are fp32).

    Example:
        >>> with saliency_kernels("cpu"):
        ...     pass
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device_type = torch.device(device).type
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if device_type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        if device_type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Return the original module behind ``torch.compile`` (compiled graphs refuse double backward).

    The original module shares its parameters with the compiled one, so training it trains both.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> unwrap_compiled(net) is net
        True
    """
    return getattr(model, "_orig_mod", model)


def train_mode_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that are in train mode (their forward couples the samples of a batch).

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2))
        >>> len(train_mode_batchnorms(net)), len(train_mode_batchnorms(net.eval()))
        (1, 0)
    """
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


@contextlib.contextmanager
def batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Put train-mode BatchNorm layers in eval mode (running statistics, no update) for a while.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2))
        >>> with batchnorm_eval(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    layers = train_mode_batchnorms(model)
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()
