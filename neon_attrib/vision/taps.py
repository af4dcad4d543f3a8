"""Features read at several layers of a backbone, as PatchCore and PaDiM read them (multi-layer taps).

:class:`FeatureTaps` runs a backbone up to the last of the named layers and no further, averages every tapped map
over a small neighbourhood (3x3 average pooling, stride 1, padding 1), resizes the coarser maps bilinearly to the
finest tapped resolution, concatenates them along channels and, optionally, average-pools the channels to a fixed
number (PatchCore). Its output is a feature map (n, C, h, w) like any backbone's, so it serves as the ``features`` of
a :class:`~neon_attrib.vision.deep.DeepNeon`::

    heads = DeepNeon(FeatureTaps(backbone("wide_resnet50_2", weights), ["layer2", "layer3"]), KDEOutlier(gamma))

Explaining it: every step after the backbone is linear with non-negative weights and is a module of an
average-pooling type, so Zennit's composites and :mod:`neon_attrib.vision.fast`'s give each of them the Norm rule
(``R_in = x * J^T (R / out)``, the z-rule: exact and conservative for any such map, borders included); the
concatenation hands each tap its own channels (its gradient, a split), and the relevance arriving at a tapped layer
from its tap and from the deeper layers adds up in the backbone (autograd sums both branches).
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from zennit.core import collect_leaves

from ..core.validation import BATCH_NORMS
from ..pipeline.graph import register_trusted_container

__all__ = ["FeatureTaps", "BilinearResize", "ChannelPool"]


class BilinearResize(nn.AdaptiveAvgPool2d):
    """Bilinear resampling of (n, C, h, w) maps to ``output_size`` (``F.interpolate(..., mode="bilinear",
    align_corners=False)``).

    It is an :class:`torch.nn.AdaptiveAvgPool2d` on purpose: each output is a weighted average of inputs (non-negative
    weights summing to 1), so the rule Zennit's composites (and ours) give every average pooling, Norm (the z-rule), is
    the exact LRP rule for it, in every composite, with no extra layer map.

    The size is an attribute, not an argument, because LRP rules recompute a module from its first input alone:
    :class:`FeatureTaps` sets it before each call.

    Parameters
    ----------
    output_size : (int, int), optional
        Target (height, width).

    Examples
    --------
    >>> resize = BilinearResize((4, 4))
    >>> resize(torch.ones(1, 2, 2, 2)).shape
    torch.Size([1, 2, 4, 4])
    """

    def __init__(self, output_size: tuple[int, int] | None = None):
        super().__init__(output_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.output_size is None:
            raise RuntimeError("BilinearResize has no output_size; set it before calling the module.")
        return F.interpolate(input, size=tuple(self.output_size), mode="bilinear", align_corners=False)


class ChannelPool(nn.AdaptiveAvgPool1d):
    """Adaptive average pooling over the channels of (n, C, h, w) maps, to ``output_size`` channels (PatchCore's
    fixed-dimension reduction, ``F.adaptive_avg_pool1d`` over each location's vector).

    An :class:`torch.nn.AdaptiveAvgPool1d`, so LRP composites give it the Norm (z) rule, exact and conservative.

    Examples
    --------
    >>> ChannelPool(4)(torch.ones(2, 12, 3, 3)).shape
    torch.Size([2, 4, 3, 3])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = input.shape
        rows = input.permute(0, 2, 3, 1).reshape(-1, 1, channels)
        pooled = F.adaptive_avg_pool1d(rows, self.output_size)
        return pooled.reshape(n, height, width, -1).permute(0, 3, 1, 2)


class _StopBackbone(Exception):
    """Raised by the last tap's hook: the rest of the backbone is not needed."""


class FeatureTaps(nn.Module):
    """Feature maps read at several named layers of a backbone, aggregated, resized to one resolution, concatenated.

    ``forward(images)`` returns (n, C, h, w): ``C`` is the sum of the tapped channels (or ``reduce_to``), ``(h, w)`` the
    finest tapped resolution. The backbone stops once the last tapped layer and the module containing it have run:
    later layers cost nothing.

    Parameters
    ----------
    backbone : torch.nn.Module
        Any CNN, e.g. :func:`~neon_attrib.vision.backbones.backbone` ``("wide_resnet50_2")`` or a torchvision
        classifier (its head never runs).
    layers : str or sequence of str
        Module names in ``backbone.named_modules()``, each running once per forward and returning (n, C, h, w):
        ``["layer2", "layer3"]`` (PatchCore), ``["layer1", "layer2", "layer3"]`` (PaDiM), for VGG-16's conv base the
        ReLUs closing blocks 3 and 4, ``["15", "22"]`` (``"features.15"`` in a whole VGG). Tap activations (ReLU
        outputs, blocks) to give the NEON heads non-negative features.
    aggregate : int or None
        Side of the local average pooling of each tapped map (stride 1, zero padding ``aggregate // 2``, padded zeros
        counted, as ``torch.nn.AvgPool2d(3, 1, 1)`` in PatchCore); odd. ``1`` or ``None``: no aggregation.
    reduce_to : int, optional
        Average-pool the concatenated channels to this many (:class:`ChannelPool`).

    Raises
    ------
    ValueError
        For an unknown layer name (with the closest names), a duplicate, an even ``aggregate``, or a convolution that
        a batch norm follows (LRP canonization merges the two, which would change the tapped values: tap the batch
        norm or the activation after it). At forward time: for a layer that does not run, runs twice, or whose output
        is not a 4-D map or is overwritten in place later in the backbone.

    Notes
    -----
    Taps are read with forward hooks that exist only during :meth:`forward` (none is left on the backbone). A module
    object called at several places (torchvision's ResNet blocks call one ReLU twice) cannot be tapped: a second call
    by the module containing it is a ValueError ("ran twice"), whether the layer is the last tap or not (the backbone
    runs until that containing module returns). A top-level module called twice by the backbone's own ``forward`` is
    seen only if the second call comes before the last tap is read.
    :class:`BilinearResize` keeps its target size as an attribute set on each call, so one FeatureTaps object should
    not serve concurrent forward passes of *different* image sizes from several threads; explanations are unaffected
    (the explain pipeline runs each on a private copy of the model).

    Examples
    --------
    >>> from neon_attrib.vision import backbone
    >>> taps = FeatureTaps(backbone("resnet18"), ["layer2", "layer3"])
    >>> taps(torch.zeros(1, 3, 64, 64)).shape  # 128 + 256 channels at layer2's 8x8
    torch.Size([1, 384, 8, 8])
    >>> FeatureTaps(backbone("resnet18"), ["layer2", "layer3"], reduce_to=100)(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 100, 8, 8])
    """

    def __init__(self, backbone: nn.Module, layers: str | Sequence[str], aggregate: int | None = 3,
                 reduce_to: int | None = None):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"The 'backbone' parameter of FeatureTaps must be a torch.nn.Module. "
                            f"Got {type(backbone).__name__}.")
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not layers or not all(isinstance(name, str) and name for name in layers):
            raise ValueError(f"The 'layers' parameter of FeatureTaps must be one or more module names of the "
                             f"backbone. Got {layers!r} instead.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"The 'layers' parameter of FeatureTaps names a layer twice: {list(layers)}.")
        named = dict(backbone.named_modules())
        for name in layers:
            if name not in named:
                close = difflib.get_close_matches(name, [key for key in named if key], n=4, cutoff=0.5)
                hint = f" Did you mean {close}?" if close else ""
                raise ValueError(f"FeatureTaps: the backbone ({type(backbone).__name__}) has no layer {name!r}.{hint} "
                                 f"Layer names are those of backbone.named_modules(), e.g. "
                                 f"{[key for key in backbone._modules][:8]}.")
        if aggregate is None:
            aggregate = 1
        if isinstance(aggregate, bool) or not isinstance(aggregate, int) or aggregate < 1 or aggregate % 2 == 0:
            raise ValueError(f"The 'aggregate' parameter of FeatureTaps must be an odd int >= 1 (or None). "
                             f"Got {aggregate!r} instead.")
        if reduce_to is not None and (isinstance(reduce_to, bool) or not isinstance(reduce_to, int) or reduce_to < 1):
            raise ValueError(f"The 'reduce_to' parameter of FeatureTaps must be an int >= 1 or None. "
                             f"Got {reduce_to!r} instead.")
        _check_not_merged(backbone, layers)
        self.backbone = backbone
        self.layers = layers
        self.aggregate = aggregate
        self.reduce_to = reduce_to
        # one module per call site: Zennit's rules keep per-module state between the forward and the backward pass
        self.aggregations = nn.ModuleList(
            nn.AvgPool2d(aggregate, stride=1, padding=aggregate // 2) if aggregate > 1 else nn.Identity()
            for _ in layers)
        self.resizes = nn.ModuleList(BilinearResize() for _ in layers)
        self.reduce = ChannelPool(reduce_to) if reduce_to is not None else nn.Identity()

    def layer_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The raw maps of the tapped layers, in the order of :attr:`layers` (the backbone stops after the last)."""
        captured: dict[str, torch.Tensor] = {}
        versions: dict[str, int] = {}
        thread = threading.get_ident()
        # The backbone stops once every tap is read and the module *containing* each tapped one has returned: a
        # module called again by its parent (torchvision's ResNet blocks call one ReLU twice) is then always seen
        # running twice, whether it is the last tap or not. Taps whose parent is the backbone itself stop at once.
        parents = {name: name.rpartition(".")[0] for name in self.layers}
        waiting: set[str] = set()

        def stop_if_done() -> None:
            if len(captured) == len(self.layers) and not waiting:
                raise _StopBackbone

        def parent_done(parent: str):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                if threading.get_ident() != thread:
                    return
                waiting.discard(parent)
                stop_if_done()

            return hook

        def tap(name: str):
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                if threading.get_ident() != thread:  # another thread's forward through the same modules
                    return
                if name in captured:
                    raise ValueError(f"FeatureTaps: layer {name!r} ran twice in one forward pass (one module "
                                     f"called at several places); tap a module that runs once, e.g. its parent.")
                if not isinstance(output, torch.Tensor) or output.ndim != 4:
                    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                    raise ValueError(f"FeatureTaps: layer {name!r} returned {shape}, not a feature map "
                                     f"(n, C, h, w).")
                _check_channels_first(name, output, images)
                captured[name] = output
                if not output.is_inference():  # inference tensors have no version counter
                    versions[name] = output._version
                if parents[name]:
                    waiting.add(parents[name])
                stop_if_done()

            return hook

        handles = []
        try:
            for name in self.layers:
                handles.append(self.backbone.get_submodule(name).register_forward_hook(tap(name)))
            for parent in sorted(set(filter(None, parents.values()))):
                handles.append(self.backbone.get_submodule(parent).register_forward_hook(parent_done(parent)))
            self.backbone(images)
        except _StopBackbone:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layers if name not in captured]
        if missing:
            raise ValueError(f"FeatureTaps: layer(s) {missing} of the backbone ({type(self.backbone).__name__}) did "
                             f"not run in its forward pass; tap modules that the forward calls.")
        changed = [name for name in versions if captured[name]._version != versions[name]]
        if changed:
            raise ValueError(f"FeatureTaps: the output of layer(s) {changed} was overwritten in place later in the "
                             f"backbone (an in-place activation after it?); tap the module that writes it instead.")
        return [captured[name] for name in self.layers]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w): the aggregated tapped maps at the finest tapped resolution, concatenated (and reduced)."""
        maps = [aggregation(fmap) for aggregation, fmap in zip(self.aggregations, self.layer_outputs(images))]
        size = max((tuple(fmap.shape[-2:]) for fmap in maps), key=lambda hw: (hw[0] * hw[1], hw))
        resized = []
        for resize, fmap in zip(self.resizes, maps):
            if tuple(fmap.shape[-2:]) != size:
                resize.output_size = size
                fmap = resize(fmap)
            resized.append(fmap)
        return self.reduce(torch.cat(resized, dim=1) if len(resized) > 1 else resized[0])

    def extra_repr(self) -> str:
        return f"layers={list(self.layers)}, aggregate={self.aggregate}, reduce_to={self.reduce_to}"


def _check_channels_first(name: str, output: torch.Tensor, images: torch.Tensor) -> None:
    """Refuse a channels-last map (n, h, w, C) (Swin's stages, ConvNeXt's blocks inside): its last two dimensions do
    not scale like the image's height and width, which those of an (n, C, h, w) map do (the same stride for both, up
    to rounding at the borders)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        return
    height, width = images.shape[-2:]
    rows, columns = output.shape[-2:]
    if abs(columns * height - rows * width) > height + width:
        raise ValueError(f"FeatureTaps: layer {name!r} returned {tuple(output.shape)} for {height}x{width} images: its "
                         f"last two dimensions ({rows}x{columns}) do not scale like the image's, so it is not a map "
                         f"(n, C, h, w) but probably a channels-last map (n, h, w, C), as Swin's stages return. Tap "
                         f"a layer that returns (n, C, h, w), or wrap the layer so that it permutes its output with "
                         f"permute(0, 3, 1, 2).")


def _check_not_merged(backbone: nn.Module, layers: Sequence[str]) -> None:
    """Refuse taps on a convolution / linear layer that a batch norm follows (canonization would change them)."""
    leaves = list(collect_leaves(backbone))
    batch_norms = BATCH_NORMS
    linear = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    following = {id(leaf): after for leaf, after in zip(leaves, leaves[1:])}
    for name in layers:
        module = backbone.get_submodule(name)
        if isinstance(module, linear) and isinstance(following.get(id(module)), batch_norms):
            raise ValueError(f"FeatureTaps: layer {name!r} ({type(module).__name__}) is followed by a batch norm, "
                             f"which LRP canonization merges into it, changing its output; tap the batch norm or the "
                             f"activation after it instead.")


# its forward only calls the backbone (under hooks), poolings and a concatenation: the graph canonizer canonizes the
# backbone and leaves the rest as it is
register_trusted_container(FeatureTaps)
