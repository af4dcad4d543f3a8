"""``explain``: one call from a NEON model and inputs to relevance, through Zennit."""

from __future__ import annotations

from typing import Any

import torch
from zennit.attribution import Gradient
from zennit.core import Composite

from ._utils import ArrayLike, as_float_tensor, as_targets, module_dtype_device
from .composites import NeonComposite

__all__ = ["explain", "attribution_output"]


def attribution_output(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The relevance put on the model output: the output itself for scalar heads, ``output · one-hot(target)`` else.

    Starting LRP from the score (not from 1) makes the input relevance sum to the score where the rules conserve.
    """
    if output.ndim == 1 or target is None:
        return output
    flat = output.reshape(output.shape[0], -1)
    mask = torch.zeros_like(flat)
    mask[torch.arange(flat.shape[0], device=flat.device), target] = 1.0
    return (flat * mask).reshape(output.shape)


def explain(
    model: torch.nn.Module,
    x: ArrayLike,
    target: Any = None,
    *,
    beta: float | None = None,
    eps: float | None = None,
    composite: Composite | None = None,
    return_output: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Explain a NEON model's score for ``x``: relevance shaped like ``x``.

    The top relevance is the model's score for ``target``, so the relevance sums to that score where the rules conserve
    it (k-means and random features exactly; KDE outlierness up to the share dissipated by ``eps``). The hooks are
    registered for this call only: nothing is left on the model, and the same call twice gives the same result.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~neon_attrib.models.KDEOutlier`, :class:`~neon_attrib.models.KDEInlier`,
        :class:`~neon_attrib.models.KMeansMembership`, or any module built from NEON layers (e.g. a deep head).
    x : array-like or torch.Tensor
        Inputs, batched over the first dimension; numpy and integer data are cast to the model's dtype and device.
    target : int, sequence or tensor, optional
        Output index per sample for models with several outputs (the cluster for k-means). ``None``: the model's
        ``default_target`` (the assigned cluster for k-means), or the argmax. Ignored by scalar scores.
    beta, eps : float, optional
        Override the rules' defaults (see :class:`~neon_attrib.composites.NeonComposite`).
    composite : zennit.core.Composite, optional
        A composite to use instead of the model's default (``model.neon_composite(beta=..., eps=...)`` if the model
        defines one, else ``NeonComposite(beta, eps)``).
    return_output : bool
        Also return the model output.

    Returns
    -------
    torch.Tensor
        Relevance of the shape of ``x`` (and the output, if ``return_output``).

    Raises
    ------
    ValueError, TypeError
        On an unfitted model, bad shapes, NaN, or a target outside ``[0, K)``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(60, 4))
    >>> model = KMeansMembership(n_clusters=3, seed=0).double().fit(X)
    >>> relevance = explain(model, X[:5])
    >>> bool(torch.allclose(relevance.sum(1), model(X[:5]).amax(1)))
    True
    """
    dtype, device = module_dtype_device(model)
    name = type(model).__name__
    inputs = as_float_tensor(x, dtype=dtype, device=device, owner=name, name="x").detach().clone()
    if composite is None:
        factory = getattr(model, "neon_composite", None)
        composite = factory(beta=beta, eps=eps) if factory is not None else NeonComposite(beta=beta, eps=eps)
    elif beta is not None or eps is not None:
        raise ValueError("Pass beta/eps either to explain or to your composite, not both.")

    with torch.no_grad():
        probe = model(inputs)  # validates the input (shape, NaN, fitted) before any hook is registered
    targets = None
    if probe.ndim > 1:
        n_outputs = probe.reshape(probe.shape[0], -1).shape[1]
        if target is None:
            default = getattr(model, "default_target", None)
            targets = default(probe) if default is not None else probe.reshape(probe.shape[0], -1).argmax(-1)
        else:
            targets = as_targets(target, n=probe.shape[0], n_outputs=n_outputs, owner=name, device=probe.device)

    with Gradient(model, composite) as attributor:
        output, relevance = attributor(inputs, lambda out: attribution_output(out, targets))
    relevance = relevance.detach()
    return (relevance, output.detach()) if return_output else relevance
