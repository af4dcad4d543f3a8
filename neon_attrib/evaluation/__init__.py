"""How faithful a heatmap is: deletion and insertion curves, references, and the comparison with Captum's attribution
methods."""

from .curves import (
    DEFAULT_METHODS,
    Comparison,
    FlipCurve,
    blur_reference,
    channel_mean_reference,
    compare,
    default_reference,
    deletion_curve,
    flip_curve,
    insertion_curve,
    median_reference,
    model_score,
    nearest_reference,
    patch_mask,
)

__all__ = [
    "Comparison",
    "DEFAULT_METHODS",
    "compare",
    "FlipCurve",
    "deletion_curve",
    "insertion_curve",
    "flip_curve",
    "model_score",
    "default_reference",
    "median_reference",
    "nearest_reference",
    "blur_reference",
    "channel_mean_reference",
    "patch_mask",
]
