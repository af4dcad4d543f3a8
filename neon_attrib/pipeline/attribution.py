"""``explain``: one call from a NEON model and inputs to relevance (through :mod:`neon_attrib.pipeline`)."""

from __future__ import annotations

from typing import Any

import torch
from zennit.core import Composite

from ..core.validation import ArrayLike, as_float_tensor, module_dtype_device
from .engine import Audit, attribution_output, run

__all__ = ["explain", "attribution_output"]


def explain(
    model: torch.nn.Module,
    x: ArrayLike,
    target: Any = None,
    *,
    beta: float | None = None,
    eps: float | None = None,
    composite: Composite | None = None,
    return_output: bool = False,
    return_audit: bool = False,
    strict: bool = False,
    precision: str = "exact",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Explain a NEON model's score for ``x``: relevance shaped like ``x``.

    The top relevance is the model's score for ``target``, so the relevance sums to that score where the rules conserve
    it (k-means and random features exactly; KDE outlierness up to the share dissipated by ``eps``). Every call is
    audited for conservation (:class:`~neon_attrib.pipeline.Audit`): relevance created or destroyed where no rule ran
    gives a :class:`~neon_attrib.pipeline.ConservationWarning`. Hooks live on a private copy of the model for this call
    only: nothing is left on the model, the same call twice gives the same result, and calls from several threads on
    one model are safe.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~neon_attrib.models.KDEOutlier`, :class:`~neon_attrib.models.KDEInlier`,
        :class:`~neon_attrib.models.KMeansMembership`, a :class:`~neon_attrib.vision.deep.DeepNeon`, a DEC head, or any
        module built from NEON layers.
    x : array-like or torch.Tensor
        Inputs, batched over the first dimension; numpy and integer data are cast to the model's dtype and device.
        A batch of zero rows gives an empty relevance.
    target : int, sequence or tensor, optional
        Output index per sample for models with several outputs (the cluster for k-means). ``None``: the model's
        ``default_target`` (the assigned cluster for k-means), or the argmax. Ignored by scalar scores.
    beta, eps : float, optional
        Override the rules' defaults (see :class:`~neon_attrib.core.composites.NeonComposite`).
    composite : zennit.core.Composite, optional
        Rules for the layers that are not NEON layers (e.g. ``EpsilonGammaBox(low, high)`` for a CNN under a deep
        head); the NEON layers always keep their rules. A :class:`~neon_attrib.core.composites.NeonComposite` is used as
        it is. Default: the model's own (``model.neon_composite()``).
    return_output : bool
        Also return the model output.
    return_audit : bool
        Also return the :class:`~neon_attrib.pipeline.Audit` (after the output, if that is returned too).
    strict : bool
        Raise :class:`~neon_attrib.pipeline.ConservationError` instead of warning when the audit fails.
    precision : {"exact", "fast"}
        On a GPU: ``"exact"`` (default) computes in full float32 with deterministic convolutions; ``"fast"`` allows
        TensorFloat-32 (approximate). See :func:`~neon_attrib.pipeline.precision_mode`.

    Returns
    -------
    torch.Tensor
        Relevance of the shape of ``x`` (then the output and the audit, if asked for).

    Raises
    ------
    ValueError, TypeError
        On an unfitted model, bad shapes, NaN, a target outside ``[0, K)``, or a NEON layer the composite left
        without its rule.

    Examples
    --------
    >>> import numpy as np
    >>> from neon_attrib import KMeansMembership
    >>> X = np.random.default_rng(0).normal(size=(60, 4))
    >>> model = KMeansMembership(n_clusters=3, random_state=0).double().fit(X)
    >>> relevance = explain(model, X[:5])
    >>> bool(torch.allclose(relevance.sum(1), model(X[:5]).amax(1)))
    True
    """
    dtype, device = module_dtype_device(model)
    inputs = as_float_tensor(x, dtype=dtype, device=device, owner=type(model).__name__, name="x")
    result = run(model, (inputs,), target, composite=composite, beta=beta, eps=eps, strict=strict,
                 precision=precision)
    relevance = result.relevance[0]
    extras: list[torch.Tensor | Audit | None] = []
    if return_output:
        extras.append(result.output)
    if return_audit:
        extras.append(result.audit)
    return (relevance, *extras) if extras else relevance
