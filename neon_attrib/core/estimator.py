"""The base of every NEON estimator: an ``nn.Module`` that is also a scikit-learn estimator.

:class:`NeonEstimator` gives input conversion and checks, fitted checks, hyperparameters in the state dict, and the
scikit-learn contract (``get_params``/``set_params``, ``clone``; a hyperparameter set after ``fit`` takes effect
everywhere or raises). :mod:`neon_attrib.models.kde`, :mod:`neon_attrib.models.kmeans` and the other estimator modules
build on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from .layers import MinPool, ResizableBuffers
from .validation import (
    ArrayLike,
    Constraint,
    Integer,
    as_float_tensor,
    check_2d_finite,
    check_parameters,
    module_dtype_device,
    resolve_random_state,
)

__all__ = ["NeonEstimator", "MembershipEstimator", "SEED_CONSTRAINTS"]

#: ``random_state`` and its deprecated alias ``seed``: an int >= 0 or None
SEED_CONSTRAINTS: dict[str, Constraint] = {"random_state": Integer(0, allow_none=True),
                                           "seed": Integer(0, allow_none=True)}


class NeonEstimator(ResizableBuffers, BaseEstimator):
    """Base class of the estimators that are their neuralized networks: an ``nn.Module`` and a scikit-learn estimator.

    * ``get_params``/``set_params`` come from the constructor's signature (scikit-learn's ``BaseEstimator``), so
      ``sklearn.base.clone``, ``Pipeline`` and ``GridSearchCV`` work;
    * setting a hyperparameter of a *fitted* estimator either takes effect everywhere (``forward``, ``score``, the
      rules) or raises a ``ValueError`` that says to refit (hyperparameters listed in ``_refit_parameters``);
    * inputs are converted and checked (:meth:`_as_tensor`), the fitted state lives in buffers and in attributes ending
      in ``_``, and every constructor parameter and the fitted scalars travel in ``state_dict()['_extra_state']`` as
      plain Python values.
    """

    #: attributes saved in ``state_dict()['_extra_state']`` besides the constructor parameters (fitted scalars)
    _state_attributes: tuple[str, ...] = ()
    #: hyperparameters whose change needs a new ``fit`` (setting them on a fitted model raises)
    _refit_parameters: tuple[str, ...] = ()
    #: float attributes the forward computes with in the model's dtype: each must lie in its normal range (a kernel
    #: width of 1e-300 is 0 in float32, and the scores would be NaN or constant)
    _dtype_parameters: tuple[str, ...] = ()
    #: what each hyperparameter may be (:class:`~neon_attrib.core.validation.Real`, ``Integer``, ``Boolean``,
    #: ``Options``),
    #: checked at ``fit`` and when a fitted model's hyperparameter is set; checks that need the data or several
    #: parameters at once stay in :meth:`_validate_hyperparameters`
    _parameter_checks: ClassVar[dict[str, Constraint]] = {}

    #: the number of features seen by ``fit``; set by ``fit`` only (scikit-learn's convention: an unfitted estimator
    #: has no fitted attribute at all)
    n_features_in_: int

    # BaseEstimator's methods, typed (torch's Module.__getattr__ would otherwise type them as tensors or modules)
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return BaseEstimator.get_params(self, deep=deep)

    @classmethod
    def _get_param_names(cls) -> list[str]:
        return list(super()._get_param_names())

    def __sklearn_is_fitted__(self) -> bool:
        return self.__dict__.get("n_features_in_") is not None

    def _fitted_features(self) -> int | None:
        """``n_features_in_`` of a fitted model, None before ``fit``."""
        return self.__dict__.get("n_features_in_")

    def _unfit(self) -> None:
        """Forget ``n_features_in_`` (the model is unfitted again)."""
        self.__dict__.pop("n_features_in_", None)

    def _random_state(self) -> int | None:
        """The seed ``fit`` uses: ``random_state``, or the deprecated ``seed`` (with a FutureWarning)."""
        return resolve_random_state(getattr(self, "random_state", None), getattr(self, "seed", None),
                                    owner=self._name)

    def __setattr__(self, name: str, value: Any) -> None:
        fitted = self.__dict__.get("n_features_in_") is not None and not self.__dict__.get("_loading", False)
        if not fitted or name not in _param_names(type(self)):
            super().__setattr__(name, value)
            return
        if name in self._refit_parameters:
            if _same(getattr(self, name, None), value) or self._refit_in_place(name, value):
                return
            raise ValueError(f"The '{name}' parameter of this fitted {type(self).__name__} shapes its fitted state; "
                             f"setting it to {value!r} needs a new fit. Call set_params({name}=...) and then 'fit', "
                             f"or build a new {type(self).__name__}.")
        old = getattr(self, name)
        super().__setattr__(name, value)
        try:
            self._validate_hyperparameters()
            self._refresh_fitted()
        except Exception:
            super().__setattr__(name, old)
            raise

    def _refit_in_place(self, name: str, value: Any) -> bool:
        """Apply a new value of the refit parameter ``name`` to the fitted model without the data, if the model can
        (then return True, or raise leaving the model as it was); False: it needs a new fit (the default)."""
        return False

    def _validate_hyperparameters(self) -> None:
        """Raise a ValueError naming the parameter if a hyperparameter is invalid (the ``_parameter_checks`` table;
        subclasses add the checks a table cannot say and call this first)."""
        check_parameters(self, self._parameter_checks, self._name)

    def _refresh_fitted(self) -> None:
        """Derive the effective hyperparameters of a fitted model again (after one was set)."""
        self._configure_layers()

    # -- conversion and checks -------------------------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return type(self).__name__

    def _as_tensor(self, x: ArrayLike, name: str = "X", check_features: bool = True) -> torch.Tensor:
        dtype, device = module_dtype_device(self)
        self._check_representable(dtype)
        tensor = as_float_tensor(x, dtype=dtype, device=device, owner=self._name, name=name)
        check_2d_finite(tensor, owner=self._name, name=name,
                        n_features=self._fitted_features() if check_features else None)
        return tensor

    def _check_representable(self, dtype: torch.dtype) -> None:
        """Raise a ValueError naming the parameter when one of :attr:`_dtype_parameters` is outside the normal range
        of ``dtype`` (it would become 0 or inf there)."""
        info = torch.finfo(dtype)
        for name in self._dtype_parameters:
            value = getattr(self, name, None)
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or value == 0:
                continue
            if not info.tiny <= abs(float(value)) <= info.max:
                shown = name.rstrip("_")
                raise ValueError(f"The '{shown}' parameter of {self._name} is {float(value):.6g}"
                                 f"{' (derived)' if name.endswith('_') else ''}, which {dtype} cannot hold (its "
                                 f"normal range is [{info.tiny:.3g}, {info.max:.3g}]): it would become "
                                 f"{'0' if abs(float(value)) < info.tiny else 'inf'} and the scores NaN or constant. "
                                 f"Use float64 (model.double()) or a value in that range.")

    def _check_fitted(self) -> None:
        """Raise scikit-learn's ``NotFittedError`` (a ``ValueError`` and an ``AttributeError``) before ``fit``."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"This {self._name} instance is not fitted yet. Call 'fit' first.")

    # -- state dict ----------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        # every constructor parameter (all of them: one forgotten here, e.g. a chunk size, would make a loaded model
        # compute differently from the saved one), then the fitted attributes
        params = {key: _plain(value) for key, value in self.get_params(deep=False).items()}
        params = {key: value for key, value in params.items() if _is_plain(value)}
        fitted = {key: _plain(getattr(self, key, None)) for key in self._state_attributes}
        return {"class": self._name, **params, **fitted}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("class", self._name) != self._name:
            raise ValueError(f"Cannot load the state of a {state['class']} into a {self._name}.")
        self.__dict__["_loading"] = True
        try:
            for key in (*sorted(_param_names(type(self))), *self._state_attributes):
                if key == "n_features_in_" and state.get(key) is None:
                    self._unfit()  # an unfitted model's state
                elif key in state:
                    setattr(self, key, state[key])
        finally:
            self.__dict__.pop("_loading", None)
        self._configure_layers()

    def _configure_layers(self) -> None:
        """Push hyperparameters into the layers (after ``fit`` or ``load_state_dict``)."""


_PARAM_NAMES: dict[type, frozenset[str]] = {}


def _param_names(cls: type[NeonEstimator]) -> frozenset[str]:
    names = _PARAM_NAMES.get(cls)
    if names is None:
        names = _PARAM_NAMES[cls] = frozenset(cls._get_param_names())
    return names


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays and tensors compare element-wise
        return a is b


def _is_plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads ``value`` back (numbers, strings, None, their tuples/lists)."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers, so that ``torch.load(weights_only=True)`` reads the state dict."""
    return value.item() if isinstance(value, np.generic) else value


def _check_index(index: Any, n: int, owner: str) -> int:
    if isinstance(index, torch.Tensor):
        index = index.item()
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index passed to {owner} must be an int. Got {index!r}.")
    if not -n <= index < n:
        raise ValueError(f"index passed to {owner} must lie in [0, {n}). Got {index}.")
    return int(index) % n


class MembershipEstimator(NeonEstimator):
    """A min over linear cluster differences (``self.difference``, ``self.pool``): the forward, the assignment and the
    default β shared by the membership networks (k-means, bisecting k-means, tied Gaussian mixtures)."""

    difference: torch.nn.Module
    pool: MinPool

    beta: float | None
    default_beta_: float | None

    def _refresh_fitted(self) -> None:
        self.pool.beta = float(self.beta if self.beta is not None else (self.default_beta_ or 1.0))

    def _configure_layers(self) -> None:
        if self.__sklearn_is_fitted__():
            self._refresh_fitted()

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Membership evidence ``f_c(x)`` for every cluster (component), shape (n, K)."""
        self._check_fitted()
        return self.pool(self.difference(self._as_tensor(x)))

    @torch.no_grad()
    def predict(self, x: ArrayLike) -> torch.Tensor:
        """The assigned cluster ``argmax_c f_c(x)`` (the one with positive evidence), shape (n,), as scikit-learn's
        ``predict``."""
        return self(x).argmax(-1)

    def default_target(self, output: torch.Tensor) -> torch.Tensor:
        """The target :func:`~neon_attrib.explain` uses when none is given: the assigned cluster."""
        return output.argmax(-1)

    def _mean_evidence_beta(self, data: torch.Tensor | None) -> float:
        """``1 / mean_x f_{c(x)}(x)`` over ``data`` (1 without data or evidence): the default soft-argmin β."""
        if data is None:
            return 1.0
        evidence = self.pool(self.difference(data)).amax(-1).clamp_min(0)
        mean_evidence = float(evidence.mean()) if evidence.numel() else 0.0
        return 1.0 / mean_evidence if mean_evidence > 0 else 1.0
