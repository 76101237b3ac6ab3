"""A small GRU student."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tsd.models._common import TimeSeriesModel, last_real, masked_max, masked_mean

_POOLINGS = ("mean", "max", "last")


class GRUClassifier(TimeSeriesModel):
    """A unidirectional ``nn.GRU`` (``batch_first``) over the time axis, its hidden states pooled over the
    real steps (``pooling``: ``"mean"``, ``"max"`` or ``"last"``), then a linear head.

    Nothing is packed: the GRU runs over padded steps too, but its states at real steps never depend on
    the later padded ones, and the pooling reads real steps only. With the defaults (``hidden_size=32``,
    one layer), ``in_channels=1`` and ``num_classes=2`` it has **3,426** parameters.

    Args:
        in_channels: number of input channels ``C`` (the GRU's input size).
        num_classes: number of classes ``K``.
        hidden_size: GRU state size.
        num_layers: stacked GRU layers.
        dropout: dropout between stacked layers (used only when ``num_layers > 1``).
        pooling: how the per-step states become one vector.

    Example:
        >>> import torch
        >>> GRUClassifier(in_channels=3, num_classes=4)(torch.randn(2, 3, 20)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_size: int = 32,
        num_layers: int = 1,
        dropout: float = 0.0,
        pooling: str = "mean",
    ) -> None:
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        super().__init__(
            in_channels=in_channels, num_classes=num_classes, hidden_size=hidden_size, num_layers=num_layers,
            dropout=dropout, pooling=pooling,
        )  # fmt: skip
        self.pooling = pooling
        self.gru = nn.GRU(
            in_channels, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)``; ``mask`` ``(B, T)`` marks the real steps."""
        states, _ = self.gru(x.transpose(1, 2))  # (B, T, H)
        if self.pooling == "mean":
            pooled = masked_mean(states, mask, dim=1)
        elif self.pooling == "max":
            pooled = masked_max(states, mask, dim=1)
        else:
            pooled = last_real(states, mask)
        return self.head(pooled)
