"""The one explain pipeline: choose the composite, resolve the target, own the hooks, audit conservation.

Every entry point (:func:`neon_attrib.explain`, :class:`~neon_attrib.integrations.captum.NeonLRP`, ``DeepNeon.explain``
/
``relevance`` / ``explainer``, the detectors' ``relevance`` and ``layer_relevance``, the DEC heads, the evaluation
curves, the command line) runs through here, and every explanation takes the same step (one forward, one backward,
the audit): :func:`run` on a copy hooked for the call, :class:`Explainer` on the copy it keeps registered.

1. **Composite** (:func:`resolve_composite`): a composite that a user passes is the *base* for the layers that are not
   NEON layers; NEON layers (heads, pools, DEC heads) always get their own rules. A :class:`NeonComposite` is used as
   it is.
2. **Isolation**: hooks are registered on a *structural copy* of the model (new module objects sharing the same
   parameter and buffer tensors, :func:`isolated`), never on the user's model. Nothing is left behind, a failed call
   changes nothing, and concurrent calls from several threads on one model cannot see each other's hooks.
3. **Coverage**: before anything runs, every NEON module must have received its rule, and residual blocks that LRP
   would pass as a plain gradient must have been canonized; otherwise a ``ValueError`` names the module.
4. **One forward, one backward**: the target is resolved from the output of the hooked forward pass. The relevance
   reaching intermediate modules comes from the same backward pass (``run(..., at=...)``), and the backward pass can
   end at a module (``stop_at``) instead of the inputs.
5. **Conservation audit** (:class:`Audit`): the relevance reaching the input is compared with the score minus what
   the rules report to have dissipated. A mismatch means relevance was created or destroyed where no rule ran
   (e.g. a residual addition that is not a module): it warns (:class:`ConservationWarning`), or raises with
   ``strict=True``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from zennit.core import Composite, Hook

from ..core.composites import NeonComposite, covers_children, is_neon_module, needs_own_rule
from ..core.deferred import DeferredChecks
from ..core.fused import fused_kernels
from ..core.validation import BATCH_NORMS, as_targets
from .audit import (
    Audit,
    ConservationError,
    ConservationWarning,
    _AuditRecorder,
    _passes_through,
    _reached_sums,
    _report,
    _sample_sums,
    default_tolerance,
)
from .graph import RULES_NEEDED, TRACE_LOCK, GraphCanonizer, needs_graph_canonizer
from .graphs import StepGraphs, input_key
from .precision import PRECISIONS, check_precision, guard_batch_norms, precision_mode, unguard_batch_norms

__all__ = [
    "attribution_output",
    "resolve_targets",
    "resolve_composite",
    "isolated",
    "check_coverage",
    "hooked",
    "Audit",
    "ConservationWarning",
    "ConservationError",
    "Explanation",
    "run",
    "Explainer",
    "PRECISIONS",
    "precision_mode",
    "guard_batch_norms",
    "unguard_batch_norms",
]


# ---------------------------------------------------------------------------------------------------------------------
# targets
def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, m); also for n = 0."""
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))



def attribution_output(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The relevance put on the model output: the output itself for scalar heads, ``output · one-hot(target)`` else.

    Starting LRP from the score (not from 1) makes the input relevance sum to the score where the rules conserve.
    """
    if output.ndim == 1 or target is None:
        return output
    flat = _flat(output)
    mask = torch.zeros_like(flat)
    mask[torch.arange(flat.shape[0], device=flat.device), target] = 1.0
    return (flat * mask).reshape(output.shape)


def resolve_targets(model: nn.Module, output: torch.Tensor, target: Any) -> torch.Tensor | None:
    """The explained output index per sample: None for scalar outputs (n,); else ``target`` checked, or the model's
    ``default_target(output)`` (the assigned cluster for k-means), or the argmax."""
    if output.ndim <= 1:
        return None
    flat = _flat(output)
    if target is None:
        default = getattr(model, "default_target", None)
        return default(output) if default is not None else flat.argmax(-1)
    return as_targets(target, n=flat.shape[0], n_outputs=flat.shape[1], owner=type(model).__name__,
                      device=output.device)


# ---------------------------------------------------------------------------------------------------------------------
# composites
def resolve_composite(model: nn.Module, composite: Composite | None = None, *, beta: float | None = None,
                      eps: float | None = None) -> Composite:
    """The composite an explanation of ``model`` uses.

    * a :class:`~neon_attrib.core.composites.NeonComposite` (or a subclass, e.g. ``DECHeadComposite``) is used as given;
    * any other Zennit composite becomes the **base** for the non-NEON layers: ``model.neon_composite(beta, eps,
      base=composite)`` when the model defines it (deep heads, DEC heads), else ``NeonComposite(beta, eps,
      base=composite)``;
    * ``None``: the model's default, ``model.neon_composite(beta, eps)`` or ``NeonComposite(beta, eps)``.

    Raises
    ------
    TypeError
        If ``composite`` is not a Zennit composite.
    ValueError
        If ``beta``/``eps`` are given together with a ready NeonComposite.
    """
    if composite is not None and not isinstance(composite, Composite):
        raise TypeError(f"The 'composite' parameter must be a zennit Composite (e.g. EpsilonGammaBox(low, high)). "
                        f"Got {type(composite).__name__}.")
    if isinstance(composite, NeonComposite):
        if beta is not None or eps is not None:
            raise ValueError("Pass beta/eps either to the explanation or to your NeonComposite, not both.")
        return composite
    factory = getattr(model, "neon_composite", None)
    if factory is not None:
        return factory(beta=beta, eps=eps, base=composite)
    # a CNN outside the documented backbones: the graph canonizer runs before the composite's own canonizers
    first = [GraphCanonizer()] if composite is not None and needs_graph_canonizer(model) and not any(
        isinstance(canonizer, GraphCanonizer) for canonizer in composite.canonizers) else []
    return NeonComposite(beta=beta, eps=eps, base=composite, pre_canonizers=first)


def _fresh(composite: Composite) -> Composite:
    """A copy of ``composite`` with its own handle lists, so one composite object can serve concurrent calls."""
    import copy

    clone = copy.copy(composite)
    clone.handles = type(composite.handles)()
    clone.hook_refs = type(composite.hook_refs)()
    return clone


# ---------------------------------------------------------------------------------------------------------------------
# isolation
def isolated(model: nn.Module) -> nn.Module:
    """A structural copy of ``model``: new module objects (with their own hook and submodule tables) and new parameter
    and buffer objects that share their storage with ``model``'s.

    Registering hooks or applying canonizers on the copy leaves ``model`` untouched, costs no memory for weights, and
    the copy computes exactly what ``model`` computes; in-place updates of ``model``'s weights are seen by the copy.
    Replacing a parameter of ``model`` by a new object is not (make a new copy then). This matters most with Zennit 1.0:
    its batch-norm merge replaces the module's weights by plain tensors and its rules reload parameters with
    ``load_state_dict``, which together leave the merged weights in the ``state_dict`` of a model they are applied to
    directly; on the copy they never reach ``model``. (Zennit 0.5 assigns ``.data``, which the copy isolates too.)
    """
    return _clone_module(model, {})


def _clone_module(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    clone = module.__class__.__new__(module.__class__)
    state = {}
    for key, value in module.__dict__.items():
        if key.startswith("_") and isinstance(value, (dict, set)):
            value = value.copy()  # torch's tables: parameters, buffers, hooks (the tensors themselves are shared)
        state[key] = value
    # new tensor objects over the same storage: canonizers that assign ``.data`` or replace parameters (Zennit's
    # batch-norm merge) and rules that reload parameters change the copy only; in-place updates of the model's weights
    # stay visible (shared storage and version counter)
    state["_parameters"] = {name: None if p is None else _alias_parameter(p)
                            for name, p in module._parameters.items()}
    state["_buffers"] = {name: None if b is None else _alias(b) for name, b in module._buffers.items()}
    clone.__dict__.update(state)
    memo[id(module)] = clone
    clone.__dict__["_modules"] = {name: None if child is None else _clone_module(child, memo)
                                  for name, child in module._modules.items()}
    return clone


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor object over the same storage; a copy for inference tensors (autograd cannot save those)."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.detach()


def _alias_parameter(parameter: torch.Tensor) -> torch.Tensor:
    if isinstance(parameter, nn.Parameter):
        return nn.Parameter(_alias(parameter), requires_grad=parameter.requires_grad)
    return _alias(parameter)


# ---------------------------------------------------------------------------------------------------------------------
# coverage
def _hooks_of(module: nn.Module) -> list[Hook]:
    hooks = []
    for table in (module._forward_hooks, module._forward_pre_hooks):
        for fn in table.values():
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, Hook) and owner not in hooks:
                hooks.append(owner)
    return hooks


def check_coverage(model: nn.Module) -> dict[str, Hook]:
    """Check a model with registered rules: every NEON module has its rule, and no residual block or batch norm is
    left as a plain gradient. Returns ``{module name: rule}`` for every hooked module.

    Raises
    ------
    ValueError
        Naming the first NEON module without a rule, residual block without canonization, or batch norm without a rule
        (its gradient would scale the relevance by the batch norm's factor).
    """
    hooked: dict[str, Hook] = {}
    covered: list[str] = []
    residual = _residual_types()
    needed = {id(module) for module in getattr(model, RULES_NEEDED, {}).values()}
    unmerged: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        hooks = _hooks_of(module)
        label = name or "the model"
        if hooks:
            hooked[name] = hooks[0]
            if covers_children(module) or is_neon_module(module) and not needs_own_rule(module):
                covered.append(f"{name}." if name else "")
            if isinstance(module, BATCH_NORMS) and _passes_through(hooks[0]) and not _merged(module):
                unmerged.append(f"{label} ({type(module).__name__})")
            continue
        if id(module) in needed or type(module).__name__ == "Sum" and type(module).__module__.startswith("zennit"):
            raise ValueError(f"{label} ({type(module).__name__}) is a layer of the canonized graph that received no "
                             f"rule from the composite, so LRP would pass it as a plain gradient. Add "
                             f"({type(module).__name__}, rule) to the composite's layer_map, or explain through "
                             f"NeonComposite(base=your_composite), which has rules for the canonical layers.")
        if needs_own_rule(module):
            raise ValueError(f"{label} ({type(module).__name__}) received no NEON rule from the composite, so LRP "
                             f"would pass it as a plain gradient and the relevance would be wrong. Use "
                             f"NeonComposite(base=your_composite), or pass your composite to explain(..., "
                             f"composite=...), which keeps the NEON rules.")
        if residual and isinstance(module, residual) and not any(
                type(child).__name__ == "Sum" for child in module.children()):
            raise ValueError(f"{label} ({type(module).__name__}) adds its shortcut outside any module, which LRP "
                             f"would pass as a plain gradient (relevance duplicated on both branches). Canonize it: "
                             f"add zennit.torchvision.ResNetCanonizer() to the composite's canonizers.")
        if isinstance(module, BATCH_NORMS):
            raise ValueError(f"{label} ({type(module).__name__}) received no rule from the composite, so LRP would "
                             f"pass it as a plain gradient, scaling the relevance by the batch norm's factor. Merge it "
                             f"into the layer before it (neon_attrib.vision.fast.MergeBatchNorms() in the canonizers) "
                             f"and map "
                             f"it to Pass (add ({type(module).__name__}, zennit.rules.Pass()) to the composite's "
                             f"layer_map).")
    if unmerged:
        raise ValueError(f"{unmerged[0]} passes the relevance through but was not merged into a convolution, so the "
                         f"heatmap would ignore its scaling. Canonize the model: "
                         f"neon_attrib.vision.default_canonizers(model) in the composite's canonizers.")
    return hooked


def _merged(norm: nn.Module) -> bool:
    """Whether a batch norm computes (close to) the identity, as Zennit's merge leaves it."""
    pairs = ((norm.weight, 1.0), (norm.bias, 0.0), (getattr(norm, "running_mean", None), 0.0),
             (getattr(norm, "running_var", None), 1.0))
    return all(value is None or bool((value.detach() == target).all()) for value, target in pairs)


def _residual_types() -> tuple[type, ...]:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency of zennit
        return ()
    return (BasicBlock, Bottleneck)


def check_explainable(model: nn.Module) -> None:
    """Refuse a model whose output depends on its training flag while that flag is set, or that runs compiled.

    A batch norm in training mode (or keeping no running statistics) normalises each batch with that batch's own
    statistics, and an active dropout, stochastic depth or RReLU is random: the explanation would explain neither the
    model's predictions nor the same function twice. Canonizers merge the running statistics into the convolution, so
    with a batch norm in training mode the heatmap would not even match the output it comes with, yet conserve
    relevance and pass the audit.

    A module compiled with ``torch.compile`` runs its compiled graph, which the rules' hooks do not reach reliably:
    explain the original module (``compiled._orig_mod``); ``fused=True`` and ``cuda_graphs=True`` of the explainers are
    the exact ways to speed explanations up.

    Raises
    ------
    ValueError
        Naming the first such module: call ``model.eval()`` before explaining, or pass the module uncompiled.

    Examples
    --------
    >>> check_explainable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    >>> check_explainable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: 1 (BatchNorm2d) normalises with the statistics of each batch (training mode), so ...
    """
    stochastic = _stochastic_types()
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    for name, module in model.named_modules():
        label = name or "the model"
        if compiled is not None and isinstance(module, compiled.OptimizedModule):
            raise ValueError(f"{label} was compiled with torch.compile: its compiled graph bypasses the LRP rules' "
                             f"hooks, so the relevance would not be LRP. Explain the original module "
                             f"({name or 'model'}._orig_mod, or the module you passed to torch.compile); "
                             f"the explainers' fused=True and cuda_graphs=True are the exact speed-ups.")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or module.running_mean is None or module.running_var is None:
                why = "training mode" if module.training else "it keeps no running statistics"
                raise ValueError(f"{label} ({type(module).__name__}) normalises with the statistics of each batch "
                                 f"({why}), so an explanation would depend on the batch and not explain the model's "
                                 f"predictions. Call model.eval() before explaining (a batch norm without running "
                                 f"statistics cannot be explained).")
        elif module.training and (isinstance(module, stochastic) and getattr(module, "p", 0) > 0
                                  or isinstance(module, nn.RReLU) and module.lower != module.upper):
            raise ValueError(f"{label} ({type(module).__name__}) is in training mode and is random (it drops "
                             f"activations or draws its slopes), so an explanation would not explain the model's "
                             f"predictions. Call model.eval() before explaining.")


def _stochastic_types() -> tuple[type, ...]:
    """Modules that drop at random in training mode: dropout, and torchvision's stochastic depth."""
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency of zennit
        return (nn.modules.dropout._DropoutNd,)
    return (nn.modules.dropout._DropoutNd, StochasticDepth)


def _prepared(work: nn.Module) -> dict[str, Hook]:
    """The last step of registering a composite on a copy: guard batch norms, check coverage, watch shared modules."""
    guard_batch_norms(work)
    hooked = check_coverage(work)
    refuse_shared_modules(work, hooked)
    return hooked


def _keeps_every_call(hook: Hook) -> bool:
    """Rules right for a module called several times in one forward pass: those whose backward reads no stored
    tensor (pass-throughs) and those that keep each call's tensors apart (class attribute ``state_per_call = True``,
    the fast rules)."""
    return _passes_through(hook) or getattr(type(hook), "state_per_call", False)


def refuse_shared_modules(work: nn.Module, hooked: dict[str, Hook]) -> None:
    """Make a second call of a hooked module in one forward pass of ``work`` raise, where its rule keeps one input.

    Zennit's rules (and the NEON rules) store the module's input in the forward pass and read it in the backward
    pass, so a module called twice (weights shared between two places of a network) would explain both calls with
    the last call's input: a heatmap unrelated to the model that still conserves relevance and passes the audit.
    Forward pre-hooks on ``work`` (a private copy) count the calls; a composite of fast rules needs none.
    """
    watched = [(name, hook) for name, hook in hooked.items() if not _keeps_every_call(hook)]
    if not watched:
        return
    modules = dict(work.named_modules())
    forward_pass = [0]

    def count_forward_passes(module: nn.Module, args: Any) -> None:
        forward_pass[0] += 1

    work.register_forward_pre_hook(count_forward_passes)
    for name, hook in watched:
        modules[name].register_forward_pre_hook(_watch_calls(name, hook, forward_pass))


def _watch_calls(name: str, hook: Hook, forward_pass: list[int]) -> Callable[[nn.Module, Any], None]:
    last = [-1]

    def watch(module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled() and last[0] == forward_pass[0]:
            raise ValueError(f"{name or 'the model'} ({type(module).__name__}) is called more than once in one "
                             f"forward pass (shared weights), and its rule {type(hook).__name__} keeps one input per "
                             f"module: every call would be explained with the last call's input. Give each call its "
                             f"own module (copy.deepcopy), or explain with the fast composites (FastEpsilonGammaBox, "
                             f"FastEpsilonPlusFlat; DeepNeon's default), whose rules keep every call's input.")
        last[0] = forward_pass[0]

    return watch


# ---------------------------------------------------------------------------------------------------------------------
# running an explanation
@dataclass
class Explanation:
    """What :func:`run` returns.

    Attributes
    ----------
    relevance : tuple of torch.Tensor
        Relevance of every input, shaped like it.
    output : torch.Tensor
        The model output.
    target : torch.Tensor or None
        The explained output index per sample (None for scalar scores).
    score : torch.Tensor
        (n,) the explained score.
    audit : Audit or None
        The conservation audit.
    at : dict of str to torch.Tensor
        The relevance reaching the output of each module named in :func:`run`'s ``at`` and ``stop_at``, shaped like
        that output.
    """

    relevance: tuple[torch.Tensor, ...]
    output: torch.Tensor
    target: torch.Tensor | None
    score: torch.Tensor
    audit: Audit | None
    at: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def hooked(model: nn.Module, composite: Composite | None = None, *, beta: float | None = None,
           eps: float | None = None) -> Iterator[tuple[nn.Module, dict[str, Hook]]]:
    """Context manager: an isolated copy of ``model`` with the resolved composite registered and its coverage checked.

    Yields ``(copy, {module name: rule})``; the hooks are removed on exit (and never touch ``model``).
    """
    composite = _fresh(resolve_composite(model, composite, beta=beta, eps=eps))
    check_explainable(model)  # before the canonizers, which would merge a batch norm's running statistics
    with composite.context(isolated(model)) as work:
        yield work, _prepared(work)


@contextlib.contextmanager
def grad_mode() -> Iterator[None]:
    """Gradients on, even inside the caller's ``torch.no_grad()`` or ``torch.inference_mode()``; and the process-wide
    :data:`~neon_attrib.pipeline.graph.TRACE_LOCK`, so that no explanation runs while another thread's graph canonizer
    traces
    (explanations in several threads take turns)."""
    with TRACE_LOCK, torch.inference_mode(False), torch.enable_grad():
        yield


def run(model: nn.Module, inputs: Sequence[torch.Tensor], target: Any = None, *,
        composite: Composite | None = None, beta: float | None = None, eps: float | None = None,
        extra_args: Sequence[Any] = (), audit: bool = True, strict: bool = False,
        owner: str | None = None, precision: str = "exact", at: Sequence[str] = (),
        stop_at: str | None = None) -> Explanation:
    """Explain ``model(*inputs, *extra_args)`` for ``target``: the core every entry point calls.

    Parameters
    ----------
    model : torch.nn.Module
        Any model with NEON layers or heads (and Zennit-covered layers around them).
    inputs : sequence of torch.Tensor
        Inputs in the model's dtype and device, batched over the first dimension; they are copied, never modified.
    target : optional
        See :func:`resolve_targets`.
    composite, beta, eps :
        See :func:`resolve_composite`.
    extra_args : sequence
        Further positional arguments of the model (no relevance).
    audit : bool
        Run the conservation audit (cheap: two sums per audited module call, and one host synchronisation).
    strict : bool
        Raise :class:`ConservationError` instead of warning when the audit fails.
    owner : str, optional
        Name for messages (default: the model's class).
    precision : {"exact", "fast"}
        The precision policy on CUDA (:func:`precision_mode`); default exact (no TensorFloat-32, deterministic
        convolutions).
    at : sequence of str
        Names of modules (``model.named_modules()``) whose output's relevance is returned too, in
        :attr:`Explanation.at` (e.g. a feature extractor and a head: the relevance reaching the feature map and each
        location's score). Each must run exactly once in the forward pass.
    stop_at : str, optional
        The name of a module where the backward pass stops: its output's relevance is in :attr:`Explanation.at`, the
        audit compares the score with it, and no relevance reaches the inputs (:attr:`Explanation.relevance` is
        empty). Every path from the inputs to the output must pass through it.

    Returns
    -------
    Explanation

    Raises
    ------
    ValueError
        Besides the coverage checks: a module of ``at`` or ``stop_at`` that does not exist, does not return a tensor,
        does not run or runs twice, or, for ``stop_at``, a path from the inputs to the output around the module.

    Examples
    --------
    >>> from neon_attrib import KMeansMembership
    >>> model = KMeansMembership(n_clusters=2, random_state=0).double().fit(torch.randn(20, 3, dtype=torch.float64))
    >>> result = run(model, (torch.randn(4, 3, dtype=torch.float64),), at=("pool",))
    >>> result.relevance[0].shape, result.at["pool"].shape, result.audit.ok
    (torch.Size([4, 3]), torch.Size([4, 2]), True)
    """
    owner = owner or type(model).__name__
    check_precision(precision, owner)
    device = inputs[0].device if inputs else torch.device("cpu")
    with grad_mode(), precision_mode(precision, device):
        leaves = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs)
        with hooked(model, composite, beta=beta, eps=eps) as (hooked_model, rules):
            step = _Step.take(hooked_model, rules, leaves, lambda output: _target_seed(model, output, target),
                             extra_args=extra_args, audit=audit, owner=owner, at=at, stop_at=stop_at)
    result_audit = step.audit(leaves[0].dtype if leaves else torch.float32, precision)
    if result_audit is not None:
        _report(result_audit, owner, strict)
    return Explanation(relevance=step.relevance, output=step.output, target=step.target, score=step.score,
                       audit=result_audit, at=step.at)


def _target_seed(model: nn.Module, output: torch.Tensor, target: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The explained output index per sample, and the relevance put on the output (:func:`attribution_output`)."""
    targets = resolve_targets(model, output, target)
    return targets, attribution_output(output, targets)


@dataclass
class _Step:
    """One forward and one backward pass of a model carrying its rules: the step every explanation runs once.

    :func:`run` takes it on a copy hooked for the call, :class:`Explainer` on the copy it keeps registered.
    """

    output: torch.Tensor
    target: torch.Tensor | None
    seed: torch.Tensor
    relevance: tuple[torch.Tensor, ...]
    at: dict[str, torch.Tensor]
    recorder: _AuditRecorder | None
    stop_at: str | None
    n: int

    def copied(self) -> _Step:
        """The step with copies of its tensors (a replayed CUDA graph rewrites the originals; the audit record is
        shared: read it before the next replay)."""
        return _Step(output=self.output.clone(), target=None if self.target is None else self.target.clone(),
                     seed=self.seed.clone(), relevance=tuple(r.clone() for r in self.relevance),
                     at={name: t.clone() for name, t in self.at.items()}, recorder=self.recorder,
                     stop_at=self.stop_at, n=self.n)

    @property
    def score(self) -> torch.Tensor:
        """(n,) the explained score: the relevance put on the output, summed per sample."""
        seed = self.seed.detach()
        return _flat(seed).sum(1) if seed.ndim else seed.reshape(1)

    @classmethod
    def take(cls, work: nn.Module, rules: dict[str, Hook], leaves: tuple[torch.Tensor, ...],
             seed_of: Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]], *,
             extra_args: Sequence[Any] = (), audit: bool = True, owner: str, at: Sequence[str] = (),
             stop_at: str | None = None) -> _Step:
        """Forward ``leaves`` through ``work`` (hooked with ``rules``), put ``seed_of(output)`` (targets, seed) on the
        output, and take the relevance of the differentiable leaves and of the outputs of the modules ``at`` (the
        backward ends at ``stop_at``'s output). Call inside :func:`grad_mode`.

        Rules that choose between computations by a condition of the data follow their prediction and record the
        condition on the device (:mod:`neon_attrib.core.deferred`); the conditions are read back once at the end,
        and if a followed prediction did not hold the step is taken again with every rule checking first."""
        for defer in (True, False):
            checks = DeferredChecks(defer=defer)
            with checks.collecting():
                step = cls._take(work, rules, leaves, seed_of, extra_args=extra_args, audit=audit, owner=owner,
                                 at=at, stop_at=stop_at)
            if checks.settle() or not defer:
                break
        return step

    @classmethod
    def _take(cls, work: nn.Module, rules: dict[str, Hook], leaves: tuple[torch.Tensor, ...],
              seed_of: Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]], *,
              extra_args: Sequence[Any] = (), audit: bool = True, owner: str, at: Sequence[str] = (),
              stop_at: str | None = None) -> _Step:
        """One forward and one backward pass (:meth:`take`)."""
        n = leaves[0].shape[0] if leaves and leaves[0].ndim else 0
        recorder = _AuditRecorder(rules, n) if audit else None
        try:
            with _captured(work, at, stop_at, owner) as captured:
                output = work(*leaves, *extra_args)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{owner} must return a tensor to be explained. Got {type(output).__name__}.")
            targets, seed = seed_of(output.detach())
            seed = _seed_like(seed, output, owner)
            differentiable = [leaf for leaf in leaves if leaf.requires_grad]
            wrt = differentiable + list(captured.values())
            if n == 0 or not output.requires_grad:
                grads: Sequence[torch.Tensor | None] = [None] * len(wrt)
            else:
                grads = torch.autograd.grad((output,), wrt, grad_outputs=(seed,), allow_unused=True)
        finally:
            if recorder is not None:
                recorder.close()
        if stop_at is not None and any(grad is not None for grad in grads[:len(differentiable)]):
            raise ValueError(f"{owner}: part of the score reaches the input around {stop_at!r} (a skip connection?), "
                             f"so the relevance there would be incomplete. Choose a module every path passes through "
                             f"(e.g. a whole ResNet stage rather than a layer inside a block).")
        relevance: tuple[torch.Tensor, ...] = ()
        if stop_at is None:
            grad_iter = iter(grads[:len(differentiable)])
            relevance = tuple(_or_zeros(next(grad_iter), leaf) if leaf.requires_grad else torch.zeros_like(leaf)
                              for leaf in leaves)
        at_relevance = {name: _or_zeros(grad, tensor)
                        for (name, tensor), grad in zip(captured.items(), grads[len(differentiable):])}
        return cls(output=output.detach(), target=targets, seed=seed, relevance=relevance, at=at_relevance,
                   recorder=recorder, stop_at=stop_at, n=n)

    def audit(self, dtype: torch.dtype, precision: str) -> Audit | None:
        """The conservation audit (None unless :meth:`take` recorded one): the score against what the rules
        dissipated and the relevance where the backward pass ended (the inputs, or ``stop_at``'s output)."""
        if self.recorder is None:
            return None
        reached = self.relevance if self.stop_at is None else (self.at[self.stop_at],)
        input_sum, input_mass = _reached_sums(reached, self.n)
        return self.recorder.audit(_sample_sums(self.seed, self.n), input_sum, input_mass,
                                   default_tolerance(dtype, precision))


@contextlib.contextmanager
def _captured(work: nn.Module, at: Sequence[str], stop_at: str | None, owner: str) -> Iterator[dict[str, torch.Tensor]]:
    """Context manager: record the outputs of the modules named ``at`` (and ``stop_at``, cut from the graph there) in
    one forward pass of ``work``; yields ``{name: output}``, complete once the block has run."""
    names = list(dict.fromkeys([*at, *([stop_at] if stop_at is not None else [])]))
    if not names:  # the plain explanation (and every call of an Explainer): nothing to look up
        yield {}
        return
    modules = dict(work.named_modules())
    unknown = [name for name in names if not isinstance(name, str) or name not in modules]
    if unknown:
        raise ValueError(f"{owner}: {unknown[0]!r} is not a module of the model ({type(work).__name__}); pass names "
                         f"of model.named_modules().")
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[nn.Module, Any, Any], torch.Tensor | None]:
        def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"{owner}: {name!r} ({type(module).__name__}) returns {type(output).__name__}, not "
                                 f"a tensor, so no relevance can be read at its output.")
            if name in captured:
                raise ValueError(f"{owner}: {name!r} ({type(module).__name__}) runs twice in one forward pass; choose "
                                 f"a module that runs once.")
            if name == stop_at:  # the graph is cut here: what still reaches the inputs bypasses the module
                output = output.detach().requires_grad_(True)
            captured[name] = output
            return output if name == stop_at else None
        return hook

    handles = [modules[name].register_forward_hook(capture(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in captured]
    if missing:
        raise ValueError(f"{owner}: {missing[0]!r} ({type(modules[missing[0]]).__name__}) did not run in the forward "
                         f"pass (the model never calls it, or stops before it), so no relevance reaches it.")


def _seed_like(seed: Any, output: torch.Tensor, owner: str) -> torch.Tensor:
    """The relevance put on the output, broadcast to the output's shape, or a clear error."""
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"{owner}: the relevance put on the output (attr_output, or what its function returned) "
                        f"must be a tensor. Got {type(seed).__name__}.")
    try:
        return torch.broadcast_to(seed.to(device=output.device, dtype=output.dtype), output.shape)
    except RuntimeError:
        raise ValueError(f"{owner}: the relevance put on the output (attr_output) has shape {tuple(seed.shape)}, which "
                         f"does not broadcast to the output's {tuple(output.shape)}. Give the relevance of every "
                         f"output (e.g. a one-hot of the classes to explain, or out * one_hot for their scores), not "
                         f"class indices.") from None


def _or_zeros(grad: torch.Tensor | None, leaf: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(leaf) if grad is None else grad.detach()


# ---------------------------------------------------------------------------------------------------------------------
# the reusable explainer
class Explainer:
    """Register a composite once and explain many batches: the loop-friendly form of :func:`run`.

    The composite is registered on a structural copy of the model (:func:`isolated`), so the model itself never
    carries hooks: using an explainer without ``with``, or never closing it, leaks nothing onto the model, and
    :func:`~neon_attrib.explain` on the same model is unaffected while the explainer is open. One explainer serves
    one batch at a time (calls from several threads are serialised); give each thread its own for parallel work.
    Inputs are copied, never modified.

    Parameters
    ----------
    model : torch.nn.Module
        The model to explain.
    composite : zennit.core.Composite
        Used as given and registered until :meth:`close` (resolve it first with :func:`resolve_composite` for NEON
        models); give each explainer its own composite object.
    precision : {"exact", "fast"}
        The precision policy on CUDA (:func:`precision_mode`). ``"exact"`` (default): no TensorFloat-32,
        deterministic convolution algorithms. ``"fast"``: TensorFloat-32, cuDNN autotuning and ``channels_last``
        (approximate: TF32 rounds products to ~1e-3; the audit tolerance is 5e-2).
    channels_last : bool, optional
        Feed 4-D inputs in ``torch.channels_last`` memory format. Default: with ``precision="fast"`` only.
    autocast_dtype : torch.dtype, optional
        Run under ``torch.autocast`` with this dtype (``torch.bfloat16`` or ``torch.float16``). **Approximate**.
    cudnn_benchmark : bool, optional
        If given, ``torch.backends.cudnn.benchmark`` is set to it during each call on CUDA and restored afterwards.
        Default None: the precision policy's choice (off when exact, on when fast).
    fused : bool
        Run the fast rules' element-wise steps as fused kernels compiled by ``torch.compile``
        (:mod:`neon_attrib.core.fused`): the same numbers, fewer passes over memory. For large batches on a GPU; the
        first calls compile (seconds), and small tensors keep the eager operations. Default False.
    cuda_graphs : bool
        On CUDA, capture the explanation step in a CUDA graph once inputs of one shape have been explained twice, and
        replay it for further inputs of that shape (:mod:`neon_attrib.pipeline.graphs`): one launch instead of the
        hooks' host work, for small batches. Every replay is checked like an eager step (a failed shortcut condition
        is taken again eagerly); a capture that fails or differs from the eager step switches the graphs off with a
        warning. Needs the same ``attr_output`` function (or None) in every call; tensors as ``attr_output`` and
        autocast run eagerly. Default False.
    audit : bool
        Audit conservation on every call (:class:`Audit`); the last one is in :attr:`last_audit`.
    strict : bool
        Raise instead of warning when the audit fails.
    default_target : callable, optional
        ``default_target(output) -> targets`` used when a call gives no ``attr_output``; default: explain the output
        itself (scalar scores) or the argmax.

    Examples
    --------
    >>> import torch, torchvision
    >>> from neon_attrib.vision.fast import FastEpsilonGammaBox
    >>> features = torchvision.models.vgg16(weights=None).features.eval()
    >>> with Explainer(features, FastEpsilonGammaBox(low=-3.0, high=3.0), audit=False) as explainer:
    ...     output, relevance = explainer(torch.randn(2, 3, 32, 32), lambda out: out)
    >>> relevance.shape
    torch.Size([2, 3, 32, 32])
    """

    def __init__(self, model: nn.Module, composite: Composite, *, precision: str = "exact",
                 channels_last: bool | None = None,
                 autocast_dtype: torch.dtype | None = None, cudnn_benchmark: bool | None = None,
                 fused: bool = False, cuda_graphs: bool = False, audit: bool = True, strict: bool = False,
                 default_target: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                 owner: str | None = None):
        if not isinstance(composite, Composite):
            raise TypeError(f"The 'composite' parameter of {type(self).__name__} must be a zennit.core.Composite. "
                            f"Got {composite!r} instead.")
        if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"The 'autocast_dtype' parameter of {type(self).__name__} must be torch.bfloat16, "
                             f"torch.float16 or None. Got {autocast_dtype!r} instead.")
        self.precision = check_precision(precision, type(self).__name__)
        if not isinstance(fused, bool):
            raise TypeError(f"The 'fused' parameter of {type(self).__name__} must be a bool. Got {fused!r} instead.")
        self.fused = fused
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"The 'cuda_graphs' parameter of {type(self).__name__} must be a bool. "
                            f"Got {cuda_graphs!r} instead.")
        self.model = model
        self.composite = composite
        self.channels_last = precision == "fast" if channels_last is None else channels_last
        self.autocast_dtype = autocast_dtype
        self.cudnn_benchmark = cudnn_benchmark
        self.audit = audit
        self.strict = strict
        self.default_target = default_target
        self.owner = owner or type(model).__name__
        self.last_audit: Audit | None = None
        self._lock = threading.Lock()
        self._closed = False
        check_explainable(model)  # before the canonizers, which would merge a batch norm's running statistics
        self._work = isolated(model)
        self.composite.register(self._work)
        self._hooked = _prepared(self._work)
        #: the captured steps (``cuda_graphs=True``), None otherwise
        self.graphs = StepGraphs(self.owner) if cuda_graphs else None

    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Remove the hooks (from the internal copy); the explainer cannot be used afterwards."""
        with self._lock:
            if not self._closed:
                self.composite.remove()
                self._closed = True
                self._work = None

    @contextlib.contextmanager
    def _context(self, device: torch.device) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(grad_mode())
            stack.enter_context(precision_mode(self.precision, device))
            stack.enter_context(fused_kernels(self.fused))
            if device.type == "cuda" and self.cudnn_benchmark is not None:
                previous = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = self.cudnn_benchmark
                stack.callback(setattr, torch.backends.cudnn, "benchmark", previous)
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type=device.type, dtype=self.autocast_dtype))
            yield

    def __call__(self, input: torch.Tensor,
                 attr_output: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explain a batch: returns ``(output, relevance)``, both detached; the relevance is shaped like ``input``.

        ``attr_output`` is the relevance put on the output: a tensor (broadcast to the output) or a function of the
        output. Default: the :attr:`default_target`'s score (or the output itself).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"This {type(self).__name__} is closed; create a new one.")
            return self._explain(input, attr_output)

    def _explain(self, input, attr_output):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{self.owner} explainer expects a tensor. Got {type(input).__name__}.")
        memory_format = torch.channels_last if self.channels_last and input.ndim == 4 else torch.preserve_format
        graphs = self.graphs if input.is_cuda and self.autocast_dtype is None else None
        with self._context(input.device):
            leaf = input.detach().clone(memory_format=memory_format)
            key = input_key(self.model, leaf, attr_output) if graphs is not None else None
            replayed = graphs.replay(key, leaf) if graphs is not None else None
            if replayed is not None:
                step = replayed.copied()
            else:
                leaf.requires_grad_(True)
                step = self._take(leaf, attr_output, retake=True)
                if graphs is not None and graphs.observe(key):
                    graphs.capture(key, leaf, lambda static: self._take(static, attr_output, retake=False),
                                   lambda captured: captured.relevance[0], step.relevance[0])
        if self.channels_last:
            step.relevance = tuple(r.contiguous(memory_format=torch.contiguous_format) for r in step.relevance)
        audit = step.audit(leaf.dtype, self.precision)
        if audit is not None:
            self.last_audit = audit
            _report(audit, self.owner, self.strict)
        return step.output, step.relevance[0]

    def _take(self, leaf: torch.Tensor, attr_output: Any, retake: bool) -> _Step:
        """One step on ``leaf``: :meth:`_Step.take` (``retake``: again with host checks if a prediction failed), or
        one :meth:`_Step._take` (the checks are settled by the caller: a captured step)."""
        take = _Step.take if retake else _Step._take
        return take(self._work, self._hooked, (leaf,), lambda output: self._seed(output, attr_output),
                    audit=self.audit, owner=self.owner)

    def _seed(self, output: torch.Tensor, attr_output: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The targets and the relevance put on the output (see :meth:`__call__`)."""
        if attr_output is None:
            targets = self.default_target(output) if self.default_target is not None else None
            return targets, attribution_output(output, targets)
        return None, attr_output(output) if callable(attr_output) else attr_output
