"""A small sentence encoder trained from scratch, the embedding network of metric learners on text tasks
(SMLMT, Bansal et al., "Self-Supervised Meta-Learning for Few-Shot Natural Language Classification Tasks",
EMNLP 2020, meta-train BERT; this is a CPU-sized stand-in with no pre-training).

Why a 2-layer transformer rather than a BiLSTM: every position attends to every other in one step, so the
words around ``[MASK]`` (the evidence of an SMLMT task) reach every position's output however far apart they
are, and a layer is a few matrix products over the whole padded batch: on CPU it needs no sequential loop
over time steps, which a BiLSTM runs twice (one per direction) per layer. Sentences are then mean-pooled over
their real tokens, as the brief for the ProtoNet embedding asks: prototypes are means of fixed-size vectors.
"""

from __future__ import annotations

import torch
from torch import nn


class SentenceEncoder(nn.Module):
    """Token ids ``(B, L)`` -> sentence embeddings ``(B, dim)``: word plus learned position embeddings, a
    pre-norm transformer encoder, a final LayerNorm, and the mean over non-padding positions.

    Args:
        vocab_size: rows of the word embedding (ids ``0..vocab_size-1``).
        dim: width of the embeddings and of the output (``embedding_dim``).
        layers: transformer layers.
        heads: attention heads (must divide ``dim``).
        max_tokens: longest sentence (rows of the position embedding).
        dropout: dropout in the transformer layers (training mode only).
        pad_id: the padding id: masked out of attention and of the mean.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_tokens: int = 64,
        dropout: float = 0.1,
        *,
        pad_id: int = 0,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.pad_id, self.embedding_dim, self.max_tokens = pad_id, dim, max_tokens
        self.words = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.positions = nn.Embedding(max_tokens, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        # No nested-tensor fast path: outputs keep their (B, L, D) shape, in training and evaluation alike.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` int64 token ids, padded with ``pad_id`` -> ``(B, dim)``."""
        length = tokens.shape[1]
        if length > self.max_tokens:
            raise ValueError(f"sentences of {length} tokens, longer than max_tokens={self.max_tokens}")
        pad = tokens == self.pad_id  # (B, L) True where padding
        x = self.words(tokens) + self.positions.weight[:length]  # (B, L, D)
        h = self.norm(self.encoder(x, src_key_padding_mask=pad))  # (B, L, D)
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, D)
