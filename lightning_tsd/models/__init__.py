"""Reference time-series classifiers: teachers (``InceptionTime``, ``ResNet1d``, ``FCN``) and small students
(``NarrowFCN``, ``GRUClassifier``, ``TransformerClassifier``).

Every model is built as ``Model(in_channels, num_classes, **options)`` from plain int/float/str/bool
arguments (kept in ``model.init_args``), takes ``x`` ``(B, C, T)`` and an optional ``mask`` ``(B, T)``
(bool, True on real steps) and returns logits ``(B, K)``. With a mask, padded steps do not affect the logits.
"""

from __future__ import annotations

from torch import nn

from lightning_tsd.models.fcn import FCN, NarrowFCN
from lightning_tsd.models.gru import GRUClassifier
from lightning_tsd.models.inception_time import InceptionTime
from lightning_tsd.models.resnet import ResNet1d
from lightning_tsd.models.transformer import TransformerClassifier

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (InceptionTime, ResNet1d, FCN, NarrowFCN, GRUClassifier, TransformerClassifier)
}


def build_model(
    name: str, in_channels: int, num_classes: int, **kwargs: int | float | str | bool
) -> nn.Module:
    """Build a registered model by its class name (case-insensitive).

    Args:
        name: a key of :data:`MODEL_REGISTRY`, e.g. ``"InceptionTime"`` or ``"narrowfcn"``.
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        **kwargs: further init arguments of the model.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.

    Example:
        >>> build_model("NarrowFCN", in_channels=1, num_classes=3).head.out_features
        3
    """
    by_lower = {key.lower(): cls for key, cls in MODEL_REGISTRY.items()}
    cls = by_lower.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_REGISTRY)}")
    return cls(in_channels, num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``).

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "FCN",
    "MODEL_REGISTRY",
    "GRUClassifier",
    "InceptionTime",
    "NarrowFCN",
    "ResNet1d",
    "TransformerClassifier",
    "build_model",
    "count_parameters",
]
