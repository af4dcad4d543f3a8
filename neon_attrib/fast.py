"""Fast exact LRP rules for ReLU CNNs, drop-in replacements for Zennit's rules and composites.

Zennit computes a rule such as the generalized Gamma rule by re-running the layer up to five times with modified
parameters and differentiating through it, after autograd has already computed (and thrown away) the layer's plain
gradient. The hooks here compute the *same numbers* directly: one forward convolution (the model's own), one
modified-weight convolution and one transposed convolution (``convolution_backward`` for the input only) per layer, with
no re-forward of the unmodified layer and no wasted plain backward. This is about 3/2 of a plain gradient's work.

The shortcuts rest on two conditions that hold in ReLU networks and are **checked at run time** on every call:

1. the layer input is non-negative (it comes from a ReLU or a max-pool after one): the negative-input terms of Gamma,
   ZPlus and AlphaBeta vanish;
2. (Gamma only) the relevance of the layer output is zero wherever the output ``z <= 0``: the ``z < 0`` branch of the
   generalized Gamma rule vanishes and the ``z = 0`` entries that Zennit drops are zero anyway.

When a condition fails, the rule computes the general formula, equal to Zennit's rule (same modified parameters, same
stabilizer, same sum order). Rules for layers a shortcut does not cover (transposed convolutions) are mapped to Zennit's
own rule by the composites.

Public objects
--------------
Rules (:class:`zennit.core.Hook` subclasses): :class:`FastEpsilon`, :class:`FastGamma`, :class:`FastZPlus`,
:class:`FastAlphaBeta`, :class:`FastZBox`, :class:`FastFlat`, :class:`FastPass`, :class:`FastNorm`.
Composites: :class:`FastEpsilonGammaBox`, :class:`FastEpsilonPlusFlat`. Reusable explainer: :class:`LRPExplainer`.

Examples
--------
>>> import torch, torchvision
>>> features = torchvision.models.vgg16(weights=None).features.eval()
>>> composite = FastEpsilonGammaBox(low=-3.0, high=3.0)
>>> with LRPExplainer(features, composite) as explainer:
...     output, relevance = explainer(torch.randn(2, 3, 64, 64), lambda out: out)
>>> relevance.shape
torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from zennit.composites import SpecialFirstLayerMapComposite
from zennit.core import Composite, Hook, RemovableHandle, RemovableHandleList, expand
from zennit.layer import Sum
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ZBox, ZPlus
from zennit.types import Activation, AvgPool, BatchNorm, Convolution

__all__ = [
    "FastHook",
    "FastPass",
    "FastNorm",
    "FastEpsilon",
    "FastGamma",
    "FastZPlus",
    "FastAlphaBeta",
    "FastZBox",
    "FastFlat",
    "FastEpsilonGammaBox",
    "FastEpsilonPlusFlat",
    "LRPExplainer",
]

StabilizerLike = float | int | Callable[[torch.Tensor], torch.Tensor]
LayerMap = list[tuple[Any, Hook]]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------------------------------------------------
# numerical helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_stabilizer(value: StabilizerLike, owner: str, name: str) -> StabilizerLike:
    if isinstance(value, bool) or not (isinstance(value, (float, int)) or callable(value)):
        raise TypeError(f"The '{name}' parameter of {owner} must be a float or a callable. Got {value!r} instead.")
    return float(value) if isinstance(value, (float, int)) else value


def _stabilize(tensor: torch.Tensor, stabilizer: StabilizerLike, inplace: bool = False) -> torch.Tensor:
    """Zennit's stabilizer: ``t + eps * sign(t)`` with ``sign(0) = +1``, or a user callable.

    With a float, the result is bit-identical to :func:`zennit.core.stabilize` (for every dtype, signed zeros, inf and
    nan included) and takes three light passes instead of five: ``(|t| + eps) * sign(t)``, after ``t + 0.0`` turned
    ``-0.0`` into ``+0.0``. ``inplace``: the caller owns ``tensor``, which may be overwritten.
    """
    if callable(stabilizer):
        return stabilizer(tensor)
    tensor = tensor.add_(0.0) if inplace else tensor + 0.0
    return tensor.abs().add_(stabilizer).copysign_(tensor)


def _zero_params(zero_params: str | Sequence[str] | None) -> tuple[str, ...]:
    if zero_params is None:
        return ()
    if isinstance(zero_params, str):
        return (zero_params,)
    return tuple(zero_params)


def _clamped(param: torch.Tensor | None, positive: bool) -> torch.Tensor | None:
    if param is None:
        return None
    return param.clamp(min=0.0) if positive else param.clamp(max=0.0)


def _gamma_mod(param: torch.Tensor | None, gamma: float, positive: bool) -> torch.Tensor | None:
    # the expression of zennit.rules.GammaMod, so the modified parameters are bit-identical
    if param is None:
        return None
    return param + gamma * (param.clamp(min=0.0) if positive else param.clamp(max=0.0))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4, or a device type without autocast
        return None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the linear map of a Linear / ConvNd layer and its adjoint
# ---------------------------------------------------------------------------------------------------------------------


def _supports(module: nn.Module) -> bool:
    """Whether the fast linear-layer rules can handle ``module`` (Linear and Conv1d/2d/3d, any padding)."""
    return isinstance(module, nn.Linear) or (isinstance(module, _CONV_TYPES) and not module.transposed)


class _LinearMap:
    """``x -> W x + b`` of a Linear or ConvNd module with replaceable parameters, and its adjoint ``g -> W^T g``."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.is_conv = isinstance(module, _CONV_TYPES)
        self.padding: tuple[int, ...] | None = None
        if self.is_conv and module.padding_mode == "zeros":
            self.padding = self._int_padding(module)

    def batched(self, x: torch.Tensor) -> bool:
        """Whether ``x`` has a batch dimension (convolutions also take unbatched inputs)."""
        return x.ndim == len(self.module.kernel_size) + 2 if self.is_conv else x.ndim >= 2

    @staticmethod
    def _int_padding(module: nn.Module) -> tuple[int, ...] | None:
        padding = module.padding
        if not isinstance(padding, str):
            return tuple(padding)
        if padding == "valid":
            return (0,) * len(module.kernel_size)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(total % 2 for total in totals):  # asymmetric 'same' padding: leave it to autograd
            return None
        return tuple(total // 2 for total in totals)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_conv:
            return self.module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def adjoint(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product of ``forward(., weight, .)`` at an input shaped like ``x`` (a new tensor)."""
        if not self.is_conv:
            return grad.matmul(weight)
        module = self.module
        if not self.batched(x):
            return self.adjoint(grad.unsqueeze(0), x.unsqueeze(0), weight).squeeze(0)
        if self.padding is None:  # reflect/replicate/circular padding or asymmetric 'same': autograd on the forward
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                (result,) = torch.autograd.grad(module._conv_forward(leaf, weight, None), leaf, grad)
            return result
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, module.stride, self.padding, module.dilation, False,
            [0] * len(module.kernel_size), module.groups, (True, False, False),
        )[0]

    def adjoint_many(self, grad: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Adjoints of several weights for one ``grad``; one stacked transposed convolution when ``groups == 1``."""
        if len(weights) == 1 or (self.is_conv and (self.module.groups != 1 or self.padding is None
                                                   or not self.batched(x))):
            return [self.adjoint(grad, x, weight) for weight in weights]
        stacked = torch.cat(list(weights), dim=1)
        if self.is_conv:
            shape = (x.shape[0], stacked.shape[1]) + tuple(x.shape[2:])
            x = x.new_empty(1).expand(shape)
        return list(self.adjoint(grad, x, stacked).split(weights[0].shape[1], dim=-1 if not self.is_conv else 1))


# ---------------------------------------------------------------------------------------------------------------------
# autograd plumbing
# ---------------------------------------------------------------------------------------------------------------------


class _RelevanceFunction(torch.autograd.Function):
    """Identity on the module output whose backward asks the hook for the relevance of the module input.

    The module's own autograd graph is dropped, so autograd never computes the plain gradient of a hooked layer.
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, hook: FastHook, module: nn.Module, state: dict) -> torch.Tensor:
        ctx.hook = hook
        ctx.module = module
        ctx.state = state
        ctx.input_dtype = input.dtype
        # not an input of apply(): autograd attaches the new history to this alias directly (no view is created)
        return state.pop("_output")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        state, ctx.state = ctx.state, None
        if state is None:
            raise RuntimeError(
                "Fast LRP hooks free their stored tensors after one backward pass; run the forward pass again "
                "instead of backward(retain_graph=True)."
            )
        hook = ctx.hook
        hook.stored_tensors = state
        try:
            relevance = hook.backward(ctx.module, (None,), (grad_output,))[0]
        finally:
            hook.stored_tensors = {}
        if relevance is not None and relevance.dtype != ctx.input_dtype:
            relevance = relevance.to(ctx.input_dtype)
        return relevance, None, None, None


class _OutputRecord:
    """Shared by a linear-layer rule and the :class:`FastPass` of an in-place ReLU right above it.

    ``relu = (version_before, version_after)`` says that the ReLU overwrote the rule's stored output with ``relu(z)``
    and nothing else touched it; ``relu(z) > 0`` is ``z > 0``, so the Gamma shortcut's check needs no copy of ``z``.
    """

    __slots__ = ("relu",)

    def __init__(self) -> None:
        self.relu: tuple[int, int] | None = None


class FastHook(Hook):
    """Base class of the fast rules: a Zennit :class:`~zennit.core.Hook` that skips the layer's plain gradient.

    Registration adds one forward hook. When the module's first input requires a gradient, the hook calls
    :meth:`forward` (which stores what :meth:`backward` needs in ``self.stored_tensors``) and replaces the output by an
    alias whose backward calls :meth:`backward` with the output relevance in ``grad_output``. The stored tensors move
    to the autograd graph, so one hook serves several forward passes before a backward pass, and the hook holds no
    tensors between calls. Only the first input receives relevance, as in Zennit.

    The ``active`` flag is read during the forward pass; higher-order gradients (``create_graph=True``) are not
    supported.
    """

    def register(self, module: nn.Module) -> RemovableHandleList:
        """Register this hook to ``module``; return the handles that remove it."""
        return RemovableHandleList([RemovableHandle(self), module.register_forward_hook(self._forward_hook)])

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        if not (self.active and torch.is_grad_enabled() and args and isinstance(output, torch.Tensor)):
            return None
        x = args[0]
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            return None
        self.stored_tensors = {}
        self.forward(module, args, output)
        state, self.stored_tensors = self.stored_tensors, {}
        state["_output"] = output.detach()
        state["_autocast"] = _autocast_dtype(x.device)
        state["_record"] = record = _OutputRecord()
        result = _RelevanceFunction.apply(x, self, module, state)
        result._fast_lrp_record = record  # read by the FastPass of an in-place ReLU that consumes this output
        return result

    def copy(self) -> FastHook:
        """Return a new hook with the same hyperparameters (Zennit calls this once per module)."""
        return type(self)(**self._hyperparameters())

    def _hyperparameters(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._hyperparameters().items())
        return f"{type(self).__name__}({args})"


class FastPass(FastHook):
    """Pass the output relevance to the input unchanged, like :class:`zennit.rules.Pass` (activations, batch norm).

    The module runs on a detached alias of its input, so an in-place activation (``ReLU(inplace=True)``) still runs
    in place, without autograd recording it, and without Zennit's per-call clone of the input. When an in-place
    ``torch.nn.ReLU`` overwrites the output of a fast linear-layer rule, the rule is told, so that it can still check
    its shortcut on ``relu(z)`` (a changed output is otherwise recomputed).

    Examples
    --------
    >>> FastPass().copy()
    FastPass()
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: tuple[torch.Tensor, int] | None = None

    def register(self, module: nn.Module) -> RemovableHandleList:
        """Register this hook to ``module``; return the handles that remove it."""
        handles = super().register(module)
        handles.append(module.register_forward_pre_hook(self._pre_hook))
        return handles

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        self._pending = None
        if not (self.active and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)
                and args[0].requires_grad):
            return None
        self._pending = (args[0], args[0]._version)
        return (args[0].detach(),) + tuple(args[1:])

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        pending, self._pending = self._pending, None
        if pending is None or not isinstance(output, torch.Tensor):
            return None
        x, version = pending
        if x._version != version:  # the module wrote into its input
            record = getattr(x, "_fast_lrp_record", None)
            if record is not None and type(module) is nn.ReLU and output.data_ptr() == x.data_ptr():
                record.relu = (version, x._version)
        state = {"_output": output.detach(), "_autocast": None}
        return _RelevanceFunction.apply(x, self, module, state)

    def remove(self) -> None:
        """Remove the hook's handles and references."""
        self._pending = None
        super().remove()

    def backward(self, module, grad_input, grad_output):
        """Return the output relevance as the input relevance."""
        return (grad_output[0],)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return Pass()


class FastNorm(FastHook):
    """Zennit's :class:`~zennit.rules.Norm` (average pooling, :class:`zennit.layer.Sum`) without the input clone.

    ``R_in = x * J^T (R_out / stab(out))``, where ``J`` is the module's Jacobian.

    Parameters
    ----------
    stabilizer : float or callable, optional
        Added to the denominator with its sign (``+1`` for 0), or a function of the denominator.

    Examples
    --------
    >>> FastNorm(stabilizer=1e-3).copy().stabilizer
    0.001
    """

    def __init__(self, stabilizer: StabilizerLike = 1e-6):
        super().__init__()
        self.stabilizer = _check_stabilizer(stabilizer, type(self).__name__, "stabilizer")

    def _hyperparameters(self) -> dict[str, Any]:
        return {"stabilizer": self.stabilizer}

    def forward(self, module, input, output):
        """Store the input and the output."""
        self.stored_tensors.update(input=input[0].detach(), output=output.detach(), output_version=output._version)

    def backward(self, module, grad_input, grad_output):
        """Return ``x * J^T (R / stab(out))``."""
        st = self.stored_tensors
        x = st["input"]
        out = st["output"] if st["output"]._version == st["output_version"] else module.forward(x)
        grad = grad_output[0] / _stabilize(out, self.stabilizer)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (vjp,) = torch.autograd.grad(module.forward(leaf), leaf, grad)
        return (x * vjp,)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return Norm(stabilizer=self.stabilizer)


# ---------------------------------------------------------------------------------------------------------------------
# rules for Linear and ConvNd layers
# ---------------------------------------------------------------------------------------------------------------------


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
        """Store the input, the output and, for the shortcut, whether the input is non-negative."""
        x = input[0].detach()
        self.stored_tensors.update(
            input=x, input_version=x._version, output=output.detach(), output_version=output._version
        )
        if self._needs_sign:
            self.stored_tensors["nonneg"] = x.min() >= 0 if x.numel() else torch.ones((), dtype=torch.bool)

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

    def _nonneg(self) -> torch.Tensor:
        return self.stored_tensors["nonneg"]

    def _ratio(self, relevance: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        """``relevance / stab(denominator)`` for a ``denominator`` the caller owns (it may be overwritten)."""
        denominator = _stabilize(denominator, self.stabilizer, inplace=True)
        if denominator.shape == relevance.shape and denominator.dtype == relevance.dtype:
            return torch.div(relevance, denominator, out=denominator)
        return relevance / denominator

    def _cached(self, module: nn.Module, name: str, build: Callable[[], Any]) -> Any:
        """Modified parameters, rebuilt only when the module's parameters (or the autocast dtype) change."""
        key = (self.stored_tensors["_autocast"],) + tuple(
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
        ratio = relevance / _stabilize(z, self.stabilizer)
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
    reduction each, one host synchronisation); otherwise the general formula runs. :attr:`last_path` says which ran.

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
        # relevance at z <= 0 (nan included) breaks the shortcut; bool masks and a uint8 max are the cheapest check.
        # relu(z) > 0 is z > 0, so an output overwritten by an in-place ReLU serves as well
        misplaced = (relevance != 0).gt_(z > 0).view(torch.uint8).amax()
        if bool(self._nonneg() & (misplaced == 0)):
            self.last_path = "shortcut"
            ratio = self._ratio(relevance, lmap.forward(x, pos_w, pos_b))
            return (lmap.adjoint(ratio, x, pos_w).mul_(x),)
        self.last_path = "exact"
        if status == "relu":
            z = lmap.forward(x, true_weight, true_bias)
        return (self._exact(lmap, x, z, relevance, (pos_w, pos_b), weight, bias),)

    def _exact(self, lmap, x, z, relevance, positive, weight, bias):
        pos_w, pos_b = positive
        neg_w, neg_b = _gamma_mod(weight, self.gamma, False), _gamma_mod(bias, self.gamma, False)
        has_negative = not bool(self._nonneg())
        x_pos = x.clamp(min=0)
        out_pos = lmap.forward(x_pos, pos_w, pos_b)
        out_neg = lmap.forward(x_pos, neg_w, neg_b)
        if has_negative:
            x_neg = x.clamp(max=0)
            out_pos = out_pos + lmap.forward(x_neg, neg_w, None)
            out_neg = out_neg + lmap.forward(x_neg, pos_w, None)
        grad_pos = (z > 0) * relevance / _stabilize(out_pos, self.stabilizer)
        grad_neg = (z < 0) * relevance / _stabilize(out_neg, self.stabilizer)
        # zennit's order: x+ P^T g+  +  x- N^T g+  +  x+ N^T g-  +  x- P^T g-
        pos_pos, neg_pos = lmap.adjoint_many(grad_pos, x, [pos_w, neg_w])
        pos_neg, neg_neg = lmap.adjoint_many(grad_neg, x, [neg_w, pos_w])
        if not has_negative:
            return x_pos * pos_pos + x_pos * pos_neg
        return x_pos * pos_pos + x_neg * neg_pos + x_pos * pos_neg + x_neg * neg_neg

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
        if bool(self._nonneg()):
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
        low, high = self._bound(self.low, x, batched), self._bound(self.high, x, batched)
        denominator = z - (lmap.forward(low, pos_w, pos_b) + lmap.forward(high, neg_w, neg_b))
        ratio = self._ratio(relevance, denominator)
        grad, grad_pos, grad_neg = lmap.adjoint_many(ratio, x, [weight, pos_w, neg_w])
        self.last_path = "exact"
        return (x * grad - (low * grad_pos + high * grad_neg),)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return ZBox(low=self.low, high=self.high, stabilizer=self.stabilizer,
                    zero_params=list(self.zero_params) or None)


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


# ---------------------------------------------------------------------------------------------------------------------
# composites
# ---------------------------------------------------------------------------------------------------------------------


def _layer_map_base(stabilizer: StabilizerLike) -> LayerMap:
    """The fast counterpart of :func:`zennit.composites.layer_map_base`."""
    return [
        (Activation, FastPass()),
        (Sum, FastNorm(stabilizer=stabilizer)),
        (AvgPool, FastNorm(stabilizer=stabilizer)),
        (BatchNorm, FastPass()),
    ]


class _FastMapMixin:
    """Map a fast rule to Zennit's equivalent rule for modules it does not support (e.g. transposed convolutions)."""

    def mapping(self, ctx: dict, name: str, module: nn.Module) -> Hook | None:
        hook = super().mapping(ctx, name, module)
        if isinstance(hook, _LinearRule) and not _supports(module):
            return hook.to_zennit()
        return hook


class FastEpsilonGammaBox(_FastMapMixin, SpecialFirstLayerMapComposite):
    """Zennit's :class:`~zennit.composites.EpsilonGammaBox` with the fast rules.

    ZBox for the first convolution, Gamma for the other convolutions, Epsilon for ``torch.nn.Linear``, Pass for
    activations and batch norm, Norm for average pooling and :class:`zennit.layer.Sum`; max pooling keeps its
    gradient. Same mapping, same numbers as Zennit's composite.

    Parameters
    ----------
    low, high : float or torch.Tensor
        Lowest and highest input values for the ZBox rule.
    epsilon : float or callable, optional
        Stabilizer of the Epsilon rule.
    gamma : float, optional
        Gamma of the Gamma rule.
    stabilizer : float or callable, optional
        Stabilizer of the other rules.
    layer_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's layer map (rules for your own layer types).
    first_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's first-layer map.
    zero_params : str or list of str, optional
        Parameter names set to zero by the rules.
    canonizers : list of zennit.canonizers.Canonizer, optional
        Applied before the hooks are registered.

    Examples
    --------
    >>> composite = FastEpsilonGammaBox(low=-3.0, high=3.0, layer_map=[(torch.nn.Tanh, FastPass())])
    """

    def __init__(self, low: float | torch.Tensor, high: float | torch.Tensor, epsilon: StabilizerLike = 1e-6,
                 gamma: float = 0.25, stabilizer: StabilizerLike = 1e-6, layer_map: LayerMap | None = None,
                 first_map: LayerMap | None = None, zero_params: str | Sequence[str] | None = None,
                 canonizers: list | None = None):
        layer_map = list(layer_map or []) + _layer_map_base(stabilizer) + [
            (Convolution, FastGamma(gamma=gamma, stabilizer=stabilizer, zero_params=zero_params)),
            (nn.Linear, FastEpsilon(epsilon=epsilon, zero_params=zero_params)),
        ]
        first_map = list(first_map or []) + [
            (Convolution, FastZBox(low=low, high=high, stabilizer=stabilizer, zero_params=zero_params)),
        ]
        super().__init__(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


class FastEpsilonPlusFlat(_FastMapMixin, SpecialFirstLayerMapComposite):
    """Zennit's :class:`~zennit.composites.EpsilonPlusFlat` with the fast rules.

    Flat for the first linear or convolutional layer, ZPlus for the other convolutions, Epsilon for
    ``torch.nn.Linear``, Pass for activations and batch norm, Norm for average pooling and :class:`zennit.layer.Sum`.

    Parameters
    ----------
    epsilon : float or callable, optional
        Stabilizer of the Epsilon rule.
    stabilizer : float or callable, optional
        Stabilizer of the other rules.
    layer_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's layer map (rules for your own layer types).
    first_map : list of (type or tuple of types, Hook), optional
        Put in front of the composite's first-layer map.
    zero_params : str or list of str, optional
        Parameter names set to zero by the rules.
    canonizers : list of zennit.canonizers.Canonizer, optional
        Applied before the hooks are registered.

    Examples
    --------
    >>> composite = FastEpsilonPlusFlat(epsilon=1e-4)
    """

    def __init__(self, epsilon: StabilizerLike = 1e-6, stabilizer: StabilizerLike = 1e-6,
                 layer_map: LayerMap | None = None, first_map: LayerMap | None = None,
                 zero_params: str | Sequence[str] | None = None, canonizers: list | None = None):
        layer_map = list(layer_map or []) + _layer_map_base(stabilizer) + [
            (Convolution, FastZPlus(stabilizer=stabilizer, zero_params=zero_params)),
            (nn.Linear, FastEpsilon(epsilon=epsilon, zero_params=zero_params)),
        ]
        first_map = list(first_map or []) + [
            ((Convolution, nn.Linear), FastFlat(stabilizer=stabilizer, zero_params=zero_params)),
        ]
        super().__init__(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


# ---------------------------------------------------------------------------------------------------------------------
# explainer
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cudnn_benchmark(value: bool) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` for the duration of a call only (the other cuDNN flags stay as they are,
    which ``torch.backends.cudnn.flags`` would reset)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = value
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class LRPExplainer:
    """Register a composite once and explain many batches.

    Parameters
    ----------
    model : torch.nn.Module
        The model to explain; the composite's hooks (and canonizers) stay on it until :meth:`close`.
    composite : zennit.core.Composite
        E.g. :class:`FastEpsilonGammaBox`; any Zennit composite works.
    channels_last : bool, optional
        Feed 4-D inputs in ``torch.channels_last`` memory format (often faster for convolutions on GPUs and CPUs with
        oneDNN). The model is not changed; the relevance is returned in the input's format.
    autocast_dtype : torch.dtype, optional
        Run the forward pass and the rules' convolutions under ``torch.autocast`` with this dtype
        (``torch.bfloat16`` or ``torch.float16``). **Approximate**: the relevance is then computed in reduced precision
        and no longer equals Zennit's float32 result (expect relative deviations of 1e-2 and more, larger near small
        denominators). Default: full precision.
    cudnn_benchmark : bool, optional
        On CUDA, let cuDNN benchmark convolution algorithms (``torch.backends.cudnn.benchmark`` is set during each call
        and restored afterwards). Default True; ignored on CPU.

    Examples
    --------
    >>> import torch, torchvision
    >>> features = torchvision.models.vgg16(weights=None).features.eval()
    >>> explainer = LRPExplainer(features, FastEpsilonGammaBox(low=-3.0, high=3.0))
    >>> for batch in [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32)]:
    ...     output, relevance = explainer(batch, lambda out: out)
    >>> explainer.close()
    """

    def __init__(self, model: nn.Module, composite: Composite, *, channels_last: bool = False,
                 autocast_dtype: torch.dtype | None = None, cudnn_benchmark: bool = True):
        if not isinstance(composite, Composite):
            raise TypeError(
                f"The 'composite' parameter of LRPExplainer must be a zennit.core.Composite. Got {composite!r} instead."
            )
        if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                "The 'autocast_dtype' parameter of LRPExplainer must be torch.bfloat16, torch.float16 or None. "
                f"Got {autocast_dtype!r} instead."
            )
        self.model = model
        self.composite = composite
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        self.cudnn_benchmark = cudnn_benchmark
        self._closed = False
        composite.register(model)

    def __enter__(self) -> LRPExplainer:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Remove the hooks and revert the canonizers; the explainer cannot be used afterwards."""
        if not self._closed:
            self.composite.remove()
            self._closed = True

    @contextlib.contextmanager
    def _context(self, device: torch.device) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            if device.type == "cuda":
                stack.enter_context(_cudnn_benchmark(self.cudnn_benchmark))
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type=device.type, dtype=self.autocast_dtype))
            yield

    def __call__(self, input: torch.Tensor,
                 attr_output: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explain a batch.

        Parameters
        ----------
        input : torch.Tensor
            The model input.
        attr_output : torch.Tensor or callable, optional
            The relevance put on the output: a tensor (broadcast to the output) or a function of the output. Default:
            the output itself.

        Returns
        -------
        output : torch.Tensor
            The model output (detached).
        relevance : torch.Tensor
            The relevance of ``input``, same shape.

        Raises
        ------
        RuntimeError
            If the explainer was closed.
        """
        if self._closed:
            raise RuntimeError("This LRPExplainer is closed; create a new one.")
        memory_format = torch.channels_last if self.channels_last and input.ndim == 4 else torch.preserve_format
        leaf = input.detach().contiguous(memory_format=memory_format) if self.channels_last else input.detach()
        leaf.requires_grad_(True)
        with self._context(input.device):
            output = self.model(leaf)
            if attr_output is None:
                seed = output.detach()
            elif callable(attr_output):
                seed = attr_output(output.detach())
            else:
                seed = attr_output
        seed = torch.broadcast_to(seed.to(device=output.device, dtype=output.dtype), output.shape)
        (relevance,) = torch.autograd.grad(output, leaf, seed)
        if self.channels_last:
            relevance = relevance.contiguous(memory_format=torch.contiguous_format)
        return output.detach(), relevance
