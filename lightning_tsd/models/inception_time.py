"""InceptionTime (Ismail Fawaz et al., 2020), the default teacher."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_tsd.models._common import SameConv1d, TimeSeriesModel, masked_mean, zero_padded


class _InceptionModule(nn.Module):
    """Bottleneck, three parallel convolutions and a max-pool branch, concatenated, then BN + ReLU."""

    def __init__(self, in_channels: int, num_filters: int, kernel_size: int, bottleneck: int) -> None:
        super().__init__()
        use_bottleneck = bottleneck > 0 and in_channels > 1
        width = bottleneck if use_bottleneck else in_channels
        self.bottleneck = (
            nn.Conv1d(in_channels, bottleneck, 1, bias=False) if use_bottleneck else nn.Identity()
        )
        self.convs = nn.ModuleList(
            SameConv1d(width, num_filters, kernel_size // 2**i, bias=False) for i in range(3)
        )
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.pool_conv = nn.Conv1d(in_channels, num_filters, 1, bias=False)
        self.bn = nn.BatchNorm1d(4 * num_filters)

    def forward(self, x: Tensor) -> Tensor:
        b = self.bottleneck(x)  # 1x1 without bias: padded steps of x (zeros) stay zero
        branches = [conv(b) for conv in self.convs] + [self.pool_conv(self.pool(x))]
        return torch.relu(self.bn(torch.cat(branches, dim=1)))


class InceptionTime(TimeSeriesModel):
    """InceptionTime: ``depth`` inception modules with a residual shortcut every three, then masked global
    average pooling and a linear head.

    Each module runs convolutions of sizes ``kernel_size``, ``kernel_size // 2`` and ``kernel_size // 4``
    (40, 20, 10 as in the paper) and a max-pool branch, ``num_filters`` channels each. With the defaults,
    ``in_channels=1`` and ``num_classes=2`` it has **420,450** parameters. Padded steps (``mask`` False) are
    zeroed before every convolution and left out of the pooling, so their values never reach the logits.

    Args:
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        num_filters: channels per branch (a module outputs ``4 * num_filters``).
        depth: number of inception modules.
        kernel_size: the longest convolution of each module.
        bottleneck: channels of the 1x1 bottleneck (0 disables it; it is skipped for 1-channel inputs).
        residual: add a shortcut every three modules.

    Example:
        >>> model = InceptionTime(in_channels=1, num_classes=2)
        >>> model(torch.randn(4, 1, 64)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_filters: int = 32,
        depth: int = 6,
        kernel_size: int = 40,
        bottleneck: int = 32,
        residual: bool = True,
    ) -> None:
        super().__init__(
            in_channels=in_channels, num_classes=num_classes, num_filters=num_filters, depth=depth,
            kernel_size=kernel_size, bottleneck=bottleneck, residual=residual,
        )  # fmt: skip
        width = 4 * num_filters
        self.blocks = nn.ModuleList(
            _InceptionModule(in_channels if d == 0 else width, num_filters, kernel_size, bottleneck)
            for d in range(depth)
        )
        num_shortcuts = depth // 3 if residual else 0
        self.shortcuts = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(in_channels if i == 0 else width, width, 1, bias=False), nn.BatchNorm1d(width)
            )
            for i in range(num_shortcuts)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)``; ``mask`` ``(B, T)`` marks the real steps."""
        h = residual = zero_padded(x, mask)
        for d, block in enumerate(self.blocks):
            h = zero_padded(block(h), mask)
            if self.shortcuts and d % 3 == 2:
                h = zero_padded(torch.relu(h + self.shortcuts[d // 3](residual)), mask)
                residual = h
        return self.head(masked_mean(h, mask))
