"""How RGB images in ``[0, 1]`` become network inputs, and the input bounds that the ZBox rule needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Preprocessing", "PREPROCESSINGS", "get_preprocessing", "check_rgb"]


@dataclass(frozen=True)
class Preprocessing:
    """How RGB images in ``[0, 1]`` become network inputs: ``(x[order] − mean) / std`` per channel.

    Parameters
    ----------
    name : str
        Short name (``"torchvision"``, ``"caffe"``, ``"caffe_rgb"``).
    mean, std : tuple of 3 floats
        Per channel, in the network's channel order and in ``[0, 1]`` units (caffe: ``mean / 255``, ``std = 1/255``).
    bgr : bool
        Whether the network expects BGR channel order (Caffe / Keras "caffe" mode).

    Examples
    --------
    >>> caffe = get_preprocessing("caffe")
    >>> x = caffe(torch.ones(1, 3, 2, 2))  # white: 255 − mean, in BGR order
    >>> [round(v, 3) for v in x[0, :, 0, 0].tolist()]
    [151.061, 138.221, 131.32]
    >>> low, high = caffe.bounds()
    >>> bool((low <= x).all() and (x <= high).all())
    True
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        return mean, std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images in ``[0, 1]`` of shape (3, H, W) or (n, 3, H, W) -> network input of the same shape."""
        images = check_rgb(images, f"Preprocessing({self.name!r})")
        if self.bgr:
            images = images.flip(-3)
        mean, std = self._stats(images)
        return (images - mean) / std

    def inverse(self, inputs: torch.Tensor) -> torch.Tensor:
        """Network input -> RGB images in ``[0, 1]`` (for display)."""
        mean, std = self._stats(inputs)
        images = inputs * std + mean
        return images.flip(-3) if self.bgr else images

    def bounds(self, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest possible network inputs, (1, 3, 1, 1) each: black and white pixels, preprocessed.

        These are the ``low``/``high`` of the ZBox rule on the first convolution (Zennit's ``EpsilonGammaBox``).
        """
        mean = torch.tensor(self.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=device).view(1, 3, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std


#: The preprocessings of the weights we know: torchvision's ImageNet classifiers (RGB, mean/std), Caffe / Keras
#: "caffe" mode (BGR, 0-255, mean subtracted; e.g. the Keras VGG-16 ImageNet weights), and the RGB Caffe port of
#: torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES``.
PREPROCESSINGS: dict[str, Preprocessing] = {
    "torchvision": Preprocessing("torchvision", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": Preprocessing("caffe", (103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255,) * 3, bgr=True),
    "caffe_rgb": Preprocessing("caffe_rgb", (0.48235, 0.45882, 0.40784), (1 / 255,) * 3),
    # CIFAR-10 training-set statistics, for CIFAR models trained with them (the akamaster ResNets are not: they use
    # "torchvision")
    "cifar10": Preprocessing("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def get_preprocessing(preprocessing: str | Preprocessing) -> Preprocessing:
    """Look up a :class:`Preprocessing` by name (``"torchvision"``, ``"caffe"``, ``"caffe_rgb"``), or pass one through.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if isinstance(preprocessing, str) and preprocessing in PREPROCESSINGS:
        return PREPROCESSINGS[preprocessing]
    raise ValueError(f"Unknown preprocessing {preprocessing!r}. Expected one of {sorted(PREPROCESSINGS)} "
                     f"or a Preprocessing instance.")


def check_rgb(images: torch.Tensor, owner: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{owner} expects RGB images of shape (3, H, W) or (n, 3, H, W). Got {shape}.")
    return images if images.is_floating_point() else images.float() / 255.0
