"""The standard 4-block convolutional embedding of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def conv_block(
    in_ch: int, out_ch: int, pool: bool = True, stride: int = 1, norm: Literal["batch", "layer"] = "batch"
) -> nn.Sequential:
    """3x3 conv (padding 1), normalisation, ReLU, and an optional 2x2 max-pool.

    BatchNorm keeps no running statistics: every forward normalises with the batch at hand (transductive, as
    in MAML and ProtoNets), so the module has no buffers and works with functional_call + vmap. ``layer``
    normalises each image on its own (GroupNorm with one group), for sequence models whose outputs must not
    depend on later inputs through batch statistics.
    """
    normalise = (
        nn.BatchNorm2d(out_ch, track_running_stats=False) if norm == "batch" else nn.GroupNorm(1, out_ch)
    )
    layers = [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), normalise, nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four blocks of [3x3 conv (``hidden`` filters), BatchNorm, ReLU, 2x2 max-pool], then flatten.

    With ``n_classes`` a linear ``head`` maps the embedding to logits (MAML-style classifiers); without, the
    module returns the embedding (metric learners). On 28x28 Omniglot the embedding is 64-d (max-pool) or
    256-d (``strided=True``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        n_classes: int | None = None,
        strided: bool = False,
        image_size: int = 28,
        norm: Literal["batch", "layer"] = "batch",
    ):
        super().__init__()
        # MAML's Omniglot variant (strided) downsamples with stride-2 convolutions instead of max-pooling.
        self.features = nn.Sequential(
            *(
                conv_block(in_channels if i == 0 else hidden, hidden, not strided, 2 if strided else 1, norm)
                for i in range(4)
            )
        )
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2 if strided else side // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for 4 downsampling blocks")
        self.embedding_dim = hidden * side * side
        self.head = nn.Linear(self.embedding_dim, n_classes) if n_classes else None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``head``: the ``(B, embedding_dim)`` embedding."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)  # (B, embedding_dim)
        return self.head(z) if self.head is not None else z
