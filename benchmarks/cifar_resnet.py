"""CIFAR-10 ResNet-20/56 with option-A shortcuts (He et al. 2016; weights of akamaster/pytorch_resnet_cifar10).

Not part of the library: the benchmark's model definition and data loading. The module layout is LRP friendly:
every ReLU is its own module (Zennit hooks must not be shared between call sites), the residual addition is a
``zennit.layer.Sum`` module over stacked inputs (so composites apply the Norm rule to it instead of letting the plain
gradient duplicate relevance), and :func:`fuse_batchnorm` folds every BatchNorm into the preceding convolution.

Activations of the activation-clustering paper's Table 1 (Keras names in brackets):

* ``relu``   32x32x16, after the first convolution (``activation``)
* ``layer1`` 32x32x16, output of stage 1 (``activation_18``)
* ``layer2`` 16x16x32, output of stage 2 (``activation_36``)
* ``layer3``  8x8x64,  output of stage 3 (``activation_54``)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from _common import data_dir
from torch import nn

# the architecture lives in the package; re-exported for the scripts that import it from here
from neon_attrib.vision.backbones import CifarBasicBlock as BasicBlock  # noqa: F401
from neon_attrib.vision.backbones import CifarResNet, ShortcutA  # noqa: F401

MEAN = (0.485, 0.456, 0.406)  # the ImageNet statistics the checkpoints were trained with (see SOURCE.md)
STD = (0.229, 0.224, 0.225)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TABLE1_LAYERS = ("relu", "layer1", "layer2", "layer3")


def data_root() -> Path:
    """``$NEON_ATTRIB_DATA`` or ``<repo>/../shared/data``."""
    return data_dir()


def load_resnet(depth: int = 56, root: Path | None = None) -> CifarResNet:
    """Load the pretrained ResNet-20/56 (eval mode, strict state-dict match)."""
    root = Path(root) if root is not None else data_root()
    files = {56: "resnet56-4bfd9763.th", 20: "resnet20-12fca82f.th"}
    ckpt = torch.load(root / "cifar10_resnet" / files[depth], map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = CifarResNet(depth=depth)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_cifar_subset(root: Path | None = None) -> dict[str, torch.Tensor]:
    """The real CIFAR-10 subset: ``x_train`` (5085), ``x_test`` (1017), normalised float32 NCHW, and int64 labels."""
    root = Path(root) if root is not None else data_root()
    with np.load(root / "cifar10_subset" / "cifar10_subset.npz") as npz:
        out = {k: torch.from_numpy(npz[k].copy()) for k in ("x_train", "y_train", "x_test", "y_test")}
    for k in ("x_train", "x_test"):
        out[k] = normalize(out[k].float() / 255.0)
    for k in ("y_train", "y_test"):
        out[k] = out[k].long()
    return out


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] RGB for display."""
    return (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)


@torch.no_grad()
def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` where every ``conv -> bn`` pair of a block (and the stem) is one convolution with bias.

    Eval-mode BatchNorm is an affine map per channel, so the fused network computes the same function; LRP rules
    then see one linear layer instead of a conv followed by a separately treated affine map.
    """
    model = copy.deepcopy(model).eval()
    pairs = [(model, "conv1", "bn1")]
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2")]
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=True)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
        setattr(parent, conv_name, fused)
        setattr(parent, bn_name, nn.Identity())
    return model
