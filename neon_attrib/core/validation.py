"""Private helpers: input validation and conversion shared by layers, models and attribution.

Every error names the owning class, the argument and what was expected, and is raised *before* anything is changed,
so a failed call never leaves a half-updated model behind.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from .deferred import DeferredChecks

ArrayLike = Any  # numpy arrays, torch tensors, nested sequences


def module_dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """Return the floating dtype and the device of the first floating buffer or parameter of ``module``."""
    for tensor in list(module.buffers()) + list(module.parameters()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def as_float_tensor(
    x: ArrayLike,
    *,
    dtype: torch.dtype,
    device: torch.device,
    owner: str,
    name: str = "X",
    strict_float: bool = True,
) -> torch.Tensor:
    """Convert ``x`` to a floating tensor of ``dtype`` on ``device``.

    numpy arrays, Python sequences and integer/boolean tensors are cast to ``dtype`` (the module's dtype, as torch
    modules do with ``.double()``) and moved to ``device``. A *floating* tensor of another dtype or on another device
    raises, as a torch layer would, unless ``strict_float`` is False: silently casting would lose precision or hide a
    device mix-up.

    Raises
    ------
    TypeError
        If ``x`` cannot be read as numbers, or is a floating tensor of another dtype (with ``strict_float``).
    ValueError
        If ``x`` is a tensor on another device (with ``strict_float``).
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} passed to {owner} must be real-valued. Got a tensor of dtype {x.dtype} instead.")
        if x.is_floating_point() and strict_float:
            if x.dtype != dtype:
                raise TypeError(
                    f"{name} passed to {owner} has dtype {x.dtype}, but {owner} holds {dtype} data. "
                    f"Convert the model with .to({x.dtype}) (e.g. .double()) or the input with .to({dtype})."
                )
            if x.device != device:
                raise ValueError(
                    f"{name} passed to {owner} is on device {x.device}, but {owner} is on {device}. "
                    f"Move one of them with .to(device)."
                )
            return x
        return x.to(device=device, dtype=dtype)
    if hasattr(x, "toarray") and hasattr(x, "nnz"):  # scipy.sparse: np.asarray would make a 0-d object array
        raise TypeError(f"{name} passed to {owner} is a sparse {type(x).__name__}; sparse input is not supported. "
                        f"Convert it with {name}.toarray().")
    try:
        array = np.asarray(x)
    except Exception as exc:  # pragma: no cover - numpy raises many types here
        raise TypeError(f"{name} passed to {owner} must be array-like of numbers. Got {type(x).__name__}.") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{name} passed to {owner} must be array-like of numbers. Got dtype {array.dtype} instead.")
    if np.iscomplexobj(array):
        raise TypeError(f"{name} passed to {owner} must be real-valued. Got dtype {array.dtype} instead.")
    return torch.as_tensor(array.astype(np.float64, copy=False), device=device).to(dtype)


def check_2d_finite(x: torch.Tensor, *, owner: str, name: str = "X", n_features: int | None = None) -> None:
    """Check that ``x`` is a 2-D (n_samples, n_features) tensor of finite values with the expected feature count."""
    if x.ndim != 2:
        raise ValueError(
            f"{name} passed to {owner} must be 2-D of shape (n_samples, n_features). Got shape {tuple(x.shape)}. "
            f"Reshape your data: {name}.reshape(1, -1) for one sample, {name}.reshape(-1, 1) for one feature."
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} passed to {owner} has 0 feature(s) (shape={tuple(x.shape)}) while a minimum of 1 is "
                         f"required.")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"{name} has {x.shape[1]} features, but {owner} was fitted with {n_features} features.")
    finite = torch.isfinite(x).all()
    checks = DeferredChecks.active()
    if checks is not None and checks.defer:
        # inside an explanation: read back with the rules' conditions at its end; if it fails, the explanation is
        # taken again with every check on the host, where this one raises (no host read per call: one less stall on
        # a GPU, and a step a CUDA graph can hold)
        checks.record({}, "finite", finite, followed=True)
    elif not bool(finite):
        raise ValueError(f"{name} passed to {owner} contains NaN or infinity.")


def check_positive_float(value: Any, *, owner: str, name: str, allow_none: bool = False) -> None:
    """Raise a ValueError unless ``value`` is a finite real number > 0 (or None when ``allow_none``)."""
    Real(allow_none=allow_none).check(value, owner=owner, name=name)


def check_int(value: Any, *, owner: str, name: str, minimum: int) -> None:
    """Raise a ValueError unless ``value`` is an integer >= ``minimum``."""
    Integer(minimum).check(value, owner=owner, name=name)


def as_targets(target: Any, *, n: int, n_outputs: int, owner: str, device: torch.device) -> torch.Tensor:
    """Convert an int / sequence / tensor of class indices (any integer or integral float dtype) to a long tensor (n,).

    Raises
    ------
    TypeError
        If ``target`` holds non-integral values.
    ValueError
        If its length is not 1 or ``n``, or an index is outside ``[0, n_outputs)``.
    """
    if isinstance(target, torch.Tensor):
        values = target.detach().cpu().reshape(-1)
        if values.is_floating_point():
            if not bool((values == values.round()).all()):
                raise TypeError(f"target passed to {owner} must hold integer class indices. Got {target!r}.")
        elif values.dtype == torch.bool:
            raise TypeError(f"target passed to {owner} must hold integer class indices, not booleans.")
        values = values.to(torch.long)
    else:
        array = np.asarray(target).reshape(-1)
        if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
            raise TypeError(f"target passed to {owner} must hold integer class indices. Got {target!r}.")
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise TypeError(f"target passed to {owner} must hold integer class indices. Got {target!r}.")
        values = torch.as_tensor(array.astype(np.int64))
    if values.numel() not in (1, n):
        raise ValueError(f"target passed to {owner} must be one index or one per sample ({n}). Got {values.numel()}.")
    if bool(((values < 0) | (values >= n_outputs)).any()):
        raise ValueError(f"target passed to {owner} must lie in [0, {n_outputs}). Got {values.tolist()}.")
    return values.expand(n).to(device)


#: The batch norms LRP treats alike whatever Zennit version is installed: merged into the layer before them by the
#: canonizers, relevance passed through (Pass rule). Zennit 1.0's ``zennit.types.BatchNorm`` includes torchvision's
#: ``FrozenBatchNorm2d`` (detection backbones, many anomaly-detection code bases); Zennit 0.5's does not, and neither
#: includes ``SyncBatchNorm`` (what ``convert_sync_batchnorm`` makes of a model for distributed training).
BATCH_NORMS: tuple[type, ...] = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                                 torch.nn.SyncBatchNorm, FrozenBatchNorm2d)


def resolve_random_state(random_state: int | None, seed: int | None, *, owner: str) -> int | None:
    """The seed an estimator uses: ``random_state``, or the deprecated alias ``seed`` (with a FutureWarning).

    ``seed`` stays for one release so that code written for 0.1 keeps running; both given and different raises.
    """
    if seed is None:
        return random_state
    if random_state is not None and random_state != seed:
        raise ValueError(f"{owner} got random_state={random_state!r} and the deprecated seed={seed!r}. Pass only "
                         f"random_state.")
    warnings.warn(f"The 'seed' parameter of {owner} is deprecated and will be removed in the next release; use "
                  f"'random_state' instead.", FutureWarning, stacklevel=4)
    return seed


# -- declarative parameter constraints -----------------------------------------------------------------------------
class Constraint:
    """One entry of an estimator's ``_parameter_checks`` table: what a hyperparameter may be, checked at ``fit``."""

    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, *, owner: str, name: str) -> None:
        """Raise a ValueError naming the parameter, what was expected and what was received."""
        if value is None and self.allow_none:
            return
        if not self.accepts(value):
            raise ValueError(f"The '{name}' parameter of {owner} must be {self.describe()}"
                             f"{' or None' if self.allow_none else ''}. Got {value!r} instead.")


class Real(Constraint):
    """A finite real number (not a bool) above ``low`` (or at it, with ``closed``), at most ``high`` if given.

    Examples
    --------
    >>> Real().describe(), Real(closed=True).describe(), Real(high=1.0).describe()
    ('a float > 0', 'a finite float >= 0', 'a float in (0, 1]')
    """

    def __init__(self, low: float = 0.0, *, closed: bool = False, high: float | None = None, allow_none: bool = False):
        self.low, self.closed, self.high, self.allow_none = low, closed, high, allow_none

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value):
            return False
        above = float(value) >= self.low if self.closed else float(value) > self.low
        return above and (self.high is None or float(value) <= self.high)

    def describe(self) -> str:
        if self.high is not None:
            return f"a float in {'[' if self.closed else '('}{self.low:g}, {self.high:g}]"
        return f"a finite float >= {self.low:g}" if self.closed else f"a float > {self.low:g}"


class Integer(Constraint):
    """An integer (not a bool) >= ``minimum``."""

    def __init__(self, minimum: int, *, allow_none: bool = False):
        self.minimum, self.allow_none = minimum, allow_none

    def accepts(self, value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and \
            int(value) >= self.minimum

    def describe(self) -> str:
        return f"an int >= {self.minimum}"


class Boolean(Constraint):
    """``True`` or ``False`` (Python's or numpy's)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def describe(self) -> str:
        return "a bool"


class Options(Constraint):
    """One of a few strings."""

    def __init__(self, *values: str):
        self.values = values

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def describe(self) -> str:
        return f"one of {self.values}"


def check_parameters(estimator: Any, constraints: dict[str, Constraint], owner: str) -> None:
    """Check every hyperparameter of ``estimator`` named in ``constraints`` (in the table's order)."""
    for name, constraint in constraints.items():
        constraint.check(getattr(estimator, name), owner=owner, name=name)
