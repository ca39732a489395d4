"""Small image embeddings learned without labels, for clustering (CACTUs, :mod:`metalab.data.cactus`).

A three-layer strided convolutional :class:`ConvEncoder` maps a ``(B, C, H, W)`` image to a ``dim``-vector.
It is trained either as the encoder of a :class:`ConvAutoencoder` (reconstruct the image from the vector) or
as the encoder of a :class:`ContrastiveEmbedding` (two augmented views of an image map close together, other
images far apart; Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML
2020). Both are a few hundred thousand weights: they train in CPU minutes on 28x28 Omniglot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 convolution of stride 2 (padding 1: the side goes ``s -> ceil(s / 2)``), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU())


class ConvEncoder(nn.Module):
    """Three stride-2 conv blocks (``width``, ``2 * width``, ``2 * width`` filters), then a linear map to
    ``dim``.

    On 28x28 images the feature map before the linear layer is ``(2 * width, 4, 4)``.

    Args:
        in_channels: image channels.
        width: filters of the first block.
        dim: size of the embedding.
        image_size: side of the (square) input images.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, dim: int = 64, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            _conv(in_channels, width), _conv(width, 2 * width), _conv(2 * width, 2 * width)
        )
        side = image_size
        for _ in range(3):
            side = (side + 1) // 2
        self.map_shape = (2 * width, side, side)
        self.dim = dim
        self.out = nn.Linear(2 * width * side * side, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x).flatten(1))  # (B, dim)


class ConvAutoencoder(nn.Module):
    """:class:`ConvEncoder` and a mirrored decoder (linear, then two 2x transposed convs and a 3x3 conv).

    The decoder outputs logits of ``(B, C, image_size, image_size)``; with images in ``[0, 1]`` the training
    loss is a per-pixel binary cross-entropy (Omniglot's ink is nearly binary).

    Args:
        in_channels: image channels.
        width: filters of the encoder's first block (the decoder mirrors it).
        dim: size of the embedding (the bottleneck).
        image_size: side of the (square) images; the decoder upsamples from ``image_size / 4`` and must be
            divisible by 4.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, dim: int = 64, image_size: int = 28):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size}: the decoder needs a multiple of 4")
        self.encoder = ConvEncoder(in_channels, width, dim, image_size)
        self.side = image_size // 4
        self.width = width
        self.expand = nn.Linear(dim, 2 * width * self.side * self.side)
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # side -> 2 side
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),  # 2 side -> 4 side
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits ``(B, C, H, W)`` of embeddings ``(B, dim)``."""
        return self.decoder(self.expand(z).view(-1, 2 * self.width, self.side, self.side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encoder(x))


class ContrastiveEmbedding(nn.Module):
    """:class:`ConvEncoder` and a projection head (linear, ReLU, linear), where the contrastive loss is taken.

    The embedding used afterwards is the encoder's output, before the head (as SimCLR does: the head discards
    what the augmentations vary, the layer below keeps more of the image).

    Args:
        in_channels: image channels.
        width: filters of the encoder's first block.
        dim: size of the embedding.
        image_size: side of the (square) input images.
        projection: size of the head's output.
    """

    def __init__(
        self, in_channels: int = 1, width: int = 32, dim: int = 64, image_size: int = 28, projection: int = 64
    ):
        super().__init__()
        self.encoder = ConvEncoder(in_channels, width, dim, image_size)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, projection))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections ``(B, projection)``."""
        return F.normalize(self.head(self.encoder(x)), dim=1)
