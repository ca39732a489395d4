"""A plain multilayer perceptron (40-40 ReLU for sinusoid regression, as in MAML)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """:class:`MLP`'s forward as a pure function of its ``named_parameters()`` dict (in that order).

    The same numbers as ``functional_call(mlp, params, (x,))`` without its module re-binding, which dominates
    the cost of the small networks of RL (several calls per env step).
    """
    weights = list(params.values())
    for i in range(0, len(weights) - 2, 2):
        x = F.relu(F.linear(x, weights[i], weights[i + 1]))
    return F.linear(x, weights[-2], weights[-1])
