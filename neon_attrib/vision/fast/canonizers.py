"""A faster drop-in for Zennit's ``ResNetCanonizer`` (torchvision ResNets): the same canonical model, the same numbers.

Zennit's canonizer makes each residual addition a :class:`zennit.layer.Sum` module over ``torch.stack([identity, out],
dim=-1)``, so that LRP rules (Norm: each branch gets its share ``x_i / (x_1 + x_2)``) reach it. Stacking along a new
*last* axis interleaves the two tensors element by element, and the sum then reduces a strided axis of size 2, both
slow on a CPU (the size-2 reduction is not vectorised). :class:`FastResNetCanonizer` stacks along a new axis right
after the batch axis instead, ``(n, 2, C, H, W)``: per sample, two contiguous blocks, so copies, sums and the Norm
rule's products run on contiguous memory, and the batch axis stays first (the explain pipeline audits relevance per
sample along it). The sums, and so every relevance, are identical (``a + b`` is the same float whatever the layout).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.canonizers import AttributeCanonizer, Canonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.layer import Sum

from ...core.validation import BATCH_NORMS
from ...pipeline.engine import guard_batch_norms, unguard_batch_norms

__all__ = ["FastResNetCanonizer", "GuardBatchNorms", "MergeBatchNorms"]


class MergeBatchNorms(SequentialMergeBatchNorm):
    """Zennit's :class:`~zennit.canonizers.SequentialMergeBatchNorm`, also for ``FrozenBatchNorm2d``, ``SyncBatchNorm``.

    Zennit 1.0 merges torchvision's ``FrozenBatchNorm2d`` (the batch norm of its detection backbones), Zennit 0.5 does
    not, and neither merges ``torch.nn.SyncBatchNorm``; unmerged, a batch norm without a rule is a plain gradient, which
    scales the relevance by its factor. This canonizer merges them with either version, exactly as Zennit merges
    ``BatchNorm2d`` (the same parameters, restored on removal).

    Examples
    --------
    >>> from torchvision.ops.misc import FrozenBatchNorm2d
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4))
    >>> len(MergeBatchNorms().apply(model))
    1
    """

    batch_norm_type = BATCH_NORMS

    def register(self, linears: list[nn.Module], batch_norm: nn.Module) -> None:
        super().register(linears, batch_norm)
        self._guarded = guard_batch_norms(batch_norm)

    def remove(self) -> None:
        super().remove()
        unguard_batch_norms(getattr(self, "_guarded", []))
        self._guarded = []


class GuardBatchNorms(Canonizer):
    """Let PyTorch 2.10 and 2.11 run Zennit 1.0's merged batch norms: put it *last* in a composite's canonizers.

    Zennit 1.0's batch-norm merge leaves each merged norm as the identity with ``eps = 0``, which PyTorch 2.10 and 2.11
    refuse even in eval mode, so Zennit's own ``Gradient`` with Zennit's ``ResNetCanonizer`` (or any canonizer that
    merges batch norms) fails there. Applied after the other canonizers, this one gives every batch norm with
    ``eps <= 0`` an exact element-wise forward (:func:`neon_attrib.pipeline.guard_batch_norms`) and takes it away on
    removal. The explanations of this package do so on their own; this is for Zennit's attributors used directly.

    Examples
    --------
    >>> from zennit.composites import EpsilonPlusFlat
    >>> from zennit.torchvision import ResNetCanonizer
    >>> composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer(), GuardBatchNorms()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._guarded: list[nn.Module] = []

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        instance = self.copy()
        instance.register(root_module)
        return [instance]

    def register(self, root_module: nn.Module) -> None:
        self._guarded = guard_batch_norms(root_module)

    def remove(self) -> None:
        unguard_batch_norms(self._guarded)
        self._guarded = []

    def copy(self) -> GuardBatchNorms:
        return type(self)()


def _basic_block_forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out = self.canonizer_sum(torch.stack([identity, out], dim=1))
    return self.relu(out)


def _bottleneck_forward(self: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out = self.canonizer_sum(torch.stack([identity, out], dim=1))
    return self.relu(out)


class _ResidualSumCanonizer(AttributeCanonizer):
    """Give torchvision's ``BasicBlock`` and ``Bottleneck`` a forward whose addition is a ``Sum(dim=1)`` module."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @staticmethod
    def _attribute_map(name: str, module: nn.Module) -> dict | None:
        if isinstance(module, Bottleneck):
            forward = _bottleneck_forward
        elif isinstance(module, BasicBlock):
            forward = _basic_block_forward
        else:
            return None
        return {"forward": forward.__get__(module), "canonizer_sum": Sum(dim=1)}

    def copy(self) -> _ResidualSumCanonizer:
        return type(self)()


class FastResNetCanonizer(CompositeCanonizer):
    """Zennit's :class:`~zennit.torchvision.ResNetCanonizer` with the residual sum stacked after the batch axis.

    Merges every batch norm (``FrozenBatchNorm2d`` included, :class:`MergeBatchNorms`) into the convolution before it
    and replaces the forward of torchvision's ``BasicBlock``/``Bottleneck`` by one whose residual addition is a
    ``zennit.layer.Sum(dim=1)`` module (attribute ``canonizer_sum``, as in Zennit). Every rule gives the same relevance
    as with Zennit's canonizer; the canonized forward and the Norm rule on the sum are faster.

    Examples
    --------
    >>> import torchvision
    >>> from zennit.attribution import Gradient
    >>> from neon_attrib.vision.fast import FastEpsilonGammaBox
    >>> model = torchvision.models.resnet18(weights=None).eval()
    >>> composite = FastEpsilonGammaBox(low=-3.0, high=3.0, canonizers=[FastResNetCanonizer()])
    >>> _, relevance = Gradient(model, composite)(torch.randn(1, 3, 32, 32), torch.eye(1000)[[0]])
    >>> relevance.shape
    torch.Size([1, 3, 32, 32])
    """

    def __init__(self) -> None:
        super().__init__((MergeBatchNorms(), _ResidualSumCanonizer()))
