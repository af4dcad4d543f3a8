"""Reading images from disk as RGB tensors in ``[0, 1]``.

How pixel values become ``[0, 1]`` (:func:`load_image`):

==========================================  ==========================================================================
Pillow mode                                 conversion
==========================================  ==========================================================================
8-bit: ``L``, ``RGB``, ``RGBA``, ``P``,      ``convert("RGB")`` (alpha dropped, palette resolved, grey repeated), / 255
``LA``, ``1``, ``CMYK``, ...
16-bit grey: ``I;16``, ``I;16B``, ...        / 65535 (the format's full range, whatever the sensor's bit depth: 12-bit
                                            data stored in 16 bits then spans ``[0, 0.0625]``; pass
                                            ``value_range=(0, 4095)`` to stretch it)
32-bit integer grey: ``I``                  / 65535 when every value lies in ``[0, 65535]`` (how Pillow opens 16-bit
                                            PGM/TIFF and some PNG files), otherwise a ValueError
floating point grey: ``F``                  kept when every value lies in ``[0, 1]``, otherwise a ValueError (no
                                            silent min-max scaling: it would give every image its own contrast)
==========================================  ==========================================================================

``value_range=(low, high)`` overrides the table: raw values map linearly, ``low`` → 0 and ``high`` → 1, and values
outside it are an error (never clipped). Non-finite values (NaN, inf) in float images are always an error.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.validation import check_int

__all__ = ["load_image", "check_image_size", "image_files", "check_not_constant", "ConstantImageError",
           "VGG16_MIN_SIZE", "IMAGE_SUFFIXES"]

#: VGG-16 halves the resolution five times: smaller images have no location left at block 5.
VGG16_MIN_SIZE = 32

#: File suffixes treated as images when a folder is read.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

_UINT16_MAX = 65535.0


def load_image(path: str | os.PathLike, size: int | None = None, *, min_size: int = VGG16_MIN_SIZE,
               value_range: Sequence[float] | None = None) -> torch.Tensor:
    """Read an image file as an RGB float tensor (3, H, W) in ``[0, 1]`` (grey images get three equal channels).

    8-bit images are divided by 255, 16-bit grey images (PNG, TIFF, PGM) by 65535, float images (TIFF mode ``F``)
    are kept if they lie in ``[0, 1]``; see the module docstring for every mode. Nothing is clipped: values the
    conversion cannot place in ``[0, 1]`` are an error that says what to pass. Multi-frame files (GIF, TIFF) give
    their first frame.

    Parameters
    ----------
    path : str or path
        Any format Pillow reads (PNG, JPEG, BMP, TIFF, …).
    size : int, optional
        Resize (bilinear, antialiased) so that the *shorter* side is ``size``, keeping the aspect ratio
        (torchvision's ``Resize(size)``).
    min_size : int
        The smallest height and width accepted, before and after resizing (VGG-16: 32).
    value_range : (float, float), optional
        The raw values that mean black and white, e.g. ``(0, 4095)`` for 12-bit data in a 16-bit file or
        ``(20.0, 80.0)`` for a float temperature map; values map linearly to ``[0, 1]``. Default: by the mode, as
        in the module docstring.

    Returns
    -------
    torch.Tensor
        (3, H, W) float32 in ``[0, 1]``.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If ``path`` is a directory or not a readable image, a decompression bomb (more pixels than
        ``PIL.Image.MAX_IMAGE_PIXELS``), smaller than ``min_size``, if its values do not fit the value range, if
        resizing to ``size`` would exceed ``PIL.Image.MAX_IMAGE_PIXELS``, or if an argument is invalid.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> path = os.path.join(tempfile.mkdtemp(), "grey16.png")
    >>> Image.fromarray(np.full((40, 60), 65535 // 4, dtype=np.uint16)).save(path)  # a 16-bit PNG
    >>> image = load_image(path)
    >>> image.shape, round(float(image.max()), 3)
    (torch.Size([3, 40, 60]), 0.25)
    """
    check_int(min_size, owner="load_image", name="min_size", minimum=1)
    if size is not None:
        check_int(size, owner="load_image", name="size", minimum=min_size)
    value_range = _check_value_range(value_range)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"load_image: {path} is a directory, not an image file (the 'path' argument). Pass the "
                         f"image files in it instead.")
    if not path.is_file():
        raise FileNotFoundError(f"load_image: Image not found: {path} (the 'path' argument). Check the path.")
    raw, kind = _read_pixels(path, size, min_size)
    array = _to_unit_range(raw, kind, value_range, path)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    check_image_size(tensor, min_size=min_size, name=str(path))
    if size is not None:
        from torchvision.transforms.functional import resize

        tensor = resize(tensor, [size], antialias=True).clamp(0.0, 1.0)
        check_image_size(tensor, min_size=min_size, name=f"{path} resized to shorter side {size}")
    return tensor


def check_image_size(images: torch.Tensor, min_size: int = VGG16_MIN_SIZE, name: str = "images") -> None:
    """Raise a ValueError if ``images`` (…, H, W) are smaller than ``min_size`` in height or width."""
    if not isinstance(images, torch.Tensor) or images.ndim < 2:
        raise ValueError(f"check_image_size expects a tensor (..., H, W). Got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}.")
    height, width = images.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(f"{name} is {height}x{width} pixels, smaller than VGG-16's minimum of "
                         f"{min_size}x{min_size} (five 2x2 max pools leave no location at block 5).")


def image_files(folder: str | os.PathLike, pattern: str | None = None, *, recursive: bool = False) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`) of ``folder``, sorted by their path relative to it.

    Parameters
    ----------
    folder : str or path
        The folder.
    pattern : str, optional
        Only the files matching this glob, relative to ``folder`` (``"*.jpg"``; ``"**/*.png"`` recurses). Default:
        every image file, in ``folder`` only or (``recursive``) below it.
    recursive : bool
        Without ``pattern``: search the subfolders too.

    Raises
    ------
    NotADirectoryError
        If ``folder`` is not a folder.
    ValueError
        If ``pattern`` is not a usable relative glob, or no image file matches.

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.jpg", "a.jpg", "a_mask.png"):
    ...     Image.new("RGB", (32, 32)).save(folder / name)
    >>> [p.name for p in image_files(folder, "*.jpg")]
    ['a.jpg', 'b.jpg']
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"image_files: {root} is not a folder.")
    try:
        matches = root.glob(pattern) if pattern is not None else (root.rglob("*") if recursive else root.iterdir())
        files = sorted({p for p in matches if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()},
                       key=lambda p: p.relative_to(root).as_posix())
    except (ValueError, NotImplementedError) as exc:
        raise ValueError(f"image_files: {pattern!r} is not a usable pattern ({exc}). Give a glob relative to the "
                         f"folder, e.g. '*.jpg'.") from None
    if not files:
        which = f"matching {pattern!r}" if pattern is not None else f"({', '.join(IMAGE_SUFFIXES)})"
        raise ValueError(f"image_files: no image files {which} in {root}.")
    return files


class ConstantImageError(ValueError):
    """An image whose pixels all have one value (e.g. the all-black mask of a defect-free sample): nothing to fit on."""


def check_not_constant(image: torch.Tensor, name: str = "image") -> None:
    """Raise a :class:`ConstantImageError` if every value of ``image`` is the same (a mask, a blank frame).

    Examples
    --------
    >>> check_not_constant(torch.zeros(3, 32, 32), "mask.png")
    Traceback (most recent call last):
    ...
    neon_attrib.vision.images.ConstantImageError: mask.png: every pixel is 0 (a constant image, e.g. a mask).
    """
    flat = image.reshape(-1)
    if flat.numel() and bool((flat == flat[0]).all()):
        raise ConstantImageError(f"{name}: every pixel is {float(flat[0]):.3g} (a constant image, e.g. a mask).")


# ---------------------------------------------------------------------------------------------------------------------
def _check_value_range(value_range: Sequence[float] | None) -> tuple[float, float] | None:
    if value_range is None:
        return None
    try:
        low, high = value_range
    except (TypeError, ValueError):
        raise ValueError(f"The 'value_range' parameter of load_image must be a pair (low, high). "
                         f"Got {value_range!r} instead.") from None
    ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not ok or not low < high:
        raise ValueError(f"The 'value_range' parameter of load_image must be two finite numbers low < high. "
                         f"Got {value_range!r} instead.")
    return float(low), float(high)


def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The (H, W) torchvision's ``resize(image, [size])`` gives: shorter side ``size``, the other truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _read_pixels(path: Path, size: int | None, min_size: int) -> tuple[np.ndarray, str]:
    """Decode ``path``: (H, W, 3) uint8 for 8-bit modes (kind ``"8-bit"``), else the (H, W) raw values with kind
    ``"16-bit"``, ``"int32"`` or ``"float"``. Sizes are checked from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    bomb = f"Raise PIL.Image.MAX_IMAGE_PIXELS (now {limit}) if you trust the file, or downscale it first."
    mode = "?"

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if height < min_size or width < min_size:
                    raise _HeaderError(f"load_image: {path} is {height}x{width} pixels, smaller than VGG-16's minimum "
                                    f"of {min_size}x{min_size} ('min_size'; five 2x2 max pools leave no location at "
                                    f"block 5). Use a larger image.")
                if size is not None and limit:
                    new_h, new_w = _resized_shape(height, width, size)
                    if new_h * new_w > limit:
                        raise _HeaderError(f"load_image: resizing {path} ({height}x{width}) to shorter side {size} "
                                        f"would give {new_h}x{new_w} = {new_h * new_w} pixels, more than "
                                        f"PIL.Image.MAX_IMAGE_PIXELS ({limit}). Use a smaller 'size'.")
                mode = image.mode
                if mode in ("I", "F") or mode.startswith(("I;", "F;")):
                    raw = np.array(image)
                    kind = "float" if raw.dtype.kind == "f" else ("16-bit" if raw.dtype.itemsize == 2 else "int32")
                    raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
                else:
                    raw, kind = np.array(image.convert("RGB"), dtype=np.uint8), "8-bit"
    except _HeaderError as exc:
        raise ValueError(str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"load_image: {path} looks like a decompression bomb ({exc}). {bomb}") from None
    except (UnidentifiedImageError, OSError, ValueError, TypeError, EOFError, SyntaxError, IndexError,
            KeyError) as exc:
        # Pillow's decoders report damaged files with any of these
        raise ValueError(f"load_image: Could not read {path} as an image ({type(exc).__name__}: {exc}). Check that "
                         f"the file is a complete, readable image.") from exc
    if raw.ndim != 2 and kind != "8-bit":
        raise ValueError(f"load_image: {path} has Pillow mode {mode!r} with shape {raw.shape}, which is not "
                         f"supported. Convert it to 8-bit RGB or 16-bit grey.")
    return raw, kind


class _HeaderError(Exception):
    """A size error found in the header (raised inside the decoding ``try``, re-raised as a ValueError)."""


def _to_unit_range(raw: np.ndarray, kind: str, value_range: tuple[float, float] | None, path: Path) -> np.ndarray:
    """Map raw pixel values to float32 in ``[0, 1]`` (see the module docstring); never clips."""
    if kind == "float":
        finite = np.isfinite(raw)
        if not finite.all():
            bad = int(raw.size - finite.sum())
            raise ValueError(f"load_image: {path} has {bad} non-finite pixel value(s) (NaN or inf) out of {raw.size}. "
                             f"Replace them (e.g. with numpy.nan_to_num) and save the image again.")
    if value_range is None:
        if kind == "8-bit":
            return (raw.astype(np.float32) / np.float32(255.0))
        if kind == "16-bit":
            return (raw.astype(np.float64) / _UINT16_MAX).astype(np.float32)
        value_range = (0.0, _UINT16_MAX) if kind == "int32" else (0.0, 1.0)
        described = ("a 32-bit integer image, read as 16-bit data in [0, 65535]" if kind == "int32" else
                     "a floating-point image, kept as it is in [0, 1]")
    else:
        described = f"read with value_range=({value_range[0]:g}, {value_range[1]:g})"
    low, high = value_range
    values = raw.astype(np.float64)
    outside = int(np.count_nonzero((values < low) | (values > high)))
    if outside:
        raise ValueError(f"load_image: {outside} of the {values.size} pixel values of {path} lie outside "
                         f"[{low:g}, {high:g}] ({described}; min {values.min():g}, max {values.max():g}). Pass "
                         f"value_range=(low, high) (command line: --value-range LOW HIGH) with the values that mean "
                         f"black and white; nothing is clipped.")
    return ((values - low) / (high - low)).astype(np.float32)
