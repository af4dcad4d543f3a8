"""The model registry: what the package knows about each NEON model, declared once, beside the model.

A NEON model (a neuralized estimator such as :class:`~neon_attrib.models.KDEOutlier`) is declared by one
:func:`register_model` call after its class:

* its **rule**: the closed-form rule of the whole model on CNN activations (registered for
  :class:`~neon_attrib.core.composites.NeonComposite`, so ``explain``, ``NeonLRP`` and Zennit's ``Gradient`` find it);
* its **layers**: the NEON layers its forward runs through (each has its input-space rule, :func:`register_rule`);
* its **Captum rule**: ``captum_split=True`` when its forward is ``layers[-1](layers[0](x))``, so that Captum's LRP,
  which hooks leaf modules only, can apply the model's rule split over those two layers
  (:class:`neon_attrib.integrations.captum.LRP`);
* its **neuralization** (:class:`Neuralization`): the scikit-learn estimators :func:`~neon_attrib.models.neuralize`
rewrites
  as this model, the options it accepts and the function that builds it.

The registry is read by the composites, the Captum bridge and ``neuralize``; tests check the documentation and the
package's public names against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .composites import RuleFactory, register_rule

__all__ = ["Neuralization", "ModelEntry", "register_model", "registered_models", "captum_split_forwards"]


@dataclass(frozen=True)
class Neuralization:
    """How :func:`~neon_attrib.models.neuralize` rewrites fitted scikit-learn estimators as a model.

    Parameters
    ----------
    estimators : tuple of str
        The scikit-learn classes, by dotted name (``"sklearn.neighbors.KernelDensity"``); subclasses match too.
        Names, not classes, so that scikit-learn is imported only when ``neuralize`` runs.
    label : str
        How messages and the documentation name them (``"KernelDensity (kernel='gaussian')"``).
    options : tuple of str
        The keyword options ``neuralize`` passes on to ``build`` (any other one is a TypeError that lists these).
    build : callable
        ``build(estimator, **options) -> model``, e.g. the model's ``from_sklearn``.
    applies : callable, optional
        ``applies(estimator, options) -> bool`` for an estimator class that several models share: whether this model
        is the one (e.g. a KernelDensity fitted with sample weights). Called on fitted estimators only.
    """

    estimators: tuple[str, ...]
    label: str
    options: tuple[str, ...]
    build: Callable[..., Any]
    applies: Callable[[Any, Mapping[str, Any]], bool] | None = None

    def matches(self, estimator: Any) -> bool:
        """Whether ``estimator`` is an instance of one of :attr:`estimators`."""
        return any(isinstance(estimator, _load(name)) for name in self.estimators)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model (see :func:`register_model`)."""

    model: type[torch.nn.Module]
    layers: tuple[type[torch.nn.Module], ...]
    captum_split: bool
    neuralization: Neuralization | None


_MODELS: list[ModelEntry] = []


def register_model(model: type[torch.nn.Module], rule: RuleFactory, *, layers: tuple[type[torch.nn.Module], ...],
                   mode: Literal["activation", "any"] = "activation", captum_split: bool = False,
                   neuralization: Neuralization | None = None) -> type[torch.nn.Module]:
    """Declare a NEON model: its rule, its layers, its Captum rule and its neuralization, in one call.

    Parameters
    ----------
    model : type
        The model class (an ``nn.Module``).
    rule : callable
        ``rule(beta, eps) -> zennit.core.Hook``: the closed-form rule of the whole model, given the composite's
        ``beta``/``eps`` overrides (None: the model's defaults). It covers the model's layers (they get no rule of
        their own where it applies).
    layers : tuple of types
        The NEON layer classes the model's forward runs through, each with its own input-space rule
        (:func:`~neon_attrib.core.composites.register_rule`).
    mode : {"activation", "any"}
        Where ``rule`` applies: ``"activation"`` (default) for the model as a head on CNN activations (on feature
        vectors its layers' input rules apply), ``"any"`` everywhere.
    captum_split : bool
        The model's forward is ``layers[-1](layers[0](x))``: Captum's LRP applies ``rule`` split over these two
        layers. Otherwise :class:`neon_attrib.integrations.captum.LRP` refuses the model as a head and points to
        ``NeonLRP``.
    neuralization : Neuralization, optional
        The scikit-learn estimators :func:`~neon_attrib.models.neuralize` rewrites as this model.

    Returns
    -------
    type
        ``model``.

    Examples
    --------
    >>> from neon_attrib.core.layers import LogMeanExpPool, SquaredDistance
    >>> from neon_attrib.core.rules import KDEOutlierActivationRule
    >>> class SoftNearestCentroid(torch.nn.Module):
    ...     def __init__(self, centroids=torch.zeros(1, 2)):
    ...         super().__init__()
    ...         self.distance, self.pool = SquaredDistance(centroids), LogMeanExpPool(-1.0)
    ...     def forward(self, x):
    ...         return self.pool(self.distance(x))
    >>> _ = register_model(SoftNearestCentroid, lambda beta, eps: KDEOutlierActivationRule(beta=beta),
    ...                    layers=(SquaredDistance, LogMeanExpPool))
    >>> [entry.model.__name__ for entry in registered_models()][-1]
    'SoftNearestCentroid'
    """
    if not (isinstance(model, type) and issubclass(model, torch.nn.Module)):
        raise TypeError(f"register_model needs a torch.nn.Module subclass. Got {model!r}.")
    if not all(isinstance(t, type) and issubclass(t, torch.nn.Module) for t in layers):
        raise TypeError(f"The 'layers' parameter of register_model must be a tuple of torch.nn.Module subclasses. "
                        f"Got {layers!r}.")
    if captum_split and len(layers) != 2:
        raise ValueError(f"register_model with captum_split=True needs the model's two layers (input layer, pooling). "
                         f"Got {len(layers)} layers for {model.__name__}.")
    if neuralization is not None and not isinstance(neuralization, Neuralization):
        raise TypeError(f"The 'neuralization' parameter of register_model must be a Neuralization. "
                        f"Got {type(neuralization).__name__}.")
    register_rule(model, rule, mode=mode, covers_children=True)
    _MODELS[:] = [entry for entry in _MODELS if entry.model is not model]
    _MODELS.append(ModelEntry(model, tuple(layers), bool(captum_split), neuralization))
    return model


def registered_models() -> tuple[ModelEntry, ...]:
    """Every registered model, in the order of registration."""
    return tuple(_MODELS)


def captum_split_forwards() -> tuple[Callable, ...]:
    """The ``forward`` functions of the models whose rule Captum's LRP may split over their two layers (a subclass
    that overrides ``forward``, e.g. a leave-one-out head, is not one of them)."""
    return tuple(entry.model.forward for entry in _MODELS if entry.captum_split)


def _load(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)
