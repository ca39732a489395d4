"""Architectures only: ``nn.Module`` classes whose parameters algorithms use through ``functional_call``."""

from metalab.models.conv4 import BatchNorm2d, BatchNormMode, Conv4, set_batchnorm_mode
from metalab.models.mlp import MLP

__all__ = ["MLP", "BatchNorm2d", "BatchNormMode", "Conv4", "set_batchnorm_mode"]
