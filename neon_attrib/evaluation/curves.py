"""Faithfulness of any relevance on the unsupervised score itself: deletion and insertion (feature-flipping) curves.

**Deletion** (most relevant first, "MoRF"): replace the features in order of decreasing relevance by a *reference*
value and record the score after each step. A faithful explanation of an outlier score names the features that make
the point anomalous, so the score should fall quickly: a *small* area under the curve is good. **Insertion** starts
from the reference and puts the input's features back in the same order: the score should rise quickly, a *large* area
is good. ``order="least_relevant_first"`` and ``"random"`` give the baselines a faithful explanation must beat.

Removal needs a value for the removed features, and the choice matters (removal can create new artefacts, and an
out-of-distribution "removed" value is itself anomalous to an outlier model, which would make every curve *rise*). We
replace a removed feature by a typical, in-distribution value, so that "removed" means "no longer unusual":

* **tabular data**: the per-feature **median of the training data** (:func:`median_reference`; the default for models
  that store their training data, e.g. :class:`~neon_attrib.models.KDEOutlier`). A median is a value the feature
  actually takes, also for skewed or bimodal features where the mean can fall into a gap; zero is only "typical" for
  standardised data and is not assumed. :func:`nearest_reference` (each input's nearest training point) is the
  *jointly* in-distribution alternative for outlier scores: full removal then lands on a real normal example.
* **images**: a **Gaussian-blurred copy** of the image (:func:`blur_reference`, σ = 1/16 of the shorter side by
  default). Blurring removes the local structure a defect or texture detector reacts to while keeping brightness and
  the image statistics; a flat per-channel mean (:func:`channel_mean_reference`, also provided) creates sharp-edged grey
  patches that are themselves anomalous for a texture model.

For an *inlier* score the same reference is typical by construction, so removing features tends to *raise* the
score: there, compare methods by the difference between their least- and most-relevant-first curves
(:attr:`FlipCurve.area`) rather than by the sign of one curve.

Areas are reported raw (score units, trapezoid over the fraction of features flipped in [0, 1]) and normalised:
``(area − f(reference)) / (f(x) − f(reference))``, the average fraction of the way from the reference's score to the
input's score along the curve (deletion: 0 best, insertion: 1 best), per example (:attr:`FlipCurve.normalized_area`)
or for a batch's average curve (:attr:`FlipCurve.mean_normalized_area`, what :func:`compare` reports: per-example
ratios explode for examples scored like the reference).

:func:`compare` (and its figure) puts NEON next to Captum's methods on these curves, with run times; it is also
importable from :mod:`neon_attrib.integrations.captum`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from captum.attr import LRP as CaptumLRP
from torch import nn
from zennit.core import Composite

from ..core.validation import ArrayLike, module_dtype_device
from ..pipeline.engine import resolve_targets
from ..pipeline.engine import run as run_pipeline
from ._captum_lrp import LRP
from ._captum_methods import MethodSpec, default_kwargs, make_methods, seeded_run

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

Order = Literal["most_relevant_first", "least_relevant_first", "random"]
Reference = torch.Tensor | float | Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class FlipCurve:
    """A deletion or insertion curve for a batch of examples.

    Attributes
    ----------
    fractions : torch.Tensor
        Fraction of features (groups) flipped at each step, (S + 1,), from 0 to 1.
    scores : torch.Tensor
        The score after each step, (n, S + 1). Deletion starts at ``f(x)`` and ends at ``f(reference)``; insertion
        the other way round.
    mode : str
        ``"deletion"`` or ``"insertion"``.
    order : str
        The flipping order.
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    mode: str
    order: str

    @property
    def input_score(self) -> torch.Tensor:
        """``f(x)`` per example, (n,)."""
        return self.scores[:, 0] if self.mode == "deletion" else self.scores[:, -1]

    @property
    def reference_score(self) -> torch.Tensor:
        """``f(reference)`` per example, (n,)."""
        return self.scores[:, -1] if self.mode == "deletion" else self.scores[:, 0]

    @property
    def area(self) -> torch.Tensor:
        """Area under the curve per example (trapezoid over the flipped fraction), in score units, (n,)."""
        return torch.trapezoid(self.scores, self.fractions, dim=-1)

    @property
    def normalized_area(self) -> torch.Tensor:
        """``(area − f(reference)) / (f(x) − f(reference))`` per example (NaN where the two scores coincide)."""
        span = self.input_score - self.reference_score
        scale = torch.maximum(self.input_score.abs(), self.reference_score.abs()).clamp_min(1e-30)
        degenerate = span.abs() <= 1e-9 * scale
        out = (self.area - self.reference_score) / torch.where(degenerate, torch.ones_like(span), span)
        return torch.where(degenerate, torch.full_like(out, math.nan), out)

    @property
    def mean_normalized_area(self) -> float:
        """The normalised area of the *average* curve: ``(mean area − mean f(ref)) / (mean f(x) − mean f(ref))``.

        The batch summary we report: examples count in proportion to how far their score is from the reference's, so
        examples whose score barely differs from the reference's (where the per-example ratio is unstable) cannot
        dominate it. NaN when the mean scores coincide.
        """
        span = float(self.input_score.mean() - self.reference_score.mean())
        scale = max(float(self.input_score.abs().mean()), float(self.reference_score.abs().mean()), 1e-30)
        if abs(span) <= 1e-9 * scale:
            return math.nan
        return float(self.area.mean() - self.reference_score.mean()) / span

    def mean_curve(self) -> torch.Tensor:
        """The curve averaged over examples, (S + 1,)."""
        return self.scores.mean(0)


def model_score(model: nn.Module, x: torch.Tensor, target: Any = None) -> torch.Tensor:
    """The score an explanation is about, per example (n,): the output of a scalar model, else ``output[:, target]``.

    ``target=None`` follows :func:`neon_attrib.explain`: the model's ``default_target`` (the assigned cluster for
    k-means), else the argmax.
    """
    with torch.no_grad():
        output = model(x)
    targets = resolve_targets(model, output, target)
    if targets is None:
        return output.reshape(output.shape[0])
    flat = output.reshape(output.shape[0], -1)
    return flat.gather(1, targets.reshape(-1, 1)).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# reference values
def median_reference(X_train: ArrayLike) -> torch.Tensor:
    """Per-feature median of the training data (d,): the removal value for tabular data (float64, CPU).

    Examples
    --------
    >>> median_reference([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
    tensor([2., 3.], dtype=torch.float64)
    """
    array = np.asarray(X_train, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ValueError(f"median_reference needs training data of shape (n_samples, n_features). Got {array.shape}.")
    return torch.as_tensor(np.median(array, axis=0))


def nearest_reference(X_train: ArrayLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reference function for tabular data: each input's nearest training point (Euclidean).

    The *jointly* in-distribution removal for outlier scores: a removed feature takes the value it has in the most
    similar normal example, so removing every feature yields a real data point, where a per-feature median can be an
    unusual combination. Exclude the explained point from ``X_train`` (leave-one-out), or it is its own neighbour.
    """
    data = torch.as_tensor(np.asarray(X_train, dtype=np.float64))
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"nearest_reference needs training data of shape (n_samples, n_features). Got "
                         f"{tuple(data.shape)}.")

    def nearest(x: torch.Tensor) -> torch.Tensor:
        support = data.to(dtype=x.dtype, device=x.device)
        return support[torch.cdist(x.reshape(x.shape[0], -1), support).argmin(1)].reshape(x.shape)

    return nearest


def blur_reference(sigma: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reference function for images (n, C, H, W): the Gaussian-blurred image (reflect padding).

    Parameters
    ----------
    sigma : float, optional
        Standard deviation in pixels; default ``max(1, min(H, W) / 16)``.
    """
    if sigma is not None and not sigma > 0:
        raise ValueError(f"The 'sigma' parameter of blur_reference must be a float > 0. Got {sigma!r} instead.")

    def blur(x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import gaussian_blur

        if x.ndim != 4:
            raise ValueError(f"blur_reference needs images of shape (n, C, H, W). Got {tuple(x.shape)}.")
        s = float(sigma) if sigma is not None else max(1.0, min(x.shape[-2:]) / 16.0)
        size = 2 * math.ceil(3 * s) + 1
        size = min(size, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflect padding needs kernel < image
        return gaussian_blur(x, [size, size], [s, s])

    return blur


def channel_mean_reference(x: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel mean, broadcast over the pixels (a flat grey image), for images (n, C, H, W)."""
    return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)


def default_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The documented default reference: the training median for 2-D inputs, a blurred copy for images.

    Raises
    ------
    ValueError
        For 2-D inputs to a model that does not store its training data (e.g. k-means: pass
        ``reference=median_reference(X_train)``), and for other input shapes.
    """
    if x.ndim == 4:
        return blur_reference()(x)
    if x.ndim == 2:
        data = getattr(model, "support_", None) if hasattr(type(model), "support_") else None
        if data is None:
            data = model._buffers.get("support") if isinstance(model, nn.Module) else None
        if data is not None and data.numel() > 0:
            return torch.as_tensor(np.median(data.detach().cpu().double().numpy(), axis=0)).to(x)
        raise ValueError(f"{type(model).__name__} does not store its training data: pass "
                         "reference=median_reference(X_train) (the per-feature training median).")
    raise ValueError(f"No default reference for inputs of shape {tuple(x.shape)}: pass 'reference' (a tensor "
                     "broadcastable to the inputs, or a function of them).")


def _reference_tensor(model: nn.Module, x: torch.Tensor, reference: Reference) -> torch.Tensor:
    if reference is None:
        ref = default_reference(model, x)
    elif callable(reference) and not isinstance(reference, torch.Tensor):
        ref = reference(x)
    else:
        ref = torch.as_tensor(reference)
    ref = ref.to(dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(ref, x.shape)
    except RuntimeError as exc:
        raise ValueError(f"reference of shape {tuple(ref.shape)} does not broadcast to the inputs "
                         f"{tuple(x.shape)}.") from exc


def patch_mask(shape: tuple[int, ...], patch: int) -> torch.Tensor:
    """Feature groups for images: square ``patch × patch`` pixel patches over all channels.

    Parameters
    ----------
    shape : tuple
        One image's shape (C, H, W).
    patch : int
        Patch side in pixels (the last row/column of patches may be smaller).

    Returns
    -------
    torch.Tensor
        Integer group ids of shape (1, H, W) (broadcast over channels), numbered row by row from 0.

    Examples
    --------
    >>> patch_mask((3, 4, 4), 2)[0]
    tensor([[0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 3, 3],
            [2, 2, 3, 3]])
    """
    if len(shape) != 3:
        raise ValueError(f"patch_mask needs an image shape (C, H, W). Got {shape}.")
    if not (isinstance(patch, int) and patch >= 1):
        raise ValueError(f"The 'patch' parameter of patch_mask must be an int >= 1. Got {patch!r} instead.")
    _, h, w = shape
    rows = torch.arange(h) // patch
    cols = torch.arange(w) // patch
    n_cols = (w + patch - 1) // patch
    return (rows[:, None] * n_cols + cols[None, :]).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------------
# curves
def flip_curve(
    model: nn.Module,
    x: ArrayLike,
    relevance: ArrayLike,
    *,
    mode: Literal["deletion", "insertion"] = "deletion",
    order: Order = "most_relevant_first",
    target: Any = None,
    reference: Reference = None,
    feature_mask: torch.Tensor | None = None,
    n_steps: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> FlipCurve:
    """Deletion or insertion curve of ``model``'s score for inputs ``x`` ranked by ``relevance``.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; the score is :func:`model_score` (the output, or the ``target`` column).
    x : array-like or torch.Tensor
        Inputs (n, ...), cast to the model's dtype and device.
    relevance : array-like or torch.Tensor
        Relevance of the shape of ``x`` (from any method). Within a feature group it is summed.
    mode : {"deletion", "insertion"}
        Deletion replaces features by the reference; insertion starts from the reference and restores them.
    order : {"most_relevant_first", "least_relevant_first", "random"}
        The flipping order (random: one seeded permutation per example).
    target : optional
        The output column per example; ``None`` as in :func:`neon_attrib.explain`. Fixed along the curve.
    reference : tensor, float or callable, optional
        The value of a removed feature: a tensor broadcastable to ``x``, a number, or a function ``x → tensor``.
        ``None``: :func:`default_reference` (the training median for tabular data, a blurred copy for images).
    feature_mask : torch.Tensor, optional
        Integer group ids ``0..G−1`` broadcastable to one example's shape (or to ``x``); a group is flipped at once.
        Default: every element of ``x[0]`` is its own feature. See :func:`patch_mask` for images.
    n_steps : int, optional
        Number of steps; default ``G`` (one feature at a time) when ``G <= 100``, else 50.
    batch_size : int
        Perturbed inputs evaluated per forward pass.
    seed : int
        Seed of the random order.

    Returns
    -------
    FlipCurve

    Examples
    --------
    >>> class FirstFeature(nn.Module):  # the score is the first feature
    ...     def forward(self, x):
    ...         return x[:, 0]
    >>> curve = deletion_curve(FirstFeature(), torch.ones(1, 3), torch.tensor([[0.1, 0.5, 0.2]]), reference=0.0)
    >>> curve.scores  # the first feature is ranked last
    tensor([[1., 1., 1., 0.]], dtype=torch.float64)
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"The 'mode' parameter of flip_curve must be 'deletion' or 'insertion'. Got {mode!r}.")
    if order not in ("most_relevant_first", "least_relevant_first", "random"):
        raise ValueError("The 'order' parameter of flip_curve must be 'most_relevant_first', 'least_relevant_first' "
                         f"or 'random'. Got {order!r}.")
    dtype, device = module_dtype_device(model)
    x = _as_input(x, dtype, device)
    relevance = _real_finite(relevance, device)
    if relevance.shape != x.shape:
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}, but the inputs have shape {tuple(x.shape)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter of flip_curve must be an int >= 1. Got {batch_size!r} instead.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"The 'seed' parameter of flip_curve must be an int >= 0. Got {seed!r} instead.")
    ref = _reference_tensor(model, x, reference)
    n = x.shape[0]
    if n == 0:
        fractions = torch.linspace(0, 1, 2, dtype=torch.float64)
        return FlipCurve(fractions=fractions, scores=torch.zeros(0, 2, dtype=torch.float64), mode=mode, order=order)

    mask, n_groups = _feature_mask(feature_mask, x)
    group_relevance = torch.zeros(n, n_groups, dtype=torch.float64, device=device)
    group_relevance.scatter_add_(1, mask.reshape(n, -1), relevance.reshape(n, -1))
    if order == "random":
        generator = torch.Generator().manual_seed(seed)
        ranking = torch.stack([torch.randperm(n_groups, generator=generator) for _ in range(n)]).to(device)
    else:
        sign = -1.0 if order == "most_relevant_first" else 1.0
        ranking = torch.argsort(sign * group_relevance, dim=1, stable=True)
    rank = torch.empty_like(ranking)
    rank.scatter_(1, ranking, torch.arange(n_groups, device=device).expand(n, -1).contiguous())
    element_rank = rank.gather(1, mask.reshape(n, -1)).reshape(x.shape)

    steps = n_steps if n_steps is not None else (n_groups if n_groups <= 100 else 50)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"The 'n_steps' parameter of flip_curve must be an int >= 1. Got {n_steps!r} instead.")
    steps = min(steps, n_groups)
    counts = torch.round(torch.linspace(0, n_groups, steps + 1, dtype=torch.float64)).long().tolist()

    with torch.no_grad():
        output = model(x)
    targets = resolve_targets(model, output, target)

    scores = torch.empty(n, steps + 1, dtype=torch.float64)
    jobs = [(i, k) for i in range(n) for k in range(steps + 1)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        rows = torch.tensor([i for i, _ in chunk], device=device)
        limits = torch.tensor([counts[k] for _, k in chunk], device=device).reshape((-1,) + (1,) * (x.ndim - 1))
        flipped = element_rank[rows] < limits
        if mode == "deletion":
            batch = torch.where(flipped, ref[rows], x[rows])
        else:
            batch = torch.where(flipped, x[rows], ref[rows])
        with torch.no_grad():
            out = model(batch)
        if targets is None:
            values = out.reshape(out.shape[0])
        else:
            values = out.reshape(out.shape[0], -1).gather(1, targets[rows].reshape(-1, 1)).squeeze(1)
        for (i, k), value in zip(chunk, values.detach().double().cpu()):
            scores[i, k] = value
    fractions = torch.tensor(counts, dtype=torch.float64) / n_groups
    return FlipCurve(fractions=fractions, scores=scores, mode=mode, order=order)


def deletion_curve(model: nn.Module, x: ArrayLike, relevance: ArrayLike, **kwargs: Any) -> FlipCurve:
    """Deletion curve: features replaced by the reference, most relevant first (see :func:`flip_curve`).

    For an outlier score a faithful explanation makes the score fall fast: small (normalised) area is good.
    """
    return flip_curve(model, x, relevance, mode="deletion", **kwargs)


def insertion_curve(model: nn.Module, x: ArrayLike, relevance: ArrayLike, **kwargs: Any) -> FlipCurve:
    """Insertion curve: from the reference, the input's features restored most relevant first (see
    :func:`flip_curve`). A faithful explanation makes the score rise fast: large (normalised) area is good."""
    return flip_curve(model, x, relevance, mode="insertion", **kwargs)


def _as_input(x: ArrayLike, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device).to(dtype)


def _real_finite(relevance: ArrayLike, device: torch.device) -> torch.Tensor:
    """``relevance`` as float64 on ``device``; a ValueError for complex or non-finite values (a ranking would drop the
    imaginary part, or put NaN at an arbitrary place)."""
    tensor = torch.as_tensor(relevance).detach()
    if tensor.is_complex():
        raise ValueError(f"relevance must be real; got a complex {tensor.dtype} (its imaginary part would be dropped).")
    tensor = tensor.to(device=device, dtype=torch.float64)
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"relevance has {bad} non-finite value(s) (NaN or ±inf) out of {tensor.numel()}; a ranking "
                         f"by it would be arbitrary. Find where they come from (the audit of the explanation says).")
    return tensor


def _feature_mask(feature_mask: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The feature groups broadcast to ``x`` as consecutive ids ``0..G−1`` (ids that no element uses are no
    features, so they are dropped from the count), and ``G``; every example must have all ``G`` groups (the curves
    share one fractions axis)."""
    if feature_mask is None:
        n_features = x[0].numel()
        return torch.arange(n_features, device=x.device).reshape(x.shape[1:]).expand(x.shape).contiguous(), n_features
    mask = torch.as_tensor(feature_mask, device=x.device)
    if mask.is_floating_point() or mask.dtype == torch.bool:
        raise TypeError(f"feature_mask must hold integer group ids. Got dtype {mask.dtype}.")
    try:
        mask = torch.broadcast_to(mask if mask.ndim == x.ndim else mask.unsqueeze(0), x.shape).long().contiguous()
    except RuntimeError as exc:
        raise ValueError(f"feature_mask of shape {tuple(mask.shape)} does not broadcast to {tuple(x.shape)}.") from exc
    if bool((mask < 0).any()):
        raise ValueError("feature_mask must hold group ids >= 0.")
    ids, mask = torch.unique(mask, return_inverse=True)
    n_groups, n = ids.numel(), x.shape[0]
    present = torch.zeros(n, n_groups, dtype=torch.bool, device=x.device)
    present.scatter_(1, mask.reshape(n, -1), True)
    counts = present.sum(1)
    if n and bool((counts < n_groups).any()):
        example = int(torch.nonzero(counts < n_groups)[0])
        raise ValueError(f"feature_mask: example {example} has {int(counts[example])} of the {n_groups} feature groups "
                         f"the mask uses; every example needs every group (the curves share one fractions axis).")
    return mask.reshape(x.shape).contiguous(), n_groups


# ---------------------------------------------------------------------------------------------------------------------
# compare: NEON next to the Captum methods you use today
#: Captum methods :func:`compare` runs by default: a gradient, gradient × input, a path method, an occlusion and a
#: sampling method.
DEFAULT_METHODS: tuple[str, ...] = ("Saliency", "InputXGradient", "IntegratedGradients", "Occlusion", "KernelShap")


@dataclass
class Comparison:
    """What :func:`compare` returns: one row per method, their relevances, curves and a figure.

    Attributes
    ----------
    rows : list of dict
        Per method: ``method``, ``seconds`` (median wall time per explained example), ``relative_time`` (to NEON),
        ``deletion`` (mean normalised deletion area: lower is better), ``insertion`` (mean normalised insertion area:
        higher is better), ``deletion_raw`` (mean deletion area in score units). The ``Random`` row is the random-order
        baseline (no relevance, no time).
    relevances : dict of str to torch.Tensor
        The relevance of every method, shaped like the inputs.
    curves : dict of str to dict of str to FlipCurve
        ``curves[method]["deletion"]`` and ``["insertion"]``.
    scores : torch.Tensor
        The explained score per example.
    figure : matplotlib.figure.Figure or None
        Relevance of the first example per method, and the mean deletion curves.
    """

    rows: list[dict[str, Any]]
    relevances: dict[str, torch.Tensor]
    curves: dict[str, dict[str, FlipCurve]]
    scores: torch.Tensor
    figure: Any = None

    def __str__(self) -> str:
        header = f"{'method':<22}{'s / example':>13}{'× NEON':>9}{'deletion ↓':>12}{'insertion ↑':>13}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.2e}"
            relative = "" if row["relative_time"] is None else f"{row['relative_time']:.1f}"
            lines.append(f"{row['method']:<22}{seconds:>13}{relative:>9}{row['deletion']:>12.3f}"
                         f"{row['insertion']:>13.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The rows and the mean curves as plain Python (for JSON)."""
        return {"rows": self.rows,
                "curves": {name: {mode: {"fractions": c.fractions.tolist(), "mean_scores": c.mean_curve().tolist()}
                                  for mode, c in curves.items()} for name, curves in self.curves.items()}}


def compare(
    model: nn.Module,
    x: torch.Tensor,
    methods: Sequence[MethodSpec] = DEFAULT_METHODS,
    *,
    target: Any = None,
    reference: Reference = None,
    feature_mask: torch.Tensor | None = None,
    n_steps: int | None = None,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    composite: Composite | None = None,
    repeats: int = 1,
    figure: bool = True,
    feature_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Comparison:
    """Run NEON and Captum methods on the same score and inputs; time them and evaluate them by deletion/insertion.

    Every method explains the same number: the model's score (KDE) or the ``target`` cluster's evidence (k-means,
    default: each example's assigned cluster). Perturbation methods and Integrated Gradients use the same ``reference``
    as the deletion curves (their baseline is what "removed" means), so all methods are judged on one footing.

    Parameters
    ----------
    model : torch.nn.Module
        A NEON model (or any module with a score; NEON then needs its rules).
    x : torch.Tensor
        Inputs (n, d) or images (n, C, H, W), in the model's dtype.
    methods : sequence
        Captum methods: names in ``captum.attr`` (``"IntegratedGradients"``), Attribution classes, or
        ``(label, factory)`` pairs with ``factory(model) -> Attribution``. NEON (:func:`~neon_attrib.explain`'s
        relevance, as :class:`~neon_attrib.integrations.captum.NeonLRP` gives it) always runs first. Captum's LRP
        (``"LRP"`` or
        ``captum.attr.LRP``) runs as :class:`neon_attrib.integrations.captum.LRP`, with the NEON rules on the NEON
        layers.
    target : optional
        Output index per example (k-means cluster); default as in :func:`neon_attrib.explain`.
    reference : tensor, float or callable, optional
        Value of a removed feature (:func:`~neon_attrib.evaluation.default_reference`: the training median for tabular
        data, a blurred copy for images); also the baseline of IG, DeepLift, Occlusion, ablation and Shapley methods.
    feature_mask : torch.Tensor, optional
        Feature groups for the curves and the perturbation methods; default: every feature (tabular), 4 × 4 … pixel
        patches of side ``max(1, min(H, W) // 16)`` over all channels (images).
    n_steps : int, optional
        Steps of the curves (default: one per feature up to 100 groups, else 50).
    method_kwargs : dict, optional
        Extra ``attribute`` keyword arguments per method label, overriding the defaults above (e.g.
        ``{"IntegratedGradients": {"n_steps": 200}}``).
    composite : zennit.core.Composite, optional
        NEON's composite (default: the model's).
    repeats : int
        Timed runs per method (the median is reported).
    figure : bool
        Draw the matplotlib figure.
    feature_names : sequence of str, optional
        Names for the bar chart of tabular relevance.
    seed : int
        Seed of the sampling methods (KernelShap, Lime, ShapleyValueSampling, ...): every run of every method starts
        from it (the caller's global generator is left as it was), and of the random curve.

    Returns
    -------
    Comparison
        ``print(result)`` shows the table.

    Raises
    ------
    ValueError
        For an unknown method, two methods with one label (or the label of NEON / Random), ``method_kwargs`` for a
        label that does not run, or no example.

    Examples
    --------
    >>> import numpy as np
    >>> from neon_attrib import KDEOutlier
    >>> X = np.random.default_rng(0).normal(size=(50, 3))
    >>> model = KDEOutlier(gamma=1.0).double().fit(X)
    >>> result = compare(model, torch.tensor(X[:4]), methods=["Saliency"], figure=False)
    >>> [row["method"] for row in result.rows]
    ['NEON', 'Saliency', 'Random']
    """
    dtype, device = module_dtype_device(model)
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    x = x.detach().to(device=device, dtype=dtype)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"compare needs at least one example to explain. Got x of shape {tuple(x.shape)}.")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"The 'repeats' parameter of compare must be an int >= 1. Got {repeats!r} instead.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"The 'seed' parameter of compare must be an int >= 0. Got {seed!r} instead.")
    with torch.no_grad():
        output = model(x)
    targets = resolve_targets(model, output, target)
    scores = model_score(model, x, targets)
    ref = _reference_tensor(model, x, reference)
    if feature_mask is None and x.ndim == 4:
        feature_mask = patch_mask(tuple(x.shape[1:]), max(1, min(x.shape[-2:]) // 16)).unsqueeze(0)
    extra = dict(method_kwargs or {})

    runs: list[tuple[str, Callable[[], torch.Tensor]]] = []
    runs.append(("NEON", lambda: run_pipeline(model, (x,), targets, composite=composite,
                                              owner="compare").relevance[0]))
    specs = [("LRP", LRP) if spec == "LRP" or spec is CaptumLRP else spec for spec in methods]  # with NEON rules
    for label, attribution in make_methods(specs, model, reserved=("NEON", "Random"), method_kwargs=extra):
        kwargs = {**default_kwargs(attribution, x, ref, feature_mask), **extra.get(label, {})}
        runs.append((label, seeded_run(attribution, x, targets, kwargs, seed)))

    rows: list[dict[str, Any]] = []
    relevances: dict[str, torch.Tensor] = {}
    curves: dict[str, dict[str, FlipCurve]] = {}
    curve_kwargs: dict[str, Any] = dict(target=targets, reference=ref, feature_mask=feature_mask, n_steps=n_steps)
    for label, run in runs:
        run()  # warm-up: first-call costs (allocations, lazy imports) are not the method's
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            relevance = run()
            times.append(time.perf_counter() - start)
        relevance = relevance.detach().to(torch.float64)
        relevances[label] = relevance
        curves[label] = {"deletion": deletion_curve(model, x, relevance, **curve_kwargs),
                         "insertion": insertion_curve(model, x, relevance, **curve_kwargs)}
        rows.append({"method": label, "seconds": float(np.median(times)) / x.shape[0]})
    random_relevance = torch.zeros_like(x, dtype=torch.float64)
    curves["Random"] = {mode: flip_curve(model, x, random_relevance, mode=mode, order="random", seed=seed,
                                         **curve_kwargs)
                        for mode in ("deletion", "insertion")}
    rows.append({"method": "Random", "seconds": None})
    neon_seconds = rows[0]["seconds"]
    for row in rows:
        c = curves[row["method"]]
        row["relative_time"] = None if row["seconds"] is None else row["seconds"] / neon_seconds
        row["deletion"] = c["deletion"].mean_normalized_area
        row["insertion"] = c["insertion"].mean_normalized_area
        row["deletion_raw"] = float(c["deletion"].area.mean())
    result = Comparison(rows=rows, relevances=relevances, curves=curves, scores=scores)
    if figure:
        result.figure = _comparison_figure(result, x, feature_names)
    return result


def _comparison_figure(result: Comparison, x: torch.Tensor, feature_names: Sequence[str] | None) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, nothing left open

    methods = list(result.relevances)
    if x.ndim == 4:
        fig = Figure(figsize=(2.2 * (len(methods) + 1), 5.2), layout="constrained")
        grid = fig.add_gridspec(2, len(methods) + 1, height_ratios=[1, 1.2])
        image = x[0].detach().double().cpu()
        shown = image.mean(0) if image.shape[0] != 3 else (image - image.min()) / (image.max() - image.min() + 1e-12)
        ax = fig.add_subplot(grid[0, 0])
        ax.imshow(shown.permute(1, 2, 0).numpy() if shown.ndim == 3 else shown.numpy(), cmap="gray")
        ax.set_title("input", fontsize=9)
        ax.axis("off")
        for i, name in enumerate(methods):
            heat = result.relevances[name][0].sum(0).cpu().numpy()
            bound = float(np.abs(heat).max()) or 1.0
            ax = fig.add_subplot(grid[0, i + 1])
            ax.imshow(heat, cmap="bwr", vmin=-bound, vmax=bound)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        curve_ax = fig.add_subplot(grid[1, :])
    else:
        fig = Figure(figsize=(11, 3.8), layout="constrained")
        bar_ax, curve_ax = fig.subplots(1, 2)
        d = x.shape[1]
        width = 0.8 / len(methods)
        for i, name in enumerate(methods):
            values = result.relevances[name][0].cpu().numpy()
            scale = float(np.abs(values).max()) or 1.0
            bar_ax.bar(np.arange(d) + (i - (len(methods) - 1) / 2) * width, values / scale, width, label=name)
        names = list(feature_names) if feature_names is not None else [str(i) for i in range(d)]
        bar_ax.set_xticks(np.arange(d), names, rotation=30, ha="right", fontsize=8)
        bar_ax.axhline(0, color="black", linewidth=0.6)
        bar_ax.set_ylabel("relevance / max |relevance|")
        bar_ax.set_title("first example", fontsize=10)
        bar_ax.legend(fontsize=7)
    for name, curves in result.curves.items():
        curve = curves["deletion"]
        start, end = float(curve.input_score.mean()), float(curve.reference_score.mean())
        normalised = (curve.mean_curve() - end) / (start - end if start != end else 1.0)
        style: dict[str, Any] = {"color": "gray", "linestyle": "--"} if name == "Random" else {}
        curve_ax.plot(curve.fractions.numpy(), normalised.numpy(), label=name, **style)
    curve_ax.set_xlabel("fraction of features removed (most relevant first)")
    curve_ax.set_ylabel("mean score (1 = input, 0 = reference)")
    curve_ax.set_title("deletion curves (lower is better)", fontsize=10)
    curve_ax.legend(fontsize=7)
    return fig
