"""The pieces PatchCore and PaDiM add to a :class:`~neon_attrib.vision.deep.DeepNeon`: the explained score over the
patch
grid (:class:`PatchPool` and its rule), a fixed channel subset (:class:`ChannelSelect`), the greedy k-center coreset
of a memory bank (:func:`greedy_coreset`) and the anomaly map's resampling and blur (:func:`upsample`,
:func:`gaussian_blur`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.composites import register_rule
from ..core.functional import safe_divide
from ..core.layers import ResizableBuffers
from ..core.rules import NeonHook
from ..pipeline.graph import register_gradient_leaf

__all__ = [
    "PatchPool",
    "PatchPoolRule",
    "ChannelSelect",
    "greedy_coreset",
    "gaussian_blur",
    "upsample",
    "EXPLAIN_TARGETS",
    "check_explain_target",
]

#: The named explanation targets of :class:`PatchPool` (a ``(row, col)`` pair selects one patch).
EXPLAIN_TARGETS = ("max", "sum", "excess")


def check_explain_target(target: Any, owner: str) -> str | tuple[int, int]:
    """``target`` checked: one of :data:`EXPLAIN_TARGETS` or a ``(row, col)`` pair of ints."""
    if isinstance(target, str):
        if target in EXPLAIN_TARGETS:
            return target
    elif isinstance(target, (tuple, list)) and len(target) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in target):
        return int(target[0]), int(target[1])
    raise ValueError(f"The 'explain_target' of {owner} must be one of {EXPLAIN_TARGETS} or a (row, col) pair of ints "
                     f"selecting one patch. Got {target!r} instead.")


class PatchPool(nn.Module):
    """The score that is explained, from patch scores ``s`` (n, h, w) (or (n, L)) to one number per image.

    ==================== ========================================= =====================================================
    ``target``           output                                    relevance of patch ``l`` (:class:`PatchPoolRule`)
    ==================== ========================================= =====================================================
    ``"max"``            ``max_l s_l`` (× the image weight,        all of ``R`` to the (first) maximal patch
                         PatchCore's re-weighting)
    ``"sum"``            ``Σ_l s_l``                               ``s_l / Σ s · R``
    ``"excess"``         ``Σ_l max(0, s_l − τ)``                   ``max(0, s_l − τ) / Σ max(0, s − τ) · R``: patches
                                                                   at or below the normal level ``τ`` get nothing
    ``(row, col)``       ``s[row, col]``                           all of ``R`` to that patch
    ==================== ========================================= =====================================================

    Every rule conserves exactly; the head's rule then shares a patch's relevance among its features in proportion to
    how that patch's score is computed. ``τ`` is the buffer :attr:`tau` (set by ``calibrate``).

    Parameters
    ----------
    target : {"max", "sum", "excess"} or (int, int)
        See the table. Negative indices count from the end, as in Python.

    Examples
    --------
    >>> scores = torch.tensor([[[1.0, 4.0], [2.0, 3.0]]])
    >>> PatchPool("max")(scores), PatchPool("sum")(scores), PatchPool((1, 0))(scores)
    (tensor([4.]), tensor([10.]), tensor([2.]))
    >>> pool = PatchPool("excess")
    >>> pool.tau.fill_(2.5)
    tensor(2.5000)
    >>> pool(scores)
    tensor([2.])
    """

    tau: torch.Tensor

    def __init__(self, target: str | tuple[int, int] = "max"):
        super().__init__()
        self.target = check_explain_target(target, "PatchPool")
        self.register_buffer("tau", torch.tensor(float("nan")))

    def patch_index(self, scores: torch.Tensor) -> int:
        """The flat index of the selected patch ``(row, col)`` in scores (n, h, w)."""
        if scores.ndim != 3:
            raise ValueError(f"PatchPool with a (row, col) target needs patch scores on their grid (n, h, w). Got "
                             f"shape {tuple(scores.shape)}.")
        (row, col), (h, w) = self.target, scores.shape[-2:]
        if not (-h <= row < h and -w <= col < w):
            raise ValueError(f"The explained patch (row, col) = {self.target} lies outside the {h}x{w} patch grid.")
        return (row % h) * w + col % w

    def _excess(self, flat: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(self.tau)):
            raise ValueError("The 'excess' target needs the normal level τ of the patch scores: call "
                             "calibrate(normal_images) first.")
        return (flat - self.tau).clamp_min(0.0)

    def forward(self, scores: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = scores.flatten(1)
        if self.target == "max":
            out = flat.amax(1)
            return out if weights is None else out * weights
        if self.target == "sum":
            return flat.sum(1)
        if self.target == "excess":
            return self._excess(flat).sum(1)
        return flat[:, self.patch_index(scores)]

    def extra_repr(self) -> str:
        return f"target={self.target!r}, tau={float(self.tau):.4g}"


class PatchPoolRule(NeonHook):
    """LRP rule of :class:`PatchPool`: each patch gets its share of the image's relevance (see the table there).

    Conserves exactly (a pool whose contributions are all 0 passes nothing). The image weight of PatchCore's
    re-weighting is a constant factor of the score: the maximal patch receives the whole ``R``.

    Examples
    --------
    >>> PatchPoolRule().copy()
    PatchPoolRule()
    """

    def relevance(self, module, x, out, relevance_out):
        flat = x.flatten(1)
        if module.target == "max":
            shares = F.one_hot(flat.argmax(1), flat.shape[1]).to(x.dtype) * relevance_out.unsqueeze(1)
        elif module.target in ("sum", "excess"):
            contributions = flat if module.target == "sum" else module._excess(flat)
            shares = contributions * safe_divide(relevance_out, contributions.sum(1)).unsqueeze(1)
        else:
            shares = torch.zeros_like(flat)
            shares[:, module.patch_index(x)] = relevance_out
        return shares.reshape(x.shape)


class ChannelSelect(ResizableBuffers):
    """A fixed subset of channels of (n, C, h, w) maps (PaDiM's random dimensionality reduction).

    A selection is linear with 0/1 weights: its gradient hands each selected channel its relevance and the others
    none, which is the exact LRP rule, so no composite needs a rule for it. The indices are a buffer (empty until
    fitted), so ``state_dict`` carries them.

    Examples
    --------
    >>> select = ChannelSelect(torch.tensor([0, 2]))
    >>> select(torch.arange(3.0).reshape(1, 3, 1, 1)).flatten()
    tensor([0., 2.])
    """

    index: torch.Tensor

    def __init__(self, index: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("index", torch.empty(0, dtype=torch.long) if index is None else index.long().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index.numel() == 0:
            raise ValueError("ChannelSelect has no channels yet: fit the model first.")
        if int(self.index.max()) >= x.shape[1]:
            raise ValueError(f"ChannelSelect picks channels up to {int(self.index.max())}, but the maps have "
                             f"{x.shape[1]} channels.")
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"n_channels={self.index.numel()}"


# ---------------------------------------------------------------------------------------------------------------------
# the coreset
def _first_occurrences(rows: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of every distinct row, ascending."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    n_unique = int(inverse.max()) + 1 if inverse.numel() else 0
    first = torch.full((n_unique,), rows.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    return first.sort().values


def greedy_coreset(rows: torch.Tensor, n_select: int, *, projection_dim: int | None = 128, seed: int = 0,
                   progress: bool = False) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore's memory-bank subsampling): indices of ``n_select`` distinct rows.

    Starting from a random row, repeatedly add the row farthest from everything chosen so far (its distance to the
    nearest chosen row is the largest). Distances are measured after a Gaussian random projection to
    ``projection_dim`` dimensions (Johnson-Lindenstrauss: distances kept up to a small factor) when the rows have more
    dimensions, as PatchCore does for speed.

    * **Reproducible**: the recipe is fixed, so a plain re-implementation gives the same indices:
      ``g = torch.Generator().manual_seed(seed)``; the projection ``P = torch.randn(d, k, generator=g,
      dtype=float64) / sqrt(k)`` (only if ``d > k``); ``z = rows[distinct] @ P``; the start ``distinct[torch.randint(
      len(distinct), (1,), generator=g)]``; then greedy on the squared distances of ``z`` (first maximum on ties).
    * **Never duplicates points**: only the first occurrence of every distinct row takes part, and a chosen row is
      never chosen again; if fewer distinct rows than ``n_select`` exist, all of them are returned.
    * **Bounded memory**: one vector of distances (N,) and the projected rows (N, k); no (N, N) matrix. Each step
      costs O(N·k).

    Parameters
    ----------
    rows : torch.Tensor
        (N, d) patch features.
    n_select : int
        Coreset size (>= 1).
    projection_dim : int or None
        ``k``; None: no projection.
    seed : int
        Seed of the projection and of the start.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    torch.Tensor
        (m,) long indices into ``rows``, in the order chosen, ``m = min(n_select, number of distinct rows)``.

    Examples
    --------
    >>> rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [1.0, 0.0]])
    >>> sorted(greedy_coreset(rows, 3).tolist())
    [0, 1, 2]
    """
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"greedy_coreset needs rows of shape (N >= 1, d). Got {tuple(rows.shape)}.")
    if isinstance(n_select, bool) or not isinstance(n_select, int) or n_select < 1:
        raise ValueError(f"The 'n_select' parameter of greedy_coreset must be an int >= 1. Got {n_select!r}.")
    if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
                                       or projection_dim < 1):
        raise ValueError(f"The 'projection_dim' parameter of greedy_coreset must be an int >= 1 or None. "
                         f"Got {projection_dim!r}.")
    from tqdm.auto import tqdm

    rows = rows.detach()
    generator = torch.Generator().manual_seed(int(seed))
    distinct = _first_occurrences(rows.cpu()).to(rows.device)
    dtype = rows.dtype if rows.is_floating_point() else torch.float32
    if projection_dim is not None and rows.shape[1] > projection_dim:
        projection = torch.randn(rows.shape[1], projection_dim, generator=generator, dtype=torch.float64)
        projection = (projection / math.sqrt(projection_dim)).to(device=rows.device, dtype=dtype)
        z = torch.cat([block.to(dtype) @ projection for block in rows[distinct].split(16384)])
    else:
        z = rows[distinct].to(dtype)
    n = z.shape[0]
    count = min(n_select, n)
    start = int(torch.randint(n, (1,), generator=generator))
    squared_norms = z.square().sum(1)
    chosen = torch.empty(count, dtype=torch.long, device=z.device)
    chosen[0] = start
    # squared distance to the nearest chosen row, ‖z‖² − 2 zᵀc + ‖c‖² (one matrix-vector product per step)
    nearest = torch.addmv(squared_norms + squared_norms[start], z, z[start], alpha=-2.0)
    nearest[start] = -math.inf  # chosen rows are never chosen again
    for step in tqdm(range(1, count), desc="coreset", unit="point", disable=not progress, mininterval=1.0):
        index = int(nearest.argmax())
        chosen[step] = index
        torch.minimum(nearest, torch.addmv(squared_norms + squared_norms[index], z, z[index], alpha=-2.0),
                      out=nearest)
        nearest[index] = -math.inf
    return distinct[chosen]


# ---------------------------------------------------------------------------------------------------------------------
# anomaly maps
def upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch scores (n, h, w) bilinearly resized to ``size`` = (H, W) (``align_corners=False``)."""
    return F.interpolate(scores.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float64, device: Any = None) -> torch.Tensor:
    """The normalised 1-D Gaussian of standard deviation ``sigma``, truncated at 4σ: ``2·int(4σ + 0.5) + 1`` taps."""
    radius = int(4.0 * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-coords.square() / (2.0 * sigma * sigma))
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(maps: torch.Tensor, sigma: float | None = 4.0) -> torch.Tensor:
    """Blur maps (..., H, W) with a Gaussian of ``sigma`` pixels (separable, truncated at 4σ, borders reflected).

    The anomaly maps of PatchCore and PaDiM use σ = 4 (anomalib's ``GaussianBlur2d``); use the same blur on a pixel
    heatmap to compare the two at one resolution. Maps smaller than the kernel's radius repeat their border instead.
    ``sigma`` None or 0: the maps unchanged.

    Examples
    --------
    >>> blurred = gaussian_blur(torch.ones(2, 16, 16))
    >>> bool(torch.allclose(blurred, torch.ones(2, 16, 16)))
    True
    """
    if sigma is None or sigma == 0:
        return maps
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"The 'sigma' of gaussian_blur must be a finite float >= 0 or None. Got {sigma!r}.")
    if maps.ndim < 2:
        raise ValueError(f"gaussian_blur needs maps (..., H, W). Got shape {tuple(maps.shape)}.")
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    kernel = gaussian_kernel(sigma, dtype=maps.dtype, device=maps.device)
    radius = kernel.numel() // 2
    mode = "reflect" if radius < min(shape[-2:]) else "replicate"
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return flat.reshape(shape)


register_rule(PatchPool, lambda beta, eps: PatchPoolRule(), mode="any")
register_gradient_leaf(ChannelSelect)  # a selection: its gradient is the LRP rule
