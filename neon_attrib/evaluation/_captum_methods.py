"""Captum's attribution methods as :func:`neon_attrib.integrations.captum.compare` runs them: resolved from names,
classes or
``(label, factory)`` pairs with unique labels, given comparable default settings, and run from a seeded generator."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import captum.attr as captum_attr
import torch
from captum.attr import Attribution
from torch import nn

__all__ = ["MethodSpec", "default_kwargs", "make_methods", "seeded_run"]

MethodSpec = str | type | tuple[str, Callable[[nn.Module], Any]]


def make_methods(specs: Iterable[MethodSpec], model: nn.Module, *, reserved: Sequence[str],
                 method_kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``[(label, attribution)]`` for ``specs``; a ValueError for an unknown method, a label used twice (or one of
    ``reserved``: their results would overwrite each other) and ``method_kwargs`` for a label that does not run (they
    would be ignored)."""
    methods: list[tuple[str, Any]] = []
    for spec in specs:
        label, attribution = _make_method(spec, model)
        if label in reserved or any(label == other for other, _ in methods):
            raise ValueError(f"compare: the label {label!r} is used twice (by two methods, or by {' / '.join(reserved)}"
                             f"): their results would overwrite each other. Give each method its own label with a "
                             f"(label, factory) pair.")
        methods.append((label, attribution))
    labels = [label for label, _ in methods]
    for label in method_kwargs:
        if label not in labels:
            raise ValueError(f"compare got method_kwargs for {label!r}, which is not one of the Captum methods that "
                             f"run ({labels}); they would be ignored. Use a label of 'methods'.")
    return methods


def _make_method(spec: MethodSpec, model: nn.Module) -> tuple[str, Any]:
    if isinstance(spec, tuple):
        label, factory = spec
        return str(label), factory(model)
    if isinstance(spec, str):
        cls = getattr(captum_attr, spec, None)
        if not (isinstance(cls, type) and issubclass(cls, Attribution)):
            raise ValueError(f"Unknown Captum method {spec!r}: expected a class name in captum.attr "
                             f"(e.g. 'IntegratedGradients'), an Attribution class or a (label, factory) pair.")
        return spec, cls(model)
    if isinstance(spec, type) and issubclass(spec, Attribution):
        return spec.__name__, spec(model)
    raise TypeError(f"compare: a method must be a name, an Attribution class or a (label, factory) pair. Got {spec!r}.")


def default_kwargs(attribution: Any, x: torch.Tensor, ref: torch.Tensor,
                   feature_mask: torch.Tensor | None) -> dict[str, Any]:
    """Comparable settings: the deletion reference as every baseline, the curve's feature groups as Captum's."""
    parameters = inspect.signature(attribution.attribute).parameters
    kwargs: dict[str, Any] = {}
    if "baselines" in parameters:
        kwargs["baselines"] = ref
    if "feature_mask" in parameters and feature_mask is not None:
        kwargs["feature_mask"] = feature_mask.to(x.device)
    if "n_steps" in parameters and type(attribution).__name__ == "IntegratedGradients":
        kwargs["n_steps"] = 50
    if "sliding_window_shapes" in parameters:
        if x.ndim == 4:
            side = max(1, min(x.shape[-2:]) // 16)
            kwargs["sliding_window_shapes"] = (x.shape[1], side, side)
            kwargs["strides"] = (x.shape[1], side, side)
        else:
            kwargs["sliding_window_shapes"] = (1,) * (x.ndim - 1)
    return kwargs


def seeded_run(attribution: Any, x: torch.Tensor, targets: torch.Tensor | None, kwargs: dict[str, Any],
               seed: int) -> Callable[[], torch.Tensor]:
    """One run of a Captum method; Captum's sampling methods draw from torch's global generator, so each run draws
    from a fork of it seeded with ``seed`` (reproducible, and the caller's generator is untouched)."""
    devices = [x.device] if x.device.type == "cuda" else []

    def run() -> torch.Tensor:
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: it would queue CUDA seeds too
            if devices:
                with torch.cuda.device(x.device):
                    torch.cuda.manual_seed(seed)
            return attribution.attribute(x.clone(), target=targets, **kwargs)

    return run
