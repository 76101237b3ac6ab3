"""Tiny models of each family for the core tests (a few hundred parameters each)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 6, batchnorm: bool = True):
        super().__init__()
        self.init_args = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "batchnorm": batchnorm,
        }
        self.num_classes = num_classes
        self.conv = nn.Conv1d(in_channels, width, 5, padding=2)
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x, mask=None):
        h = torch.relu(self.conv2(torch.relu(self.norm(self.conv(x)))))
        if mask is None:
            return self.head(h.mean(-1))
        m = mask.unsqueeze(1).to(h.dtype)
        return self.head((h * m).sum(-1) / m.sum(-1))


class TinyRNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3, hidden: int = 6, cell: str = "lstm"):
        super().__init__()
        self.num_classes = num_classes
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(in_channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(out.mean(1))


class TinyTransformer(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3, d_model: int = 8, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Linear(in_channels, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 16, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.transpose(1, 2))).mean(1))


FAMILIES = {
    "cnn_bn": lambda c=1, k=3: TinyCNN(c, k),
    "lstm": lambda c=1, k=3: TinyRNN(c, k, cell="lstm"),
    "gru": lambda c=1, k=3: TinyRNN(c, k, cell="gru"),
    "transformer": lambda c=1, k=3: TinyTransformer(c, k),
}
