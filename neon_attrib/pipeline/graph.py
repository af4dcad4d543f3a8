"""Canonization of any CNN from its graph (``torch.fx``): every operation becomes a module with an LRP rule, or an
operation whose gradient is exact LRP, or the model is refused before anything is explained.

LRP conserves relevance layer by layer only where every operation of the forward pass has a rule. Real CNNs hide
operations in ``forward``: ``out + identity``, ``F.relu``, ``x.mean((2, 3))``, gates ``x * sigmoid(s)``, batch norms
kept as attributes. :class:`GraphCanonizer` traces the ``forward`` of every module that is not a layer with a rule
(each module on its own, its submodules as leaves, so module names, taps and hooks keep working), and rewrites:

=====================================================  ================================================================
in the graph                                           becomes
=====================================================  ================================================================
``a + b (+ c ...)`` of traced tensors, ``+=``,         a :class:`zennit.layer.Sum` over the stacked terms (the Norm
``torch.add``                                          rule: term ``i`` gets ``R z_i / sum z``)
``F.relu``, ``torch.relu``, ``relu_``, ``F.relu6``,    the module (``nn.ReLU()``, ...): the composite's activation rule
``F.silu``, ``F.gelu``, ``F.hardswish``, sigmoids
``F.avg_pool*``, ``F.adaptive_avg_pool*``,             the pooling module; a mean is a ``canonical.Mean`` (average
``F.max_pool*``, ``x.mean(dims)``                      pooling: Norm)
convolution -> batch norm (the convolution's only     the batch norm folded into the convolution's weights, the batch
reader, each called once)                              norm replaced by ``nn.Identity`` (never a batch norm with eps 0)
any other batch norm (after a concatenation)           :class:`~neon_attrib.core.canonical.ChannelAffine` (z-rule)
``x * g`` with ``g`` from a sigmoid, or a parameter,   :class:`~neon_attrib.core.canonical.Gate` / ``Scale``: the gate
held
``x * c``, ``x / c``                                   constant, all relevance to ``x``
``nn.LayerNorm``, ``nn.GroupNorm``, ``F.layer_norm``,  ``ConstantNormLayerNorm`` / ``ConstantNormGroupNorm`` (1/sigma
``F.group_norm``                                       constant, z-rule)
dropout, stochastic depth in eval mode                 removed (identity)
``F.interpolate`` (``nn.Upsample``), linear modes     :class:`~neon_attrib.core.canonical.Resample` (weighted means:
                                                       Norm, like average pooling)
views, reshapes, permutes, ``cat``, ``split``,         unchanged: their gradient is exact LRP (each output is one input,
``chunk``, ``getitem``, padding (zeros, reflect,       or copies whose relevance adds up)
replicate, circular), nearest interpolation, shapes
=====================================================  ================================================================

Anything else raises a ``ValueError`` when the canonized forward reaches it (before the operation runs, before any
relevance), naming the operation, the module path and the line of the model's source, and how to give it a rule; a
module that ``torch.fx`` cannot trace raises when it is called. So the layers that an explanation never runs (after
the last tapped one: a classifier's log-softmax, a detection backbone's feature pyramid) need no rule.

The canonizer is a Zennit canonizer: the explain pipeline applies it to its private copy of the model; ``remove()``
restores a model it was applied to directly.
"""

from __future__ import annotations

import copy
import operator
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from zennit.canonizers import Canonizer
from zennit.layer import Sum
from zennit.rules import Norm

from ..core.canonical import (
    ChannelAffine,
    ConstantNormGroupNorm,
    ConstantNormLayerNorm,
    Gate,
    GateRule,
    Mean,
    Resample,
    Scale,
)
from ..core.composites import is_neon_module, register_rule
from ..core.validation import BATCH_NORMS

__all__ = ["GraphCanonizer", "needs_graph_canonizer", "register_documented", "register_trusted_container",
           "is_trusted_container", "register_gradient_leaf", "is_gradient_leaf", "canonical_layer_map", "RULES_NEEDED",
           "TRACE_LOCK"]

#: Attribute set on a canonized root module: ``{module path: module}`` of the layers that must receive an LRP rule
#: from the composite (the explain pipeline checks it before explaining).
RULES_NEEDED = "_neon_graph_rules_needed"

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SIGMOIDS = (nn.Sigmoid, nn.Hardsigmoid)

#: Layers with a rule in every composite (or exact as a gradient): never traced.
_RULED_LEAVES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.ELU,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    Sum, Gate, Scale, ChannelAffine, ConstantNormLayerNorm, ConstantNormGroupNorm,
)
#: Layers whose gradient is exact LRP (each output is one input, or zero): they need no rule.
_GRADIENT_LEAVES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.ZeroPad2d, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle,
)

_TRUSTED: list[type] = []
_GRADIENT_REGISTERED: list[type] = []


#: Held while a graph is traced, and by every explanation's forward and backward pass (``pipeline.grad_mode``):
#: torch.fx patches ``torch.nn.Module.__call__`` process-wide while it traces, so a forward pass in another thread
#: would be recorded into the trace (or receive its proxies). Re-entrant: an explanation traces inside its own hold.
TRACE_LOCK = threading.RLock()


def register_gradient_leaf(types_: type | tuple[type, ...]) -> None:
    """Declare module classes whose gradient is exact LRP (a selection, a copy): the canonizer does not trace them
    and they need no rule (e.g. PaDiM's channel selection)."""
    _GRADIENT_REGISTERED.extend(types_ if isinstance(types_, tuple) else (types_,))


def is_gradient_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose gradient is exact LRP (built in, or :func:`register_gradient_leaf`)."""
    return isinstance(module, (*_GRADIENT_LEAVES, *_GRADIENT_REGISTERED))


def register_trusted_container(types_: type | tuple[type, ...]) -> None:
    """Declare module classes whose own ``forward`` is exact for LRP as it is (it only calls submodules and
    operations whose gradient is exact): the canonizer does not trace them but canonizes their submodules.

    :class:`~neon_attrib.vision.taps.FeatureTaps` and :class:`~neon_attrib.vision.deep.DeepNeon` are declared so.
    """
    _TRUSTED.extend(types_ if isinstance(types_, tuple) else (types_,))


def is_trusted_container(module: nn.Module) -> bool:
    """Whether ``module`` is of a class declared with :func:`register_trusted_container`."""
    return isinstance(module, tuple(_TRUSTED))


#: Module classes of the documented backbones: their ``forward`` has no operation outside a module with a rule (or
#: one whose gradient is exact) once the legacy canonizers (Zennit's ResNet canonizer, the batch-norm merge) ran.
_DOCUMENTED: list[type] = [
    torchvision.models.ResNet, torchvision.models.VGG, torchvision.models.resnet.BasicBlock,
    torchvision.models.resnet.Bottleneck, nn.Sequential, nn.ModuleList, nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, Sum, *BATCH_NORMS,
]


def register_documented(types_: type | tuple[type, ...]) -> None:
    """Declare module classes of documented backbones (see :func:`needs_graph_canonizer`); the backbones of
    :mod:`neon_attrib.vision` declare theirs."""
    _DOCUMENTED.extend(types_ if isinstance(types_, tuple) else (types_,))


def needs_graph_canonizer(model: nn.Module) -> bool:
    """Whether ``model`` holds a module outside the documented backbones (NEON layers, trusted containers and layers
    whose gradient is exact aside), so that only :class:`GraphCanonizer` makes it fit for LRP.

    Examples
    --------
    >>> needs_graph_canonizer(torchvision.models.vgg11()), needs_graph_canonizer(torchvision.models.mobilenet_v2())
    (False, True)
    """
    return not all(type(module) in _DOCUMENTED or is_trusted_container(module)
                   or is_gradient_leaf(module) and not isinstance(module, BATCH_NORMS)
                   for module in model.modules() if not is_neon_module(module))


def canonical_layer_map(norm: Any = None, gate: Any = None) -> list[tuple[type, Any]]:
    """``(type, rule)`` pairs for the modules the canonizer creates, to put in front of a Zennit composite's layer map
    when it is used outside neon_attrib's pipeline (``Gradient(model, EpsilonGammaBox(..., layer_map=...))``).

    Parameters
    ----------
    norm : zennit.core.Hook, optional
        Rule of the affine and normalisation modules (default ``zennit.rules.Norm()``, the z-rule).
    gate : zennit.core.Hook, optional
        Rule of the gates (default :class:`~neon_attrib.core.canonical.GateRule`).
    """
    return [((Gate, Scale), gate if gate is not None else GateRule()),
            ((ChannelAffine, ConstantNormLayerNorm, ConstantNormGroupNorm), norm if norm is not None else Norm())]


# the explain pipeline's composites give these modules their rules whatever the base composite
register_rule((Gate, Scale), lambda beta, eps: GateRule(), mode="any")
register_rule((ChannelAffine, ConstantNormLayerNorm, ConstantNormGroupNorm), lambda beta, eps: Norm(), mode="any")


# ---------------------------------------------------------------------------------------------------------------------
# what the graph may contain
# ---------------------------------------------------------------------------------------------------------------------

def _stochastic_depth() -> tuple[Callable, ...]:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (stochastic_depth,)


_STRUCTURAL_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat, torch.stack, torch.split,
    torch.chunk, torch.squeeze, torch.unsqueeze, torch.narrow, torch.broadcast_tensors, torch.roll, torch.movedim,
    torch.swapaxes, torch.unbind, operator.getitem, torch._assert, getattr, len,
}
_STRUCTURAL_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "expand", "expand_as",
    "chunk", "split", "narrow", "unbind", "movedim", "swapaxes", "view_as", "reshape_as", "roll", "clone",
    "size", "dim", "numel", "__getitem__", "to", "float", "double", "type_as",
}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "stride"}
_NON_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}
_INTERPOLATIONS = {F.interpolate, F.upsample}
_INTERPOLATE_ARGUMENTS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_", "__mul__"}
_DIV_FUNCTIONS = {operator.truediv, torch.div}
_ACTIVATIONS: dict[Any, Callable[..., nn.Module]] = {
    F.relu: lambda inplace=False: nn.ReLU(), torch.relu: nn.ReLU, torch.relu_: nn.ReLU, "relu": nn.ReLU,
    "relu_": nn.ReLU, F.relu6: lambda inplace=False: nn.ReLU6(), F.silu: lambda inplace=False: nn.SiLU(),
    F.gelu: lambda approximate="none": nn.GELU(approximate=approximate),
    F.hardswish: lambda inplace=False: nn.Hardswish(), torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
    "sigmoid": nn.Sigmoid, F.hardsigmoid: lambda inplace=False: nn.Hardsigmoid(), torch.tanh: nn.Tanh,
    "tanh": nn.Tanh,
}
_POOLS: dict[Any, type] = {
    F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d, F.avg_pool3d: nn.AvgPool3d,
    F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d, F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d,
    F.max_pool3d: nn.MaxPool3d, F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d,
    F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
}
_POOL_ARGUMENTS = {
    "AvgPool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "MaxPool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "AdaptiveAvgPool": ("output_size",), "AdaptiveMaxPool": ("output_size", "return_indices"),
}


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    name = getattr(node.target, "__name__", repr(node.target))
    module = getattr(node.target, "__module__", None)
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module and not module.startswith("torch._C") else f"torch.{name}"


# ---------------------------------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------------------------------

class _LocalTracer(fx.Tracer):
    """Traces one module's own ``forward``: every submodule is a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


#: Graphs of modules' own ``forward`` (before any rewrite), keyed by :func:`_trace_key`; at most ``_TRACES_KEPT``.
_TRACES: OrderedDict[tuple, fx.Graph] = OrderedDict()
_TRACES_KEPT = 1024
_UNKEYED = object()


def _trace(module: nn.Module, keys: dict[int, tuple | None]) -> fx.Graph:
    """The graph of ``module``'s own ``forward`` (its submodules as leaves): a copy for the caller to rewrite.

    A module traces like another of the same class with the same parameter and buffer names and the same values of
    its other attributes (the training flag included), whose submodules are alike in the same way (what ``torch.fx``
    can read while tracing; it reads no tensor's values, and every rewrite that does runs again on each copy): such a
    graph is traced once per process. A module with an attribute that cannot be compared by value (an object, a
    tensor that is not a parameter or buffer, an instance ``forward``), in itself or a submodule, or whose tracing adds
    attributes, is traced every time. ``keys`` holds the keys computed so far (by module id) while the model is not
    changed.
    """
    key = _trace_key(module, keys)
    with TRACE_LOCK:
        cached = _TRACES.get(key) if key is not None else None
        if cached is not None:
            _TRACES.move_to_end(key)
            return copy.deepcopy(cached)
        names = _attribute_names(module)
        graph = _LocalTracer().trace(module)
        if key is not None and _attribute_names(module) == names:
            _TRACES[key] = copy.deepcopy(graph)  # kept without the module; every caller rewrites a copy of its own
            while len(_TRACES) > _TRACES_KEPT:
                _TRACES.popitem(last=False)
    return graph


def _attribute_names(module: nn.Module) -> set[str]:
    return set(module.__dict__) | set(module._parameters) | set(module._buffers) | set(module._modules)


def _trace_key(module: nn.Module, keys: dict[int, tuple | None]) -> tuple | None:
    """What tracing ``module``'s own ``forward`` can depend on, compared by value (see :func:`_trace`): its class and
    attributes and its submodules' (a forward may read them); None when an attribute cannot be compared so."""
    if id(module) not in keys:
        keys[id(module)] = _own_trace_key(module, keys)
    return keys[id(module)]


def _own_trace_key(module: nn.Module, keys: dict[int, tuple | None]) -> tuple | None:
    state: list[tuple] = []
    for name, value in module.__dict__.items():
        if name == "_modules":  # whole submodules: a forward may read a child's attributes (self.conv.stride)
            children = []
            for key, child in value.items():
                child_key = () if child is None else _trace_key(child, keys)
                if child_key is None:
                    return None
                children.append((key, child_key))
            state.append((name, tuple(children)))
        elif name in ("_parameters", "_buffers"):
            state.append((name, tuple((key, tensor is None) for key, tensor in value.items())))
        elif name.startswith("_") and isinstance(value, (dict, set)):
            continue  # torch's hook tables: tracing calls forward itself, never the hooks
        else:
            key = _value_key(value)
            if key is _UNKEYED:
                return None
            state.append((name, key))
    return (type(module), type(module).forward, tuple(state))


def _value_key(value: Any) -> Any:
    """``value`` as a hashable key compared by value, or ``_UNKEYED``."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, type,
                                           types.BuiltinFunctionType)):
        return (type(value), value)
    if isinstance(value, types.FunctionType) and value.__closure__ is None:  # a closure's cells can change
        return (types.FunctionType, value)
    if isinstance(value, (tuple, list)):
        items = tuple(_value_key(item) for item in value)
        return _UNKEYED if any(item is _UNKEYED for item in items) else (type(value), items)
    return _UNKEYED


@dataclass
class _Traced:
    path: str
    module: nn.Module
    graph: fx.Graph
    changed: bool = False
    new_modules: dict[str, nn.Module] = field(default_factory=dict)


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _label(path: str) -> str:
    return path or "the model"


class _Canonization(Canonizer):
    """One application of :class:`GraphCanonizer` to a root module; :meth:`remove` undoes it."""

    def __init__(self, root: nn.Module, leaf_types: tuple[type, ...]):
        super().__init__()
        self.root = root
        self.leaf_types = leaf_types
        self.undo: list[Callable[[], None]] = []
        self.traced: dict[int, _Traced] = {}
        self.calls: dict[int, int] = {}
        self.required: dict[str, nn.Module] = {}
        self.keys: dict[int, tuple | None] = {}  # trace keys of the modules, while the tracing pass changes nothing

    # -- zennit's canonizer interface --------------------------------------------------------------------------------
    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        """Applied by :meth:`GraphCanonizer.apply`."""
        return [self]

    def register(self) -> None:
        """Applied in :meth:`GraphCanonizer.apply`."""

    def remove(self) -> None:
        """Restore every module, parameter and forward the canonization changed."""
        while self.undo:
            self.undo.pop()()

    # -- the passes --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        self._visit(self.root, "")
        self.keys.clear()
        for traced in self.traced.values():
            self._rewrite(traced)
        for traced in self.traced.values():
            if traced.changed:
                self._install(traced)
        self.root.__dict__[RULES_NEEDED] = dict(self.required)
        self.undo.append(lambda: self.root.__dict__.pop(RULES_NEEDED, None))

    def _skip(self, module: nn.Module) -> bool:
        return is_neon_module(module)

    def _visit(self, module: nn.Module, path: str) -> None:
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1
        if self.calls[id(module)] > 1 or self._skip(module):
            return
        if isinstance(module, (*_TRUSTED, nn.ModuleList, nn.ModuleDict)) and not _own_forward(module):
            for name, child in module.named_children():
                self._visit(child, _path(path, name))
            return
        if isinstance(module, (*_RULED_LEAVES, *self.leaf_types)):
            self.required[path] = module
            return
        if is_gradient_leaf(module) or isinstance(module, BATCH_NORMS) or _is_norm(module):
            return
        try:
            graph = _trace(module, self.keys)
        except Exception as exc:  # torch.fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = (
                f"GraphCanonizer: {_label(path)} ({type(module).__name__}) cannot be traced with torch.fx ({reason}), "
                f"so its forward cannot be checked for operations without an LRP rule. Make its forward traceable "
                f"(no Python control flow on tensor values), or give {type(module).__name__} a rule of its own: "
                f"neon_attrib.core.composites.register_rule({type(module).__name__}, factory) or "
                f"GraphCanonizer(leaf_types=({type(module).__name__},)) with a rule in the composite's layer_map.")
            self._refuse_when_called(module, message, exc)
            return
        graph.owning_module = module  # for the purity check of dead-code elimination (call_module nodes)
        self.traced[id(module)] = _Traced(path, module, graph)
        for node in graph.nodes:
            if node.op == "call_module":
                self._visit(module.get_submodule(node.target), _path(path, node.target))

    def _refuse_when_called(self, module: nn.Module, message: str, cause: BaseException) -> None:
        """Give a module that cannot be traced a forward that raises ``message``: refused when it runs, so a part of
        the model that an explanation never runs (the layers after the last tapped one) does not stand in the way."""

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise ValueError(message) from cause

        self._set_forward(module, refused)

    # -- rewriting one graph -----------------------------------------------------------------------------------------
    def _rewrite(self, traced: _Traced) -> None:
        graph = traced.graph
        tensors: dict[fx.Node, bool] = {}
        for node in list(graph.nodes):
            if node.op in ("placeholder", "output"):
                tensors[node] = True
                continue
            if node.op == "get_attr":
                tensors[node] = isinstance(_attribute(traced.module, node.target), torch.Tensor)
                continue
            if node.op == "call_module":
                tensors[node] = True
                self._module_node(traced, node)
                continue
            tensors[node] = _produces_tensor(node, tensors)
            self._operation_node(traced, node, tensors)
        graph.eliminate_dead_code()
        graph.lint()

    def _module_node(self, traced: _Traced, node: fx.Node) -> None:
        module = traced.module.get_submodule(node.target)
        path = _path(traced.path, node.target)
        if isinstance(module, BATCH_NORMS):
            self._batch_norm(traced, node, module, path)
        elif _is_norm(module):
            self._replace_module(traced.module, node.target, _constant_norm(module))
            self.required[path] = traced.module.get_submodule(node.target)

    def _batch_norm(self, traced: _Traced, node: fx.Node, norm: nn.Module, path: str) -> None:
        if norm.training or getattr(norm, "running_var", None) is None:
            raise ValueError(f"GraphCanonizer: the batch norm {path} ({type(norm).__name__}) is in training mode or "
                             f"keeps no running statistics; LRP explains a model in eval mode: call model.eval().")
        source = node.args[0] if node.args else None
        conv = None
        if isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1 \
                and self.calls.get(id(norm)) == 1:
            candidate = traced.module.get_submodule(source.target)
            if isinstance(candidate, (*_CONVS, nn.Linear)) and self.calls.get(id(candidate)) == 1:
                conv = candidate
        if conv is not None:
            self._fold(conv, norm)
            self._replace_module(traced.module, node.target, nn.Identity())
        else:
            self._replace_module(traced.module, node.target, ChannelAffine.from_batch_norm(norm))
            self.required[path] = traced.module.get_submodule(node.target)

    def _fold(self, conv: nn.Module, norm: nn.Module) -> None:
        """Fold an eval-mode batch norm into the layer before it (computed in float64, stored in its dtype)."""
        scale, shift = ChannelAffine.batch_norm_affine(norm)
        weight = conv.weight.detach()
        new_weight = (weight.double() * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).to(weight.dtype)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
        new_bias = (bias * scale + shift).to(weight.dtype)
        old = {key: conv._parameters.get(key) for key in ("weight", "bias")}
        conv._parameters["weight"] = nn.Parameter(new_weight, requires_grad=conv.weight.requires_grad)
        conv._parameters["bias"] = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)

        def restore() -> None:
            conv._parameters["weight"] = old["weight"]
            conv._parameters["bias"] = old["bias"]

        self.undo.append(restore)

    def _replace_module(self, owner: nn.Module, target: str, new: nn.Module) -> None:
        parent_path, _, name = target.rpartition(".")
        parent = owner.get_submodule(parent_path) if parent_path else owner
        old = parent._modules[name]
        parent._modules[name] = new
        self.undo.append(lambda: parent._modules.__setitem__(name, old))

    def _add_module(self, traced: _Traced, kind: str, module: nn.Module) -> str:
        owner = traced.module
        index = 0
        while f"canonical_{kind}_{index}" in owner._modules:
            index += 1
        name = f"canonical_{kind}_{index}"
        owner._modules[name] = module
        self.undo.append(lambda: owner._modules.pop(name, None))
        traced.new_modules[name] = module
        if not is_gradient_leaf(module):
            self.required[_path(traced.path, name)] = module
        return name

    def _call_new(self, traced: _Traced, node: fx.Node, kind: str, module: nn.Module, args: tuple) -> fx.Node:
        name = self._add_module(traced, kind, module)
        with traced.graph.inserting_before(node):
            new = traced.graph.call_module(name, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        written = node.args[0] if node.args else None
        if _in_place(node) and isinstance(written, fx.Node):
            # the operation wrote into its first argument: later readers of that tensor see the result
            later = node.next
            while later.op != "root":
                later.replace_input_with(written, new)
                later = later.next
        traced.graph.erase_node(node)
        traced.changed = True
        return new

    def _operation_node(self, traced: _Traced, node: fx.Node, tensors: dict[fx.Node, bool]) -> None:
        target = node.target
        method = node.op == "call_method"
        tensor_args = [arg for arg in node.args if isinstance(arg, fx.Node) and tensors.get(arg)]
        if not tensors[node] and not tensor_args:
            return  # shape arithmetic, attributes
        if (method and target in _ADD_METHODS) or (not method and target in _ADD_FUNCTIONS):
            return self._addition(traced, node, tensors)
        if (method and target in _MUL_METHODS) or (not method and target in _MUL_FUNCTIONS):
            return self._product(traced, node, tensors)
        if not method and target in _DIV_FUNCTIONS and len(node.args) == 2 and isinstance(node.args[1], (int, float)) \
                and not node.kwargs:
            new = self._call_new(traced, node, "scale", Scale(1.0 / node.args[1]), (node.args[0],))
            tensors[new] = True
            return None
        if target in _ACTIVATIONS:  # functions by object, methods (x.relu()) by name
            factory = _ACTIVATIONS[target]
            module = factory() if method else factory(
                *node.args[1:], **{key: value for key, value in node.kwargs.items() if key != "input"})
            new = self._call_new(traced, node, "activation", module, (node.args[0],))
            tensors[new] = True
            return None
        if not method and target in _POOLS:
            new = self._call_new(traced, node, "pool", _pool(target, node), (node.args[0],))
            tensors[new] = True
            return None
        if (method and target == "mean") or (not method and target is torch.mean):
            new = self._call_new(traced, node, "mean", _mean(node), (node.args[0],))
            tensors[new] = True
            return None
        if not method and target in _INTERPOLATIONS:
            return self._interpolation(traced, node, tensors)
        if not method and target in (F.layer_norm, F.group_norm):
            new = self._call_new(traced, node, "norm", _functional_norm(traced.module, node), (node.args[0],))
            tensors[new] = True
            return None
        if not method and (target in (F.dropout, F.dropout2d, F.dropout1d, F.dropout3d, F.alpha_dropout)
                           or target in _stochastic_depth()):
            if not _training_flag(node):
                node.replace_all_uses_with(node.args[0])
                traced.graph.erase_node(node)
                traced.changed = True
                return None
            return self._refuse(traced, node, "runs in training mode (call model.eval())")
        if not method and target is F.pad and _copying_pad(node):
            return None
        if (method and target in _STRUCTURAL_METHODS) or (not method and target in _STRUCTURAL_FUNCTIONS):
            if not method and target is getattr and node.args[1] not in _NON_TENSOR_ATTRIBUTES:
                return self._refuse(traced, node, f"reads the attribute {node.args[1]!r}")
            return None
        return self._refuse(traced, node, "has no LRP rule")

    def _interpolation(self, traced: _Traced, node: fx.Node, tensors: dict[fx.Node, bool]) -> None:
        values = _arguments(node, _INTERPOLATE_ARGUMENTS)
        mode = values.get("mode", "nearest")
        if mode in ("nearest", "nearest-exact"):
            return None  # every output is a copy of one input: the gradient is exact LRP
        if mode not in ("linear", "bilinear", "trilinear") or values.get("antialias"):
            how = "with antialiasing" if mode in ("linear", "bilinear", "trilinear") else f"with mode={mode!r}"
            return self._refuse(traced, node, f"interpolates {how}, which has no LRP rule here (nearest and linear "
                                              f"modes without antialiasing have one)")
        if _computed(values):
            return self._refuse(traced, node, "interpolates linearly with a computed size or scale factor (a linear "
                                              "interpolation becomes a module with constant arguments)")
        values.pop("antialias", None)
        new = self._call_new(traced, node, "resample", Resample(**values), (node.args[0],))
        tensors[new] = True
        return None

    def _addition(self, traced: _Traced, node: fx.Node, tensors: dict[fx.Node, bool]) -> None:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
            return self._refuse(traced, node, "is a weighted addition")
        if not all(isinstance(arg, fx.Node) and tensors.get(arg) for arg in node.args):
            return self._refuse(traced, node, "adds a constant to a tensor (a bias outside any layer)")
        terms: list[Any] = []
        for arg in node.args:  # a + b + c: one Sum over the three terms when the partial sum has no other reader
            inner = arg.op == "call_module" and isinstance(traced.module.get_submodule(arg.target), Sum) \
                and len(arg.users) == 1 and arg.target in traced.new_modules
            if inner:
                terms.extend(arg.args[0].args[0].args)  # Sum(stack(broadcast_tensors(*terms)))
                traced.module._modules.pop(arg.target)
                traced.new_modules.pop(arg.target)
                self.required.pop(_path(traced.path, arg.target), None)
            else:
                terms.append(arg)
        with traced.graph.inserting_before(node):
            broadcast = traced.graph.call_function(torch.broadcast_tensors, tuple(terms))
            stacked = traced.graph.call_function(torch.stack, (broadcast,), {"dim": 1})
        tensors[broadcast] = tensors[stacked] = True
        new = self._call_new(traced, node, "sum", Sum(dim=1), (stacked,))
        tensors[new] = True
        return None

    def _product(self, traced: _Traced, node: fx.Node, tensors: dict[fx.Node, bool]) -> None:
        if len(node.args) != 2 or node.kwargs:
            return self._refuse(traced, node, "is a product with extra arguments")
        first, second = node.args
        first_tensor = isinstance(first, fx.Node) and tensors.get(first)
        second_tensor = isinstance(second, fx.Node) and tensors.get(second)
        if first_tensor and second_tensor:
            gates = [self._is_gate(traced, arg) for arg in (first, second)]
            if gates == [True, False]:
                first, second = second, first
            elif gates != [False, True]:
                return self._refuse(traced, node, "multiplies two signals (neither is a sigmoid gate or a parameter)")
            with traced.graph.inserting_before(node):  # the gate's branch gets no relevance and no gradient
                second = traced.graph.call_method("detach", (second,))
            new = self._call_new(traced, node, "gate", Gate(), (first, second))
        elif first_tensor or second_tensor:
            signal, factor = (first, second) if first_tensor else (second, first)
            if not isinstance(factor, (int, float)):
                return self._refuse(traced, node, "multiplies a tensor by a computed number")
            new = self._call_new(traced, node, "scale", Scale(float(factor)), (signal,))
        else:
            return None
        tensors[new] = True
        return None

    def _is_gate(self, traced: _Traced, node: fx.Node) -> bool:
        if node.op == "get_attr":
            return True
        if node.op == "call_module":
            return isinstance(traced.module.get_submodule(node.target), _SIGMOIDS)
        return False

    def _refuse(self, traced: _Traced, node: fx.Node, why: str) -> None:
        """Put a refusal in front of ``node``: the canonized forward raises it when it gets there (before the
        operation runs), so operations that an explanation never reaches (after the last tapped layer) do not stand
        in the way."""
        where = _label(traced.path)
        line = _source_line(node)
        message = (
            f"GraphCanonizer: {_op_name(node)} in the forward of {where} ({type(traced.module).__name__}), graph node "
            f"{node.name!r}{line}, {why}: LRP would pass it as a plain gradient and the heatmap would be wrong. "
            f"Wrap the operation in an nn.Module and give that module a rule "
            f"(neon_attrib.core.composites.register_rule(MyModule, lambda beta, eps: my_rule), or "
            f"GraphCanonizer(leaf_types=(MyModule,)) with (MyModule, my_rule) in the composite's layer_map).")
        with traced.graph.inserting_before(node):
            traced.graph.call_function(_refused, (message,))
        traced.changed = True

    # -- installing the canonized forward ----------------------------------------------------------------------------
    def _install(self, traced: _Traced) -> None:
        module = traced.module
        code = traced.graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<canonized forward of {type(module).__name__}>", "exec"), namespace)  # noqa: S102
        self._set_forward(module, types.MethodType(namespace["forward"], module))

    def _set_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """Install ``forward`` as the module's instance attribute; :meth:`remove` restores the previous one."""
        previous = module.__dict__.get("forward")
        module.__dict__["forward"] = forward

        def restore() -> None:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous

        self.undo.append(restore)


def _own_forward(module: nn.Module) -> bool:
    """A ModuleList / ModuleDict subclass with a forward of its own (DenseNet's dense block) is traced."""
    if isinstance(module, tuple(_TRUSTED)):
        return False
    return type(module).forward is not nn.Module.forward


def _in_place(node: fx.Node) -> bool:
    """Whether the operation writes into its first argument (``relu_``, ``add_``, ``F.relu(x, inplace=True)``)."""
    target = node.target
    if node.op == "call_method":
        return target.endswith("_") and not target.startswith("__")
    if target in (operator.iadd, operator.imul, torch.relu_):
        return True
    if node.kwargs.get("inplace"):
        return True
    return target in (F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid) and len(node.args) > 1 and bool(node.args[1])


def _attribute(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _produces_tensor(node: fx.Node, tensors: dict[fx.Node, bool]) -> bool:
    if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] not in _NON_TENSOR_ATTRIBUTES
    if node.op == "call_function" and node.target in (len, torch._assert):
        return False
    return any(tensors.get(arg, False) for arg in node.all_input_nodes)


def _is_norm(module: nn.Module) -> bool:
    """nn.LayerNorm / nn.GroupNorm with their own forward (subclasses that change it are traced instead)."""
    return (isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward) or \
        (isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward)


def _constant_norm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.LayerNorm):
        return ConstantNormLayerNorm(module.normalized_shape, module.weight, module.bias, module.eps)
    return ConstantNormGroupNorm(module.num_groups, module.weight, module.bias, module.eps)


def _arguments(node: fx.Node, names: Iterable[str]) -> dict[str, Any]:
    """Positional arguments after the input and keyword arguments, by name."""
    values = dict(zip(names, node.args[1:]))
    values.update({key: value for key, value in node.kwargs.items() if key != "input"})
    return values


def _pool(target: Callable, node: fx.Node) -> nn.Module:
    cls = _POOLS[target]
    family = cls.__name__.rstrip("123d").removesuffix("Pool") + "Pool"
    kwargs = _arguments(node, _POOL_ARGUMENTS[family])
    if any(isinstance(value, fx.Node) for value in kwargs.values()):
        raise ValueError(f"GraphCanonizer: {_op_name(node)} (graph node {node.name!r}) takes computed arguments "
                         f"({kwargs}); only constant pooling arguments can become a module.")
    return cls(**kwargs)


def _mean(node: fx.Node) -> nn.Module:
    values = _arguments(node, ("dim", "keepdim"))
    if "dim" not in values or any(isinstance(value, fx.Node) for value in values.values()) or "dtype" in values:
        raise ValueError(f"GraphCanonizer: {_op_name(node)} (graph node {node.name!r}) must average over constant "
                         f"dimensions (x.mean(dims)); a mean over everything has no layer here.")
    return Mean(values["dim"], values.get("keepdim", False))


def _functional_norm(owner: nn.Module, node: fx.Node) -> nn.Module:
    if node.target is F.layer_norm:
        values = _arguments(node, ("normalized_shape", "weight", "bias", "eps"))
    else:
        values = _arguments(node, ("num_groups", "weight", "bias", "eps"))
    for key in ("weight", "bias"):
        value = values.get(key)
        if isinstance(value, fx.Node):
            if value.op != "get_attr":
                raise ValueError(f"GraphCanonizer: {_op_name(node)} (graph node {node.name!r}) takes a computed "
                                 f"{key}; only parameters of the module can become a layer.")
            values[key] = _attribute(owner, value.target)
    eps = values.get("eps", 1e-5)
    if node.target is F.layer_norm:
        return ConstantNormLayerNorm(values["normalized_shape"], values.get("weight"), values.get("bias"), eps)
    return ConstantNormGroupNorm(values["num_groups"], values.get("weight"), values.get("bias"), eps)


def _training_flag(node: fx.Node) -> bool:
    if "training" in node.kwargs:
        return bool(node.kwargs["training"])
    if node.target in _stochastic_depth():
        return bool(node.args[3]) if len(node.args) > 3 else True
    return bool(node.args[2]) if len(node.args) > 2 else True


@fx.node.has_side_effect  # never removed as dead code
def _refused(message: str) -> None:
    """Raise the refusal of an operation without an LRP rule (called by a canonized forward, see ``_refuse``)."""
    raise ValueError(message)


def _computed(values: Any) -> bool:
    """Whether an argument (or an element of a tuple or list argument) is computed in the graph."""
    if isinstance(values, dict):
        return any(_computed(value) for value in values.values())
    if isinstance(values, (tuple, list)):
        return any(_computed(value) for value in values)
    return isinstance(values, fx.Node)


def _copying_pad(node: fx.Node) -> bool:
    """Zero padding, or padding by copies of the input (reflect, replicate, circular): the gradient is exact LRP."""
    values = _arguments(node, ("pad", "mode", "value"))
    mode = values.get("mode", "constant")
    return mode in ("reflect", "replicate", "circular") or mode == "constant" and not values.get("value")


def _source_line(node: fx.Node) -> str:
    """`` (File "...", line n: code)`` of the model's source that made ``node``, or ''."""
    lines = [line.strip() for line in (node.stack_trace or "").strip().splitlines() if line.strip()]
    frames = [(line, lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else "")
              for i, line in enumerate(lines) if line.startswith("File ")]
    internal = ("/torch/fx/", "/torch/nn/modules/module.py", "/torch/overrides.py",
                "/torch/nn/functional.py")
    frames = [frame for frame in frames if not any(part in frame[0] for part in internal)]
    if not frames:
        return ""
    where, code = frames[-1]
    return f" ({where}: {code})" if code else f" ({where})"


# ---------------------------------------------------------------------------------------------------------------------
# the canonizer
# ---------------------------------------------------------------------------------------------------------------------

class GraphCanonizer(Canonizer):
    """Canonize any CNN from its ``torch.fx`` graph for LRP (see the module docstring for the rewrites).

    Every module that is not a layer with a rule is traced on its own, its submodules as leaves; the rewritten graph
    becomes that module's ``forward`` (an instance attribute, as Zennit's canonizers do), so module names, hooks and
    :class:`~neon_attrib.vision.taps.FeatureTaps` keep working. Apply it to a copy (the explain pipeline does) or
    ``remove()`` it afterwards (Zennit's composites do).

    Parameters
    ----------
    leaf_types : tuple of type, optional
        Your own module classes that have a rule in the composite's ``layer_map``: they are not traced.

    Raises
    ------
    ValueError
        On :meth:`apply`: a batch norm in training mode. When the canonized model runs: an operation without an LRP
        rule (named, with its module path and source line, before it runs), a module that cannot be traced.

    Examples
    --------
    >>> import torchvision
    >>> model = torchvision.models.mobilenet_v2(weights=None).eval()
    >>> instances = GraphCanonizer().apply(model)
    >>> type(model.features[1].conv[0][1]).__name__  # the batch norm, folded into the convolution before it
    'Identity'
    >>> for instance in instances:
    ...     instance.remove()
    >>> type(model.features[1].conv[0][1]).__name__
    'BatchNorm2d'
    """

    def __init__(self, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_types = tuple(leaf_types)

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        """Canonize ``root_module`` in place; returns the instance whose ``remove()`` undoes it (none if
        ``root_module`` is canonized already)."""
        if RULES_NEEDED in root_module.__dict__:
            return []
        canonization = _Canonization(root_module, self.leaf_types)
        try:
            canonization.run()
        except Exception:
            canonization.remove()
            raise
        return [canonization]

    def register(self) -> None:
        """Nothing to do: :meth:`apply` canonizes."""

    def remove(self) -> None:
        """Nothing to do: the instances :meth:`apply` returns undo it."""

    def copy(self) -> GraphCanonizer:
        return type(self)(leaf_types=self.leaf_types)
