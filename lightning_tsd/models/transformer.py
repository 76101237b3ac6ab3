"""A small Transformer-encoder student."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_tsd.models._common import TimeSeriesModel, masked_mean

_POSITIONS = ("sinusoidal", "learned")


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The ``(length, dim)`` sine/cosine position table of Vaswani et al. (2017)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table


class TransformerClassifier(TimeSeriesModel):
    """Per-step linear embedding, a position embedding, an ``nn.TransformerEncoder`` (``batch_first``)
    whose key padding mask hides padded steps, masked mean pooling and a linear head.

    With the defaults (``d_model=32``, 4 heads, 2 layers, feed-forward 64, sinusoidal positions),
    ``in_channels=1`` and ``num_classes=2`` it has **17,218** parameters (``position="learned"`` adds
    ``max_len * d_model``).

    Fused attention on CPU has no double backward when ``dropout=0`` or in eval mode; differentiate the
    saliency under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (the saliency path does).

    Args:
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        d_model: token width.
        nhead: attention heads.
        num_layers: encoder layers.
        dim_feedforward: hidden width of each feed-forward block.
        dropout: dropout inside the encoder layers.
        position: ``"sinusoidal"`` (any length) or ``"learned"`` (lengths up to ``max_len``).
        max_len: longest series a learned position embedding covers.

    Example:
        >>> model = TransformerClassifier(in_channels=2, num_classes=3).eval()
        >>> model(torch.randn(4, 2, 30), mask=torch.ones(4, 30, dtype=torch.bool)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        d_model: int = 32,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 64,
        dropout: float = 0.1,
        position: str = "sinusoidal",
        max_len: int = 1024,
    ) -> None:
        if position not in _POSITIONS:
            raise ValueError(f"position must be one of {_POSITIONS}, got {position!r}")
        super().__init__(
            in_channels=in_channels, num_classes=num_classes, d_model=d_model, nhead=nhead,
            num_layers=num_layers, dim_feedforward=dim_feedforward, dropout=dropout, position=position,
            max_len=max_len,
        )  # fmt: skip
        self.embed = nn.Linear(in_channels, d_model)
        self.position = nn.Parameter(torch.zeros(max_len, d_model)) if position == "learned" else None
        if self.position is not None:
            nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)``; ``mask`` ``(B, T)`` marks the real steps."""
        length = x.shape[-1]
        tokens = self.embed(x.transpose(1, 2))  # (B, T, D)
        if self.position is None:
            tokens = tokens + sinusoidal_positions(length, tokens.shape[-1]).to(tokens)
        elif length > self.position.shape[0]:
            raise ValueError(
                f"series of length {length} exceed max_len={self.position.shape[0]}; raise max_len"
            )
        else:
            tokens = tokens + self.position[:length]
        h = self.encoder(tokens, src_key_padding_mask=None if mask is None else ~mask)
        return self.head(masked_mean(h, mask, dim=1))
