"""Reading images from disk as RGB tensors in ``[0, 1]``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._utils import check_int

__all__ = ["load_image", "check_image_size", "VGG16_MIN_SIZE", "IMAGE_SUFFIXES"]

#: VGG-16 halves the resolution five times: smaller images have no location left at block 5.
VGG16_MIN_SIZE = 32

#: File suffixes treated as images when a folder is read.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def load_image(path: str | os.PathLike, size: int | None = None, *, min_size: int = VGG16_MIN_SIZE) -> torch.Tensor:
    """Read an image file as an RGB float tensor (3, H, W) in ``[0, 1]`` (grey images get three equal channels).

    Parameters
    ----------
    path : str or path
        Any format Pillow reads (PNG, JPEG, BMP, TIFF, …).
    size : int, optional
        Resize (bilinear, antialiased) so that the *shorter* side is ``size``, keeping the aspect ratio
        (torchvision's ``Resize(size)``).
    min_size : int
        The smallest height and width accepted, before and after resizing (VGG-16: 32).

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file is not a readable image, or the image is smaller than ``min_size``.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"Could not read {path} as an image: {exc}") from exc
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    check_image_size(tensor, min_size=min_size, name=str(path))
    if size is not None:
        check_int(size, owner="load_image", name="size", minimum=min_size)
        from torchvision.transforms.functional import resize

        tensor = resize(tensor, [size], antialias=True).clamp(0.0, 1.0)
        check_image_size(tensor, min_size=min_size, name=f"{path} resized to shorter side {size}")
    return tensor


def check_image_size(images: torch.Tensor, min_size: int = VGG16_MIN_SIZE, name: str = "images") -> None:
    """Raise a ValueError if ``images`` (…, H, W) are smaller than ``min_size`` in height or width."""
    height, width = images.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(f"{name} is {height}x{width} pixels, smaller than VGG-16's minimum of "
                         f"{min_size}x{min_size} (five 2x2 max pools leave no location at block 5).")
