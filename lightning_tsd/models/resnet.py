"""ResNet for time series (Wang et al., 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_tsd.models._common import SameConv1d, TimeSeriesModel, masked_mean, zero_padded


class _ResidualBlock(nn.Module):
    """Three conv + BN layers (kernel sizes 8, 5, 3) with a shortcut (1x1 conv + BN, or BN alone)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        widths = [in_channels, out_channels, out_channels, out_channels]
        self.convs = nn.ModuleList(
            SameConv1d(c_in, c_out, k, bias=False)
            for c_in, c_out, k in zip(widths[:-1], widths[1:], (8, 5, 3))
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(out_channels) for _ in range(3))
        conv = (
            nn.Conv1d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.shortcut = nn.Sequential(conv, nn.BatchNorm1d(out_channels))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            h = bn(conv(zero_padded(h, mask)))
            if i < 2:
                h = torch.relu(h)
        return torch.relu(h + self.shortcut(x))


class ResNet1d(TimeSeriesModel):
    """ResNet: three residual blocks of ``num_filters``, ``2 * num_filters`` and ``2 * num_filters``
    channels, masked global average pooling and a linear head.

    With the defaults (``num_filters=64``), ``in_channels=1`` and ``num_classes=2`` it has **503,106**
    parameters. Padded steps are zeroed before every convolution and left out of the pooling.

    Args:
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        num_filters: channels of the first block (the next two have twice as many).

    Example:
        >>> ResNet1d(in_channels=2, num_classes=3, num_filters=8)(torch.randn(4, 2, 40)).shape
        torch.Size([4, 3])
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: int = 64) -> None:
        super().__init__(in_channels=in_channels, num_classes=num_classes, num_filters=num_filters)
        widths = [in_channels, num_filters, 2 * num_filters, 2 * num_filters]
        self.blocks = nn.ModuleList(
            _ResidualBlock(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)``; ``mask`` ``(B, T)`` marks the real steps."""
        h = x
        for block in self.blocks:
            h = block(zero_padded(h, mask), mask)
        return self.head(masked_mean(h, mask))
