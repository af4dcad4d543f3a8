"""Sanity checks for explanations: the model-randomisation test (Adebayo et al., 2018).

An explanation that does not change when the network's weights are destroyed cannot be explaining the network. The
test re-initialises the layers of a model's feature extractor one after the other, from the top layer down
("cascading"), explains the same images after each step, and compares every heatmap with the heatmap of the trained
model by the Spearman rank correlation (of the relevance and of its absolute value) and by SSIM. A method that
explains the model shows similarities that fall quickly towards 0 as the randomisation goes deeper; one that mostly
reflects the input (an edge detector) stays near 1.

For a :class:`~neon_attrib.vision.deep.DeepNeon`, the head must be fitted on the randomised features again, or its
support
points (computed from the trained features) would not even describe the new feature space: ``refit="self"`` fits it
on the explained images themselves (:meth:`~neon_attrib.vision.deep.DeepNeon.fit_self`), ``refit=images`` on given
images.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..pipeline.attribution import explain

__all__ = ["RandomizationResult", "model_randomization", "spearman", "ssim"]


@dataclass
class RandomizationResult:
    """What :func:`model_randomization` returns.

    Attributes
    ----------
    layers : list of str
        The layer randomised last at each step (``"none"`` for the trained model first).
    spearman, spearman_abs, ssim : torch.Tensor
        (steps, n) similarity of each image's heatmap with the trained model's, per step.
    heatmaps : list of torch.Tensor
        (n, H, W) channel-summed relevance per step (kept if ``keep_heatmaps``).
    """

    layers: list[str]
    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    ssim: torch.Tensor
    heatmaps: list[torch.Tensor] = field(default_factory=list, repr=False)

    def summary(self) -> list[dict[str, Any]]:
        """One row per step: the layer and the mean similarities over images (for tables and JSON)."""
        return [{"layer": layer, "spearman": float(self.spearman[i].mean()),
                 "spearman_abs": float(self.spearman_abs[i].mean()), "ssim": float(self.ssim[i].mean())}
                for i, layer in enumerate(self.layers)]


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension of (n, m); tied values share their average rank (a constant map has no order)."""
    ranks = torch.empty(values.shape, dtype=torch.float64)
    for i, row in enumerate(values):
        _, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        first = (torch.cumsum(counts, 0) - counts).to(torch.float64)
        ranks[i] = (first + (counts.to(torch.float64) - 1) / 2)[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (n, ...) -> (n,). NaN-free: 0 for constant maps.

    Examples
    --------
    >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 40.0]]))
    tensor([1.], dtype=torch.float64)
    """
    ra, rb = _ranks(a.reshape(a.shape[0], -1)), _ranks(b.reshape(b.shape[0], -1))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denominator = (ra.norm(dim=-1) * rb.norm(dim=-1))
    return torch.where(denominator > 0, (ra * rb).sum(-1) / denominator.clamp_min(1e-300), 0.0)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity of each pair of maps (n, H, W) -> (n,), after scaling each map to [0, 1].

    Gaussian window (``window`` pixels, ``sigma``), constants ``C1 = 0.01²``, ``C2 = 0.03²`` (Wang et al., 2004).
    """
    def unit(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        low = x.amin(dim=(-2, -1), keepdim=True)
        span = (x.amax(dim=(-2, -1), keepdim=True) - low)
        return torch.where(span > 0, (x - low) / span.clamp_min(1e-300), torch.zeros_like(x)).unsqueeze(1)

    x, y = unit(a), unit(b)
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    kernel_1d = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])
    kernel = (kernel / kernel.sum()).reshape(1, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(t, kernel, padding=window // 2)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3))


def _default_layers(features: nn.Module) -> list[str]:
    """Names of the layers with weights of ``features``, from the top (output side) down."""
    names = [name for name, module in features.named_modules()
             if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name]
    return names[::-1]


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw the weights as at initialisation (Kaiming normal, fan-out, zero bias: torchvision's CNN init)."""
    with torch.no_grad():
        weight = module.weight
        fan_out = weight.shape[0] * (math.prod(weight.shape[2:]) if weight.ndim > 2 else 1)
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64) * math.sqrt(2.0 / fan_out)
        weight.copy_(draw.to(weight))
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


def model_randomization(
    model: nn.Module,
    images: torch.Tensor,
    *,
    refit: str | torch.Tensor | None = "self",
    layers: Sequence[str] | None = None,
    explain_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    keep_heatmaps: bool = False,
) -> RandomizationResult:
    """The cascading model-randomisation test on a deep model's feature extractor.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~neon_attrib.vision.deep.DeepNeon` (or any model with a ``features`` submodule). It is not changed:
        the
        test works on a deep copy.
    images : torch.Tensor
        (n, C, H, W) network inputs to explain.
    refit : "self", torch.Tensor or None
        How the head is fitted after each randomisation: on ``images`` themselves (``"self"``, the default: the
        setting of single-image analyses), on the given tensor of images, or not at all (``None``).
    layers : sequence of str, optional
        Names (inside ``features``) to randomise, in order; default: every layer with weights, from the top down.
    explain_fn : callable, optional
        ``explain_fn(model, images) -> relevance``; default :func:`~neon_attrib.explain` with the model's composite.
    seed : int
        Seed of the new weights.
    keep_heatmaps : bool
        Keep the heatmaps of every step.

    Returns
    -------
    RandomizationResult

    Raises
    ------
    ValueError
        If the model has no ``features``, a layer name is unknown, or ``refit`` is invalid.
    """
    if not isinstance(getattr(model, "features", None), nn.Module):
        raise ValueError(f"model_randomization needs a model with a 'features' submodule (e.g. DeepNeon). Got "
                         f"{type(model).__name__}.")
    if not (refit is None or (isinstance(refit, str) and refit == "self") or isinstance(refit, torch.Tensor)):
        raise ValueError(f"The 'refit' parameter of model_randomization must be 'self', a tensor of images or None. "
                         f"Got {refit!r}.")
    work = copy.deepcopy(model)
    modules = dict(work.features.named_modules())
    names = list(layers) if layers is not None else _default_layers(work.features)
    unknown = [name for name in names if name not in modules or not hasattr(modules[name], "weight")]
    if unknown:
        raise ValueError(f"model_randomization: {unknown} are not layers with weights in the model's features.")
    explain_fn = explain_fn or (lambda m, x: explain(m, x))
    generator = torch.Generator().manual_seed(seed)

    def heatmap(current: nn.Module) -> torch.Tensor:
        if refit is not None:
            if isinstance(refit, str):
                current.fit_self(images)
            else:
                current.fit(refit, progress=False)
        return explain_fn(current, images).detach().sum(1).to(torch.float64).cpu()

    reference = heatmap(work)
    steps, maps = ["none"], [reference]
    for name in names:
        _randomize(modules[name], generator)
        maps.append(heatmap(work))
        steps.append(name)
    rho = torch.stack([spearman(reference, current) for current in maps])
    rho_abs = torch.stack([spearman(reference.abs(), current.abs()) for current in maps])
    structural = torch.stack([ssim(reference.abs(), current.abs()) for current in maps])
    return RandomizationResult(layers=steps, spearman=rho, spearman_abs=rho_abs, ssim=structural,
                               heatmaps=maps if keep_heatmaps else [])
