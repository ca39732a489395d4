"""A plain multilayer perceptron (40-40 ReLU for sinusoid regression, as in MAML)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden... -> out_features`` with ReLU; the last linear layer is named ``head``."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``head`` (ANIL adapts the head on this embedding)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
