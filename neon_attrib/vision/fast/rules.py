"""Fast exact rules for ``torch.nn.Linear`` and ConvNd layers: Epsilon, Gamma, AlphaBeta, ZPlus, ZBox, Flat."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from zennit.core import Hook, RemovableHandleList, expand
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, ZBox, ZPlus

from ...core.deferred import Bound, Condition, decide
from ...core.fused import masked_bounds
from ._core import (
    FastHook,
    StabilizerLike,
    _check_stabilizer,
    _clamped,
    _gamma_mod,
    _LinearMap,
    _stabilize,
    _stabilized_ratio,
    _supports,
    _zero_params,
)

__all__ = ["FastEpsilon", "FastGamma", "FastZPlus", "FastAlphaBeta", "FastZBox", "FastFlat"]


# ---------------------------------------------------------------------------------------------------------------------
# rules for Linear and ConvNd layers
# ---------------------------------------------------------------------------------------------------------------------


def _float_mask(compare: Callable, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``compare(z, 0)`` as 1.0 / 0.0 in ``like``'s dtype: comparisons into bool tensors, and their products and
    reductions, are several times slower on CPUs than float ones."""
    return compare(z, 0, out=like.new_empty(z.shape))


class _LinearRule(FastHook):
    """Shared parts of the rules for Linear / ConvNd layers."""

    #: whether :meth:`forward` computes ``min(x) >= 0`` for the non-negative-input shortcut
    _needs_sign = False

    def __init__(self, stabilizer: StabilizerLike = 1e-6, zero_params: str | Sequence[str] | None = None):
        super().__init__()
        self.stabilizer = _check_stabilizer(stabilizer, type(self).__name__, "stabilizer")
        self.zero_params = _zero_params(zero_params)
        #: ``"shortcut"`` or ``"exact"``: which computation the last backward pass used (for tests and profiling)
        self.last_path: str | None = None
        self._cache: dict[str, tuple[tuple, Any]] = {}
        #: the last value of each shortcut condition (see :mod:`neon_attrib.core.deferred`)
        self._predicted: dict[str, bool] = {}

    def _hyperparameters(self) -> dict[str, Any]:
        return {"stabilizer": self.stabilizer, "zero_params": list(self.zero_params) or None}

    def register(self, module: nn.Module) -> RemovableHandleList:
        if not _supports(module):
            raise TypeError(
                f"{type(self).__name__} supports torch.nn.Linear and Conv1d/2d/3d, not {type(module).__name__}; "
                f"use {type(self).__name__}(...).to_zennit() for this module (the Fast composites do so)."
            )
        return super().register(module)

    def forward(self, module, input, output):
        """Store the input, the output and, for the shortcut, the input's minimum (it must be >= 0)."""
        x = input[0].detach()
        self.stored_tensors.update(
            input=x, input_version=x._version, output=output.detach(), output_version=output._version
        )
        if self._needs_sign:
            self.stored_tensors["nonneg"] = (Bound(x.amin(), lower=True),) if x.numel() else ()

    # -- helpers for backward -----------------------------------------------------------------------------------------

    def _input(self) -> torch.Tensor:
        st = self.stored_tensors
        if st["input"]._version != st["input_version"]:
            raise RuntimeError(
                f"The input of a layer with {type(self).__name__} was modified in place after the forward pass; "
                "its relevance cannot be computed. Avoid in-place operations on this tensor."
            )
        return self._cast(st["input"])

    def _cast(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        dtype = self.stored_tensors["_autocast"]
        if tensor is None or dtype is None or tensor.dtype == dtype:
            return tensor
        return tensor.to(dtype)

    def _params(self, module: nn.Module, zero_params: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self._cast(module.weight.detach())
        bias = self._cast(module.bias.detach()) if module.bias is not None else None
        if "weight" in zero_params:
            weight = torch.zeros_like(weight)
        if "bias" in zero_params:
            bias = None
        return weight, bias

    def _stored_output(self) -> tuple[torch.Tensor, str]:
        """The stored output and whether it is ``"intact"``, holds ``"relu"(z)`` (see :class:`FastPass`), or was
        ``"changed"`` in place by something else."""
        st = self.stored_tensors
        out, version = st["output"], st["output_version"]
        if out._version == version:
            return out, "intact"
        if st["_record"].relu == (version, out._version):
            return out, "relu"
        return out, "changed"

    def _output(self, lmap: _LinearMap, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                modified: bool) -> torch.Tensor:
        """The layer output ``W x + b``: the stored one unless it changed in place or the parameters differ."""
        out, status = self._stored_output()
        if modified or status != "intact":
            return lmap.forward(x, weight, bias)
        return out

    def _nonneg(self) -> tuple[Bound, ...]:
        """The condition that the input is non-negative (NaN fails it)."""
        return self.stored_tensors["nonneg"]

    def _decide(self, key: str, condition: Condition) -> bool:
        """Whether to take the computation that is exact only where ``condition`` holds: checked on the host, or,
        inside an explanation of :mod:`neon_attrib.pipeline`, predicted and checked once at its end
        (:func:`neon_attrib.core.deferred.decide`)."""
        return decide(self._predicted, key, condition, self.stored_tensors.get("_checks"))

    def _ratio(self, relevance: torch.Tensor, denominator: torch.Tensor, owned: bool = True) -> torch.Tensor:
        """``relevance / stab(denominator)``; ``owned``: the caller owns ``denominator`` (it may be overwritten)."""
        return _stabilized_ratio(relevance, denominator, self.stabilizer, fused=self.stored_tensors["_fused"],
                                 owned=owned)

    def _cached(self, module: nn.Module, name: str, build: Callable[[], Any], extra: tuple = ()) -> Any:
        """Modified parameters (or what depends on them and on ``extra``), rebuilt only when the module's parameters,
        the autocast dtype or ``extra`` change."""
        key = (self.stored_tensors["_autocast"], *extra) + tuple(
            None if param is None else (param.data_ptr(), param._version, param.dtype, param.device)
            for param in (module.weight, module.bias)
        )
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._cache[name] = (key, value)
        return value

    def remove(self) -> None:
        """Remove the hook's handles, stored tensors and cached modified parameters."""
        self._cache.clear()
        super().remove()


class FastEpsilon(_LinearRule):
    """LRP-epsilon, equal to :class:`zennit.rules.Epsilon`: ``R_in = x * W^T (R / stab(W x + b))``.

    Reuses the layer's stored output, so it costs one transposed convolution (or matrix product).

    Parameters
    ----------
    epsilon : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.
    zero_params : str or list of str, optional
        Parameter names (``"weight"``, ``"bias"``) set to zero for the rule.

    Examples
    --------
    >>> FastEpsilon(epsilon=0.25).copy().epsilon
    0.25
    """

    def __init__(self, epsilon: StabilizerLike = 1e-6, zero_params: str | Sequence[str] | None = None):
        super().__init__(stabilizer=_check_stabilizer(epsilon, "FastEpsilon", "epsilon"), zero_params=zero_params)

    @property
    def epsilon(self) -> StabilizerLike:
        """The epsilon (stabilizer) of the rule."""
        return self.stabilizer

    def _hyperparameters(self) -> dict[str, Any]:
        return {"epsilon": self.stabilizer, "zero_params": list(self.zero_params) or None}

    def backward(self, module, grad_input, grad_output):
        """Return ``x * W^T (R / stab(z))``."""
        lmap = _LinearMap(module)
        x = self._input()
        relevance = grad_output[0]
        weight, bias = self._params(module, self.zero_params)
        z = self._output(lmap, x, weight, bias, modified=bool(self.zero_params))
        ratio = self._ratio(relevance, z, owned=False)
        self.last_path = "exact"
        return (lmap.adjoint(ratio, x, weight).mul_(x),)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return Epsilon(epsilon=self.stabilizer, zero_params=list(self.zero_params) or None)


class FastGamma(_LinearRule):
    """Generalized LRP-gamma, equal to :class:`zennit.rules.Gamma`.

    With ``P = W + gamma W+`` and ``N = W + gamma W-`` (biases alike, none on the ``x-`` terms) and ``z = W x + b``::

        R_in = x+ [P^T g+ + N^T g-] + x- [N^T g+ + P^T g-]
        g+ = [z > 0] R / stab(P x+ + N x- + b_P),   g- = [z < 0] R / stab(N x+ + P x- + b_N)

    **Shortcut** when ``x >= 0`` and ``R = 0`` wherever ``z <= 0``: ``R_in = x * P^T (R / stab(P x + b_P))``, one
    modified convolution and one transposed convolution. Both conditions are checked on every backward pass (one
    reduction each, read back to the host at once, or at the end of an explanation of :mod:`neon_attrib.pipeline`:
    :mod:`neon_attrib.core.deferred`); otherwise the general formula runs. :attr:`last_path` says which ran.

    Parameters
    ----------
    gamma : float, optional
        Multiplier of the added positive (negative) parameters.
    stabilizer : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.
    zero_params : str or list of str, optional
        Parameter names (``"weight"``, ``"bias"``) set to zero for the modified layers.

    Examples
    --------
    >>> FastGamma(gamma=3).copy().gamma
    3.0
    """

    _needs_sign = True

    def __init__(self, gamma: float = 0.25, stabilizer: StabilizerLike = 1e-6,
                 zero_params: str | Sequence[str] | None = None):
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        if isinstance(gamma, bool) or not isinstance(gamma, (float, int)) or not gamma >= 0:
            raise ValueError(f"The 'gamma' parameter of FastGamma must be a float >= 0. Got {gamma!r} instead.")
        self.gamma = float(gamma)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"gamma": self.gamma, **super()._hyperparameters()}

    def backward(self, module, grad_input, grad_output):
        """Return the input relevance (shortcut or general formula, see the class docstring)."""
        lmap = _LinearMap(module)
        x = self._input()
        relevance = grad_output[0]
        true_weight, true_bias = self._params(module)  # zennit's z: NoMod() without zero_params
        z, status = self._stored_output()
        if status == "changed":
            z, status = lmap.forward(x, true_weight, true_bias), "intact"
        weight, bias = self._params(module, self.zero_params)
        pos_w, pos_b = self._cached(module, "positive", lambda: (
            _gamma_mod(weight, self.gamma, True), _gamma_mod(bias, self.gamma, True)))
        # relevance at z <= 0 (nan included) breaks the shortcut. relu(z) > 0 is z > 0, so an output overwritten by
        # an in-place ReLU serves as well
        silent: tuple[Bound, ...] = ()
        if z.numel():
            bounds = masked_bounds(z, relevance) if self.stored_tensors["_fused"] else None
            low, high = bounds or torch.aminmax(_float_mask(torch.le, z, relevance).mul_(relevance))
            silent = (Bound(low, lower=True), Bound(high, lower=False))
        if self._decide("shortcut", self._nonneg() + silent):
            self.last_path = "shortcut"
            ratio = self._ratio(relevance, lmap.forward(x, pos_w, pos_b))
            return (lmap.adjoint(ratio, x, pos_w).mul_(x),)
        self.last_path = "exact"
        if status == "relu":
            z = lmap.forward(x, true_weight, true_bias)
        return (self._exact(lmap, x, z, relevance, (pos_w, pos_b), weight, bias),)

    def _exact(self, lmap, x, z, relevance, positive, weight, bias):
        pos_w, pos_b = positive
        neg_w, neg_b = self._cached(lmap.module, "negative", lambda: (
            _gamma_mod(weight, self.gamma, False), _gamma_mod(bias, self.gamma, False)))
        if self._decide("nonneg", self._nonneg()):
            return self._nonneg_input(lmap, x, z, relevance, positive, (neg_w, neg_b))
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        out_pos = lmap.forward(x_pos, pos_w, pos_b) + lmap.forward(x_neg, neg_w, None)
        out_neg = lmap.forward(x_pos, neg_w, neg_b) + lmap.forward(x_neg, pos_w, None)
        grad_pos = (z > 0) * relevance / _stabilize(out_pos, self.stabilizer)
        grad_neg = (z < 0) * relevance / _stabilize(out_neg, self.stabilizer)
        # zennit's order: x+ P^T g+  +  x- N^T g+  +  x+ N^T g-  +  x- P^T g-
        pos_pos, neg_pos = lmap.adjoint_many(grad_pos, x, [pos_w, neg_w])
        pos_neg, neg_neg = lmap.adjoint_many(grad_neg, x, [neg_w, pos_w])
        return x_pos * pos_pos + x_neg * neg_pos + x_pos * pos_neg + x_neg * neg_neg

    def _nonneg_input(self, lmap, x, z, relevance, positive, negative):
        """The general formula for ``x >= 0`` (relevance where ``z <= 0`` too, e.g. below a residual addition):
        ``R_in = x * (P^T g+ + N^T g-)``, the ``x-`` terms being zero.

        ``N x + b_N`` is ``(2 + gamma) z - (P x + b_P)`` (``P + N = (2 + gamma) W``, biases alike), which is
        well-conditioned where it is used (``z < 0``: there ``|N x + b_N| >= |z|`` and ``|P x + b_P| <= (2 + gamma)
        |N x + b_N|``), so one modified convolution serves both denominators; the two transposed convolutions run as
        one over the stacked weights ``[P; N]`` (``groups == 1`` and a float stabilizer).
        """
        pos_w, pos_b = positive
        neg_w, neg_b = negative
        out_pos = lmap.forward(x, pos_w, pos_b)
        module = lmap.module
        stackable = not lmap.is_conv or (module.groups == 1 and lmap.padding is not None and lmap.batched(x))
        if stackable and not callable(self.stabilizer):
            return self._nonneg_input_stacked(lmap, x, z, relevance, out_pos, positive, negative)
        if self.zero_params:  # z is the unmodified output; the identity needs the modified one
            out_neg = lmap.forward(x, neg_w, neg_b)
        else:
            out_neg = torch.mul(z, 2.0 + self.gamma).sub_(out_pos)
        # zennit's [z > 0] R / stab(P x + b_P) and [z < 0] R / stab(N x + b_N), masks as floats (fast on CPUs)
        grad_pos = torch.gt(z, 0, out=relevance.new_empty(z.shape)).mul_(relevance)
        grad_pos.div_(_stabilize(out_pos, self.stabilizer, inplace=True))
        grad_neg = torch.lt(z, 0, out=relevance.new_empty(z.shape)).mul_(relevance)
        grad_neg.div_(_stabilize(out_neg, self.stabilizer, inplace=True))
        return lmap.adjoint(grad_pos, x, pos_w).add_(lmap.adjoint(grad_neg, x, neg_w)).mul_(x)

    def _nonneg_input_stacked(self, lmap, x, z, relevance, out_pos, positive, negative):
        """:meth:`_nonneg_input` with ``g+`` and ``g-`` side by side along the channels (``[z > 0; z < 0] R /
        stab([P x + b_P; N x + b_N])``): each element-wise step runs once over both halves, and the result is the
        input of one transposed convolution over the stacked weights ``[P; N]``. The same operations on the same
        values as the separate halves: the same numbers."""
        pos_w, _ = positive
        neg_w, neg_b = negative
        dim = 1 if lmap.is_conv else z.ndim - 1
        width = z.shape[dim]
        shape = list(z.shape)
        shape[dim] *= 2
        denominator = out_pos.new_empty(shape)
        den_pos, den_neg = denominator.split(width, dim=dim)
        den_pos.copy_(out_pos)
        if self.zero_params:  # z is the unmodified output; the identity needs the modified one
            den_neg.copy_(lmap.forward(x, neg_w, neg_b))
        else:
            torch.mul(z, 2.0 + self.gamma, out=den_neg).sub_(out_pos)
        grad = relevance.new_empty(shape)
        grad_pos, grad_neg = grad.split(width, dim=dim)
        torch.gt(z, 0, out=grad_pos)  # masks as floats (fast on CPUs)
        torch.lt(z, 0, out=grad_neg)
        grad.unflatten(dim, (2, width)).mul_(relevance.unsqueeze(dim))
        grad.div_(_stabilize(denominator, self.stabilizer, inplace=True))
        stacked = self._cached(lmap.module, "stacked", lambda: torch.cat([pos_w, neg_w], dim=0))
        return lmap.adjoint(grad, x, stacked).mul_(x)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return Gamma(gamma=self.gamma, stabilizer=self.stabilizer, zero_params=list(self.zero_params) or None)


class FastAlphaBeta(_LinearRule):
    """LRP-alpha-beta, equal to :class:`zennit.rules.AlphaBeta`.

    With ``W+ = max(W, 0)``, ``W- = min(W, 0)`` (biases alike, none on the ``x-`` terms)::

        R_in = alpha (x+ W+^T g+ + x- W-^T g+) - beta (x+ W-^T g- + x- W+^T g-)
        g+ = R / stab(W+ x+ + W- x- + b+),   g- = R / stab(W- x+ + W+ x- + b-)

    **Shortcut** when ``x >= 0`` (checked on every backward pass): the ``x-`` terms vanish, and with ``beta = 0``
    one modified convolution and one transposed convolution remain.

    Parameters
    ----------
    alpha, beta : float, optional
        Weights of the positive and negative contributions; ``alpha - beta`` must be 1, both >= 0.
    stabilizer : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.
    zero_params : str or list of str, optional
        Parameter names (``"weight"``, ``"bias"``) set to zero for the modified layers.

    Raises
    ------
    ValueError
        If ``alpha`` or ``beta`` is negative or ``alpha - beta != 1``.

    Examples
    --------
    >>> FastAlphaBeta(alpha=3, beta=2).copy().beta
    2.0
    """

    _needs_sign = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: StabilizerLike = 1e-6,
                 zero_params: str | Sequence[str] | None = None):
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        name = type(self).__name__
        if alpha < 0 or beta < 0:
            raise ValueError(f"The 'alpha' and 'beta' parameters of {name} must be >= 0. Got {alpha}, {beta} instead.")
        if alpha - beta != 1:
            raise ValueError(f"The 'alpha' and 'beta' parameters of {name} must differ by 1. Got {alpha}, {beta}.")
        self.alpha = float(alpha)
        self.beta = float(beta)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, **super()._hyperparameters()}

    def backward(self, module, grad_input, grad_output):
        """Return the input relevance (shortcut or general formula, see the class docstring)."""
        lmap = _LinearMap(module)
        x = self._input()
        relevance = grad_output[0]
        weight, bias = self._params(module, self.zero_params)
        pos_w, pos_b, neg_w, neg_b = self._cached(module, "clamped", lambda: (
            _clamped(weight, True), _clamped(bias, True), _clamped(weight, False), _clamped(bias, False)))
        if self._decide("nonneg", self._nonneg()):
            self.last_path = "shortcut"
            ratio = self._ratio(relevance, lmap.forward(x, pos_w, pos_b))
            result = lmap.adjoint(ratio, x, pos_w).mul_(x)
            if self.alpha != 1.0:
                result = self.alpha * result
            if self.beta:
                ratio = self._ratio(relevance, lmap.forward(x, neg_w, neg_b))
                result = result - self.beta * lmap.adjoint(ratio, x, neg_w).mul_(x)
            return (result,)
        self.last_path = "exact"
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        ratio = relevance / _stabilize(lmap.forward(x_pos, pos_w, pos_b) + lmap.forward(x_neg, neg_w, None),
                                       self.stabilizer)
        pos_pos, neg_pos = lmap.adjoint_many(ratio, x, [pos_w, neg_w])
        result = self.alpha * (x_pos * pos_pos + x_neg * neg_pos)
        if self.beta:
            ratio = relevance / _stabilize(lmap.forward(x_pos, neg_w, neg_b) + lmap.forward(x_neg, pos_w, None),
                                           self.stabilizer)
            neg_neg, pos_neg = lmap.adjoint_many(ratio, x, [neg_w, pos_w])
            result = result - self.beta * (x_pos * neg_neg + x_neg * pos_neg)
        return (result,)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return AlphaBeta(alpha=self.alpha, beta=self.beta, stabilizer=self.stabilizer,
                         zero_params=list(self.zero_params) or None)


class FastZPlus(FastAlphaBeta):
    """LRP-z+, equal to :class:`zennit.rules.ZPlus` (alpha = 1, beta = 0, negative inputs allowed).

    **Shortcut** when ``x >= 0`` (checked on every backward pass): ``R_in = x * W+^T (R / stab(W+ x + b+))``.

    Parameters
    ----------
    stabilizer : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.
    zero_params : str or list of str, optional
        Parameter names (``"weight"``, ``"bias"``) set to zero for the modified layers.

    Examples
    --------
    >>> FastZPlus(stabilizer=1e-3).copy().stabilizer
    0.001
    """

    def __init__(self, stabilizer: StabilizerLike = 1e-6, zero_params: str | Sequence[str] | None = None):
        super().__init__(alpha=1.0, beta=0.0, stabilizer=stabilizer, zero_params=zero_params)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"stabilizer": self.stabilizer, "zero_params": list(self.zero_params) or None}

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return ZPlus(stabilizer=self.stabilizer, zero_params=list(self.zero_params) or None)


class FastZBox(_LinearRule):
    """LRP-z^B for bounded inputs (first layer), equal to :class:`zennit.rules.ZBox`::

        R_in = x W^T g - (l W+^T g + h W-^T g),   g = R / stab(W x + b - (W+ l + b+) - (W- h + b-))

    The bound terms are computed once per call for a batch-independent ``low``/``high`` (scalars, per-channel
    tensors, batch size 1) and the three transposed convolutions run as one (``groups == 1``).

    Parameters
    ----------
    low, high : float or torch.Tensor
        Lowest and highest input values, broadcast to the input like Zennit does.
    stabilizer : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.
    zero_params : str or list of str, optional
        Parameter names (``"weight"``, ``"bias"``) set to zero for the rule.

    Examples
    --------
    >>> FastZBox(low=-1.0, high=2.0).copy().high
    2.0
    """

    def __init__(self, low: float | torch.Tensor, high: float | torch.Tensor, stabilizer: StabilizerLike = 1e-6,
                 zero_params: str | Sequence[str] | None = None):
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        self.low = low
        self.high = high

    def _hyperparameters(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, **super()._hyperparameters()}

    @staticmethod
    def _bound(bound: float | torch.Tensor, x: torch.Tensor, batched: bool) -> torch.Tensor:
        bound = expand(bound, x.shape, cut_batch_dim=True)
        if batched and bound.shape[0] > 1 and bound.stride(0) == 0:  # same for every sample: use batch size 1
            bound = bound[:1]
        return bound.to(x)

    def backward(self, module, grad_input, grad_output):
        """Return the input relevance of the z^B rule."""
        lmap = _LinearMap(module)
        x = self._input()
        relevance = grad_output[0]
        weight, bias = self._params(module, self.zero_params)
        z = self._output(lmap, x, weight, bias, modified=bool(self.zero_params))
        pos_w, pos_b, neg_w, neg_b = self._cached(module, "clamped", lambda: (
            _clamped(weight, True), _clamped(bias, True), _clamped(weight, False), _clamped(bias, False)))
        batched = lmap.batched(x)
        # made once per input shape, dtype and device (and bound values): no host-to-device copy per call, which a
        # CUDA graph could not hold either
        low, high = self._cached(module, "bounds", lambda: (
            self._bound(self.low, x, batched), self._bound(self.high, x, batched)),
            extra=(tuple(x.shape), x.dtype, x.device, batched, _state(self.low), _state(self.high)))

        def bound_terms() -> torch.Tensor:
            return lmap.forward(low, pos_w, pos_b) + lmap.forward(high, neg_w, neg_b)

        if batched and low.shape[0] == 1 and high.shape[0] == 1:  # the same for every batch: computed once
            terms = self._cached(module, "bound_terms", bound_terms, extra=(tuple(x.shape[1:]), x.dtype, x.device,
                                                                            _state(self.low), _state(self.high)))
        else:
            terms = bound_terms()
        ratio = self._ratio(relevance, z - terms)
        # x W^T g - l W+^T g - h W-^T g  =  (x - l) W+^T g + (x - h) W-^T g,  as W = W+ + W-: two transposed
        # convolutions instead of three
        grad_pos, grad_neg = lmap.adjoint_many(ratio, x, [pos_w, neg_w])
        self.last_path = "exact"
        return (grad_pos.mul_(x - low).add_(grad_neg.mul_(x - high)),)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return ZBox(low=self.low, high=self.high, stabilizer=self.stabilizer,
                    zero_params=list(self.zero_params) or None)


def _state(value: float | torch.Tensor) -> Any:
    """What a cached tensor made from ``value`` depends on: the number, or the tensor's memory and version."""
    if isinstance(value, torch.Tensor):
        return (value.data_ptr(), value._version, value.dtype, value.device, tuple(value.shape), value.stride())
    return value


class FastFlat(_LinearRule):
    """LRP-flat, equal to :class:`zennit.rules.Flat`: all weights 1, no bias, inputs 1.

    ``R_in = 1^T (R / stab(1 * 1))``; the denominator does not depend on the sample and is computed with batch size 1.

    Parameters
    ----------
    stabilizer : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.
    zero_params : str or list of str, optional
        Parameter names set to zero (the bias always is).

    Examples
    --------
    >>> FastFlat(stabilizer=1e-3).copy().stabilizer
    0.001
    """

    def backward(self, module, grad_input, grad_output):
        """Return the input relevance of the flat rule."""
        lmap = _LinearMap(module)
        x = self._input()
        weight = self._cast(module.weight.detach())
        weight = torch.zeros_like(weight) if "weight" in self.zero_params else torch.ones_like(weight)
        ones = x.new_ones((1,) + tuple(x.shape[1:])) if lmap.batched(x) else x.new_ones(x.shape)
        denominator = lmap.forward(ones, weight, None)
        ratio = grad_output[0] / _stabilize(denominator, self.stabilizer, inplace=True)
        self.last_path = "exact"
        return (lmap.adjoint(ratio, x, weight),)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return Flat(stabilizer=self.stabilizer, zero_params=list(self.zero_params) or None)
