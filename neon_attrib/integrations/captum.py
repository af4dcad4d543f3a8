"""The Captum bridge: NEON models in existing Captum workflows.

Three ways in, from the most to the least exact:

* :class:`NeonLRP`: a :class:`captum.attr.GradientAttribution` with Captum's ``attribute`` contract that returns
  exactly :func:`neon_attrib.explain`'s relevance (the same Zennit rules and composite, for any NEON model, deep
  heads included). It plugs into ``NoiseTunnel``, ``visualize_image_attr``, ``infidelity`` and ``sensitivity_max``.
* :class:`LRP` and :class:`LayerLRP`: Captum's own LRP classes with a :class:`NeonRule` on every NEON layer for the
  duration of each call (``from neon_attrib.integrations.captum import LRP`` instead of ``from captum.attr import
  LRP``). On
  input-space models they equal ``explain``; on deep heads Captum's own rules run on the CNN layers (see
  ``docs/captum.md`` for what is exact there). Captum's ``captum.attr.LRP`` itself refuses NEON layers (it has no rule
  for them).
* Every other Captum method (Saliency, IntegratedGradients, KernelShap, ...) runs on NEON models as on any module:
  :func:`compare` puts them next to NEON, with run times and deletion curves (:mod:`neon_attrib.evaluation`).
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import nn
from zennit.core import Composite

from ..core.validation import module_dtype_device
from ..evaluation._captum_lrp import LRP, LayerLRP, NeonRule
from ..evaluation.curves import DEFAULT_METHODS, Comparison, compare
from ..pipeline.engine import run as run_pipeline

# LRP, LayerLRP, NeonRule live in neon_attrib.evaluation._captum_lrp and compare in neon_attrib.evaluation (which runs
# Captum's
# LRP through the bridge); this module is where users find them
__all__ = ["NeonLRP", "LRP", "LayerLRP", "NeonRule", "compare", "Comparison", "DEFAULT_METHODS"]


# ---------------------------------------------------------------------------------------------------------------------
# NeonLRP: explain() behind Captum's attribute() contract
class NeonLRP(GradientAttribution):
    """NEON relevance with Captum's interface: ``NeonLRP(model).attribute(inputs, target)``.

    The relevance is exactly :func:`neon_attrib.explain`'s: the same composite (``model.neon_composite()`` if the model
    defines one, else :class:`~neon_attrib.core.composites.NeonComposite`), the same default target, and the top
    relevance
    is the score, so the relevance sums to the score where the rules conserve it. Hooks live for one call only.

    Parameters
    ----------
    model : torch.nn.Module
        A NEON model (:class:`~neon_attrib.models.KDEOutlier`, :class:`~neon_attrib.models.KDEInlier`,
        :class:`~neon_attrib.models.KMeansMembership`, a deep head, or any module built from NEON layers).
    composite : zennit.core.Composite, optional
        The composite to use instead of the model's default.

    Examples
    --------
    >>> import numpy as np
    >>> from neon_attrib import KDEOutlier
    >>> model = KDEOutlier(gamma=1.0).double().fit(np.random.default_rng(0).normal(size=(30, 3)))
    >>> x = torch.zeros(2, 3, dtype=torch.float64)
    >>> relevance, delta = NeonLRP(model).attribute(x, return_convergence_delta=True)
    >>> relevance.shape, delta.shape
    (torch.Size([2, 3]), torch.Size([2]))
    """

    def __init__(self, model: nn.Module, composite: Composite | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NeonLRP needs a torch.nn.Module. Got {type(model).__name__}.")
        if composite is not None and not isinstance(composite, Composite):
            raise TypeError(f"The 'composite' parameter of NeonLRP must be a zennit Composite. Got {type(composite)}.")
        GradientAttribution.__init__(self, model)
        self.model = model
        self.composite = composite

    @property
    def multiplies_by_inputs(self) -> bool:
        """True: like Captum's LRP, NEON relevance is a *global* attribution (it sums to the score), not a local
        sensitivity; there is no separate "multiply by inputs" step to switch off (Captum's NoiseTunnel and metrics
        read this flag)."""
        return True

    def has_convergence_delta(self) -> bool:
        return True

    @typing.overload
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None, *,
                  return_convergence_delta: Literal[True]) -> tuple[TensorOrTupleOfTensorsGeneric, torch.Tensor]: ...

    @typing.overload
    def attribute(self, inputs: TensorOrTupleOfTensorsGeneric, target: TargetType = None,
                  additional_forward_args: Any = None,
                  return_convergence_delta: Literal[False] = False) -> TensorOrTupleOfTensorsGeneric: ...

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric | tuple[TensorOrTupleOfTensorsGeneric, torch.Tensor]:
        """Relevance of every input feature for the model's score, shaped like ``inputs``.

        Parameters
        ----------
        inputs : torch.Tensor or tuple of torch.Tensor
            Inputs batched over the first dimension (a tuple for models with several inputs; only inputs the score
            depends on through the rules receive relevance, the others get zeros).
        target : int, sequence or tensor, optional
            The output index per example for models with several outputs (the cluster for k-means). ``None``: the
            model's ``default_target`` (the assigned cluster for k-means), else the argmax, as in ``explain``.
            Ignored for scalar scores (KDE): pass ``None`` there, as Captum expects for scalar outputs.
        additional_forward_args : optional
            Extra arguments passed to the model after the inputs (no relevance is computed for them).
        return_convergence_delta : bool
            Also return ``score − Σ relevance`` per example (0 where the rules conserve; the share dissipated by the
            KDE ``eps`` otherwise).

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            Relevance like ``inputs`` (and the convergence delta of shape (n,), if asked for).
        """
        is_tuple = _is_tuple(inputs)
        relevances, scores = _neon_relevance(self.model, _format_tensor_into_tuples(inputs), target,
                                             additional_forward_args, self.composite)
        formatted = _format_output(is_tuple, relevances)
        if return_convergence_delta:
            return formatted, self.compute_convergence_delta(relevances, scores)
        return formatted

    def compute_convergence_delta(self, attributions: torch.Tensor | tuple[torch.Tensor, ...],
                                  output: torch.Tensor) -> torch.Tensor:
        """``output − Σ attributions`` per example (Captum's LRP convention): the relevance not conserved.

        Parameters
        ----------
        attributions : torch.Tensor or tuple of torch.Tensor
            Relevance, batched over the first dimension.
        output : torch.Tensor
            The explained score per example, shape (n,).
        """
        attributions = _format_tensor_into_tuples(attributions)
        total = sum(a.reshape(a.shape[0], -1).sum(1) for a in attributions)
        return output.reshape(-1) - total.reshape(-1)


def _neon_relevance(model: nn.Module, inputs: tuple[torch.Tensor, ...], target: Any, additional_forward_args: Any,
                    composite: Composite | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Relevance for every input tensor and the explained scores (n,): :func:`neon_attrib.explain` for tuples."""
    extra = _format_additional_forward_args(additional_forward_args) or ()
    dtype, _ = module_dtype_device(model)  # integer inputs are cast to the model's dtype, as explain does
    inputs = tuple(x if x.is_floating_point() else x.to(dtype) for x in inputs)
    result = run_pipeline(model, inputs, _captum_target(target), composite=composite, extra_args=extra, owner="NeonLRP")
    return result.relevance, result.score


def _captum_target(target: Any) -> Any:
    """Captum's 1-tuple targets as plain indices (our outputs are (n,) or (n, K))."""
    if isinstance(target, tuple):  # Captum's tuple targets index the trailing dims; our outputs are (n, K)
        if len(target) != 1:
            raise ValueError(f"NeonLRP accepts a tuple target only for (n, K) outputs, as (k,). Got {target!r}.")
        target = target[0]
    if isinstance(target, list) and target and isinstance(target[0], tuple):
        target = [t[0] for t in target]
    return target
