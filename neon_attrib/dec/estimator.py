"""Estimator plumbing shared by :class:`~neon_attrib.dec.DEC` and the surrogate: frozen parameters after ``fit``,
checks of parameters, activations and labels, and the training device."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FrozenAfterFitMixin", "check_activations", "check_labels", "is_int", "resolve_device"]


def is_int(value, low: int) -> bool:
    """Whether ``value`` is an int (not a bool) ``>= low``."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def resolve_device(device: str | torch.device | None, X: torch.Tensor) -> torch.device:
    """``device``, or the device of the data ``X``: a GPU is used only when asked for or where the data already is, so
    a model fitted on CPU data runs on CPU inputs."""
    return X.device if device is None else torch.device(device)


def check_activations(X, name: str) -> torch.Tensor:
    """``X`` as a finite floating-point tensor of shape ``(n, ...)``; errors name the estimator ``name``."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} expects X as a torch.Tensor or numpy.ndarray. Got {type(X).__name__} instead.")
    if X.is_complex() or not (X.is_floating_point() or X.dtype in (torch.uint8, torch.int8, torch.int16,
                                                                       torch.int32, torch.int64)):
        raise TypeError(f"{name} expects real-valued X. Got dtype {X.dtype} instead.")
    if X.ndim < 2:
        raise ValueError(f"{name} expects X of shape (n_samples, ...) with at least 2 dimensions. "
                         f"Got shape {tuple(X.shape)} instead.")
    if not X.is_floating_point():
        X = X.float()
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"X contains NaN or infinity; {name} needs finite activations.")
    return X


def check_labels(y, n: int, name: str) -> torch.Tensor | None:
    """``y`` as ``n`` non-negative int64 class labels (CPU), or None; errors name ``{name}.fit``."""
    if y is None:
        return None
    try:
        y_t = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"The labels y of {name}.fit must be an array of ints. Got {type(y).__name__}.") from exc
    if y_t.ndim != 1 or y_t.shape[0] != n:
        raise ValueError(f"The labels y of {name}.fit must have shape ({n},) like X. "
                         f"Got shape {tuple(y_t.shape)} instead.")
    if y_t.is_floating_point() or y_t.is_complex() or y_t.dtype == torch.bool:
        raise ValueError(f"The labels y of {name}.fit must be non-negative ints. Got dtype {y_t.dtype} instead.")
    if n and int(y_t.min()) < 0:
        raise ValueError(f"The labels y of {name}.fit must be non-negative ints. Got minimum {int(y_t.min())} "
                         f"instead.")
    return y_t.long()


class FrozenAfterFitMixin:
    """Refuse to change constructor parameters of a fitted estimator that only take effect in ``fit``.

    Parameters named in ``_settable_after_fit`` may change at any time (they take effect at once); every other
    constructor parameter raises an ``AttributeError`` that says to refit, so that ``get_params`` always describes the
    fitted model. Unpickling and ``copy.deepcopy`` restore ``__dict__`` directly and are not affected.
    """

    _settable_after_fit: frozenset[str] = frozenset()
    _fitted_marker: str = ""

    def __setattr__(self, name: str, value) -> None:
        if (not name.startswith("_") and not name.endswith("_") and name not in self._settable_after_fit
                and self._fitted_marker in self.__dict__ and name in self._get_param_names()):
            current = self.__dict__.get(name)
            if value is not current:
                cls = type(self).__name__
                raise AttributeError(
                    f"Cannot set the '{name}' parameter of a fitted {cls} (it is {current!r}; got {value!r}): it only "
                    f"takes effect in 'fit', and the fitted model was trained with the current value. Refit a new "
                    f"estimator instead, e.g. sklearn.base.clone(estimator).set_params({name}=...).fit(...).")
        super().__setattr__(name, value)

    def __sklearn_is_fitted__(self) -> bool:
        return self._fitted_marker in self.__dict__
