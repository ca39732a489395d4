"""Architectures only: ``nn.Module`` classes whose parameters algorithms use through ``functional_call``."""

from metalab.models.conv4 import Conv4
from metalab.models.mlp import MLP

__all__ = ["MLP", "Conv4"]
