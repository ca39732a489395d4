"""Architectures only: ``nn.Module`` classes whose parameters algorithms use through ``functional_call``."""

from metalab.models.conv4 import BatchNorm2d, Conv4
from metalab.models.mlp import MLP

__all__ = ["MLP", "BatchNorm2d", "Conv4"]
