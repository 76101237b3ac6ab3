"""Fully convolutional network (Wang et al., 2017) and its narrow student variant."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tsd.models._common import (
    SameConv1d,
    TimeSeriesModel,
    activation_layer,
    masked_mean,
    zero_padded,
)


class FCN(TimeSeriesModel):
    """FCN: three convolution blocks (kernel sizes 8, 5, 3; ``num_filters``, ``2 * num_filters``,
    ``num_filters`` channels; each conv, BN, ReLU), masked global average pooling, a linear head.

    With the defaults (``num_filters=128``), ``in_channels=1`` and ``num_classes=2`` it has **264,450**
    parameters. Padded steps are zeroed before every convolution and left out of the pooling.

    Args:
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        num_filters: channels of the first and last block (the middle one has twice as many).
        activation: ``"relu"`` (the paper's), or a smooth one: ``"gelu"``, ``"silu"``, ``"softplus"``.

    Example:
        >>> import torch
        >>> FCN(in_channels=3, num_classes=4, num_filters=16)(torch.randn(2, 3, 50)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_filters: int = 128, activation: str = "relu"
    ) -> None:
        args = dict(in_channels=in_channels, num_classes=num_classes, num_filters=num_filters)
        super().__init__(**args, **({"activation": activation} if activation != "relu" else {}))
        widths = [in_channels, num_filters, 2 * num_filters, num_filters]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                SameConv1d(c_in, c_out, k, bias=False), nn.BatchNorm1d(c_out), activation_layer(activation)
            )
            for c_in, c_out, k in zip(widths[:-1], widths[1:], (8, 5, 3))
        )
        self.head = nn.Linear(num_filters, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)``; ``mask`` ``(B, T)`` marks the real steps."""
        h = x
        for block in self.blocks:
            h = block(zero_padded(h, mask))
        return self.head(masked_mean(h, mask))


class NarrowFCN(FCN):
    """A small student: :class:`FCN` with ``num_filters=8`` by default (8, 16, 8 channels).

    With ``in_channels=1`` and ``num_classes=2`` it has **1,170** parameters.

    Example:
        >>> import torch
        >>> from lightning_tsd.models import count_parameters
        >>> count_parameters(NarrowFCN(in_channels=1, num_classes=2))
        1170
        >>> NarrowFCN(1, 2)(torch.randn(4, 1, 64)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_filters: int = 8, activation: str = "relu"
    ) -> None:
        super().__init__(in_channels, num_classes, num_filters, activation)
