"""The standard 4-block convolutional embedding of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

try:  # the functorch interpreter stack: which torch.func transforms are active
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    def _under_vmap() -> bool:
        return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())

except ImportError:  # a torch without these internals: always take the form that is exact under vmap

    def _under_vmap() -> bool:
        return True


BatchNormMode = Literal["inductive", "transductive"]
"""How BatchNorm normalises at evaluation. ``transductive``: with the statistics of the batch at hand (support
and query of an episode together), as MAML's code does at test time. ``inductive``: with running statistics
gathered during training, so each query is classified on its own (the ProtoNet and Matching code evaluate in
this mode). Training always normalises with the batch's statistics."""


class BatchNorm2d(nn.Module):
    """Batch normalisation of ``(N, C, H, W)`` with a learned per-channel scale ``weight`` and shift ``bias``.

    By default it keeps no running statistics (``nn.BatchNorm2d(track_running_stats=False)``): every forward
    normalises with the batch at hand, the module has no buffers, and its gradients of every order stay exact
    under ``functional_call`` + ``vmap`` (the MAML family). :func:`set_batchnorm_mode` gives it running
    statistics (updated in training mode, momentum 0.1) and, for ``inductive``, uses them in eval mode.

    Outside ``torch.func.vmap`` it runs torch's fused kernel, the fastest form. Under vmap it runs the same
    function in elementary ops: second derivatives through the fused kernel come out wrong when it is vmapped
    (pytorch/functorch#534), and the MAML family vmaps second-order meta-gradients over tasks. Outside vmap
    the fused kernel is kept because it is faster: with elementary ops a Conv-4 forward and backward on 80
    images took 1.4x (strided) to 1.6x (max-pool) as long on a CPU.
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", None)  # None: not in the state dict until tracked
        self.register_buffer("running_var", None)
        self.inductive = False

    def track_running_stats(self) -> None:
        """Add running statistics (buffers, so they are checkpointed) if the module has none yet."""
        if self.running_mean is None:
            self.running_mean = torch.zeros(self.num_features, device=self.weight.device)
            self.running_var = torch.ones(self.num_features, device=self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracked = self.running_mean is not None
        if tracked and self.inductive and not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
        if not _under_vmap():
            mean, var = (self.running_mean, self.running_var) if tracked and self.training else (None, None)
            return F.batch_norm(
                x, mean, var, self.weight, self.bias, training=True, momentum=self.momentum, eps=self.eps
            )
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        scale, shift = self.weight.view(-1, 1, 1), self.bias.view(-1, 1, 1)
        return (x - mean) * torch.rsqrt(var + self.eps) * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, inductive={self.inductive}"


def set_batchnorm_mode(model: nn.Module, mode: BatchNormMode) -> nn.Module:
    """Give every :class:`BatchNorm2d` of ``model`` running statistics and evaluate with them (``inductive``) or
    with the batch's (``transductive``). Both modes train alike and keep the statistics, so one trained model can
    be evaluated either way (``--set <algo>.batchnorm=...`` at ``metalab eval``)."""
    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            module.track_running_stats()
            module.inductive = mode == "inductive"
    return model


def conv_block(
    in_ch: int, out_ch: int, pool: bool = True, stride: int = 1, norm: Literal["batch", "layer"] = "batch"
) -> nn.Sequential:
    """3x3 conv (padding 1), normalisation, ReLU, and an optional 2x2 max-pool.

    BatchNorm (:class:`BatchNorm2d`) keeps no running statistics unless :func:`set_batchnorm_mode` adds them:
    every forward normalises with the batch at hand (transductive, MAML's protocol), so the module has no
    buffers, and its gradients of every order stay exact under functional_call + vmap. ``layer``
    normalises each image on its own (GroupNorm with one group), for sequence models whose outputs must not
    depend on later inputs through batch statistics.
    """
    normalise = BatchNorm2d(out_ch) if norm == "batch" else nn.GroupNorm(1, out_ch)
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
