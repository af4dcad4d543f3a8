"""Core of the fast rules: numerical helpers, the linear map of a layer, the autograd plumbing, and the base hooks
(:class:`FastHook`, :class:`FastPass`, :class:`FastNorm`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from zennit.core import Hook, RemovableHandle, RemovableHandleList
from zennit.layer import Sum
from zennit.rules import Norm, Pass

from ...core.deferred import DeferredChecks
from ...core.fused import fusing, stabilized_ratio

__all__ = ["FastHook", "FastPass", "FastNorm"]

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
    nan included) and takes three light passes instead of five: ``t + copysign(eps, t)``, after ``t + 0.0`` turned
    ``-0.0`` into ``+0.0`` (``t - eps`` for ``t < 0`` is ``-(|t| + eps)`` exactly: rounding is symmetric).
    ``inplace``: the caller owns ``tensor``, which may be overwritten.
    """
    if callable(stabilizer):
        return stabilizer(tensor)
    tensor = tensor.add_(0.0) if inplace else tensor + 0.0
    return tensor.add_(torch.copysign(_constant(stabilizer, tensor.dtype, tensor.device), tensor))


def _stabilized_ratio(relevance: torch.Tensor, denominator: torch.Tensor, stabilizer: StabilizerLike, *,
                      fused: bool, owned: bool) -> torch.Tensor:
    """``relevance / stab(denominator)``: one fused kernel where ``fused`` allows it
    (:mod:`neon_attrib.core.fused`), else the eager operations; ``owned``: the caller owns ``denominator``, which may
    be overwritten."""
    if fused and not callable(stabilizer):
        result = stabilized_ratio(relevance, denominator,
                                  _constant(stabilizer, denominator.dtype, denominator.device))
        if result is not None:
            return result
    denominator = _stabilize(denominator, stabilizer, inplace=owned)
    if owned and denominator.shape == relevance.shape and denominator.dtype == relevance.dtype:
        return torch.div(relevance, denominator, out=denominator)
    return relevance / denominator


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor holding ``value``, made once per dtype and device (no fill kernel per layer and call)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.full((), value, dtype=dtype, device=device)


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

    #: each call's tensors travel with its own autograd node: right for a module called several times per forward
    state_per_call = True

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
        state["_checks"] = DeferredChecks.active()
        state["_fused"] = fusing()
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
    in place, without autograd recording it, and without Zennit's per-call clone of the input; it then returns its
    input tensor itself, whose graph takes the relevance down unchanged (no autograd node of its own). When an in-place
    ``torch.nn.ReLU`` overwrites the output of a fast linear-layer rule, the rule is told, so that it can still check
    its shortcut on ``relu(z)`` (a changed output is otherwise recomputed).

    Examples
    --------
    >>> FastPass().copy()
    FastPass()
    """

    #: the relevance passes unchanged: the conservation audit has nothing to sum here
    passes_relevance_through = True

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
        if x._version != version and _aliases(output, x):  # the module wrote its output into its input
            record = getattr(x, "_fast_lrp_record", None)
            if record is not None and type(module) is nn.ReLU:
                record.relu = (version, x._version)
            # the input carries its graph and now the module's output: the relevance reaches it unchanged, with no
            # autograd node of its own
            return x
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


def _aliases(output: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``output`` is ``x``'s memory seen alike (an in-place module's result)."""
    return (output.data_ptr() == x.data_ptr() and output.shape == x.shape and output.stride() == x.stride()
            and output.dtype == x.dtype)


def _stacked_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)``; two stacked tensors are added as views (a reduction over a strided size-2 axis is slow)."""
    if x.shape[dim] != 2:
        return x.sum(dim)
    first, second = x.unbind(dim)
    return first + second


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
        """Store the input and the output (and the module's own graph, whose backward is ``J^T``)."""
        graph = (output, input[0]) if output.grad_fn is not None and type(module) is not Sum else None
        self.stored_tensors.update(input=input[0].detach(), output=output.detach(), output_version=output._version,
                                   graph=graph)

    def backward(self, module, grad_input, grad_output):
        """Return ``x * J^T (R / stab(out))``."""
        st = self.stored_tensors
        x = st["input"]
        intact = st["output"]._version == st["output_version"]
        if type(module) is Sum:  # J^T broadcasts: no re-run of the module, no autograd
            dim = module.dim
            out = st["output"] if intact else _stacked_sum(x, dim)
            ratio = _stabilized_ratio(grad_output[0], out, self.stabilizer, fused=st["_fused"], owned=not intact)
            return (x * ratio.unsqueeze(dim),)
        out = st["output"] if intact else module.forward(x)
        grad = _stabilized_ratio(grad_output[0], out, self.stabilizer, fused=st["_fused"], owned=not intact)
        if intact and st["graph"] is not None:  # J^T from the graph of the forward pass: no re-run of the module
            graph_output, graph_input = st["graph"]
            try:
                (vjp,) = torch.autograd.grad(graph_output, graph_input, grad)
                return (x * vjp,)
            except RuntimeError:  # a tensor the module saved was changed in place: run it again
                pass
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (vjp,) = torch.autograd.grad(module.forward(leaf), leaf, grad)
        return (x * vjp,)

    def to_zennit(self) -> Hook:
        """The equivalent Zennit rule."""
        return Norm(stabilizer=self.stabilizer)
