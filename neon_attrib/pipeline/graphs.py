"""Explanation steps captured in CUDA graphs and replayed (opt-in: ``Explainer(..., cuda_graphs=True)``).

At batch 1 a GPU explanation is bound by the host: the Python of every rule's hooks and one launch per operation.
A CUDA graph records the kernels of one whole explanation step (forward pass, rules, audit sums) once and replays them
with one launch. This module decides when to capture and whether a replay may be used:

* **Warm-up.** A step is captured after ``warmup`` eager explanations of inputs of the same kind (shape, strides,
  dtype, device, the same ``attr_output`` function, unchanged parameters and buffers), when every rule has a
  prediction for its shortcut conditions (:mod:`neon_attrib.core.deferred`): the captured step then contains no host
  synchronisation.
* **Check of the capture.** The captured step is replayed on the input of the explanation that triggered it and its
  heatmap compared with the eager one; a difference beyond 1e-6 of the largest value (or another NaN pattern)
  switches the graphs off for the explainer with a :class:`RuntimeWarning`, as does an error while capturing.
* **Every replay stays exact.** The shortcut conditions recorded in the capture are rewritten by every replay and read
  back once (as in an eager explanation); if a prediction that the captured step followed fails, the replay is
  discarded and the step is taken eagerly (with host checks: exact). If any prediction changes, the graph is dropped
  and captured again later (at most ``max_captures`` times per kind of input).

Tensors a replay returns are copies: later replays rewrite the captured ones.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..core.deferred import DeferredChecks

__all__ = ["CudaGraph", "GraphBackend", "StepGraphs", "input_key"]

#: kinds of input with a graph kept at once (each holds the memory of one explanation)
MAX_GRAPHS = 2


class GraphBackend(Protocol):
    """Records the device work of ``run()`` once (:meth:`capture`) and runs it again on the same memory
    (:meth:`replay`)."""

    def capture(self, run: Callable[[], Any]) -> Any: ...

    def replay(self) -> None: ...


class CudaGraph:
    """:class:`torch.cuda.CUDAGraph`: one warm-up run on a side stream (lazy initialisations stay outside the
    capture), the capture, replays."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, run: Callable[[], Any]) -> Any:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        with torch.cuda.graph(self.graph):
            result = run()
        return result

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Captured:
    static: torch.Tensor  # the captured input: replays read it
    step: Any  # what the captured run returned: replays rewrite its tensors
    checks: DeferredChecks  # the conditions recorded in the capture
    backend: GraphBackend


def input_key(model: nn.Module, leaf: torch.Tensor, attr_output: Any) -> tuple | None:
    """What a captured step depends on besides the input's values, or None where a step cannot be captured
    (``attr_output`` a tensor, or not hashable)."""
    if isinstance(attr_output, torch.Tensor):
        return None
    try:
        hash(attr_output)
    except TypeError:
        return None
    state = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    return (tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, attr_output, state)


class StepGraphs:
    """The captured steps of one explainer (see the module docstring).

    Parameters
    ----------
    owner : str
        Named in warnings.
    backend : callable, optional
        ``backend(device) -> GraphBackend``; default :class:`CudaGraph`.
    warmup : int
        Eager explanations of a kind of input before it is captured (at least 2: the rules' predictions).
    max_captures : int
        Captures per kind of input (a graph is dropped when a prediction changes).
    """

    def __init__(self, owner: str, backend: Callable[[torch.device], GraphBackend] | None = None, warmup: int = 2,
                 max_captures: int = 3):
        self.owner = owner
        self.backend = backend or CudaGraph
        self.warmup = max(2, warmup)
        self.max_captures = max_captures
        self.graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self.seen: Counter[Hashable] = Counter()
        self.captures: Counter[Hashable] = Counter()
        #: why graphs are off for this explainer (None while they are on)
        self.disabled: str | None = None
        #: replays used (for tests and benchmarks)
        self.replays = 0

    def replay(self, key: Hashable | None, leaf: torch.Tensor) -> Any | None:
        """The captured step replayed on ``leaf`` (its tensors are rewritten by the next replay), or None: no graph
        for ``key``, or a followed prediction failed (take the step eagerly)."""
        if key is None or self.disabled is not None:
            return None
        captured = self.graphs.get(key)
        if captured is None:
            return None
        self.graphs.move_to_end(key)
        with torch.no_grad():
            captured.static.copy_(leaf)
        captured.backend.replay()
        held = captured.checks.settle(keep=True)
        if not (held and captured.checks.stable()):
            del self.graphs[key]  # it follows predictions that no longer hold: captured again later
        if not held:
            return None
        self.replays += 1
        return captured.step

    def observe(self, key: Hashable | None) -> bool:
        """Count an eager explanation of ``key``; whether to capture it now."""
        if key is None or self.disabled is not None or key in self.graphs:
            return False
        self.seen[key] += 1
        return self.seen[key] >= self.warmup and self.captures[key] < self.max_captures

    def capture(self, key: Hashable, leaf: torch.Tensor, take: Callable[[torch.Tensor], Any],
                relevance_of: Callable[[Any], torch.Tensor], reference: torch.Tensor) -> None:
        """Capture ``take(static_input)`` (a step taken inside :meth:`DeferredChecks.collecting`), replay it on
        ``leaf`` and keep it if its heatmap (``relevance_of(step)``) equals ``reference``, the eager one."""
        self.captures[key] += 1
        static = leaf.detach().clone(memory_format=torch.preserve_format).requires_grad_(leaf.requires_grad)

        def run() -> tuple[Any, DeferredChecks]:
            checks = DeferredChecks(defer=True)
            with checks.collecting():
                return take(static), checks

        try:
            backend = self.backend(leaf.device)
            step, checks = backend.capture(run)
        except Exception as error:  # an operation the graph cannot hold (a host read, a CPU copy): stay eager
            message = str(error).splitlines()[0] if str(error) else ""
            self._disable(f"capturing failed ({type(error).__name__}: {message})")
            return
        captured = _Captured(static=static, step=step, checks=checks, backend=backend)
        backend.replay()
        if not captured.checks.settle(keep=True) or not captured.checks.stable():
            return  # the data changed the predictions meanwhile: try again after the next eager explanations
        difference = _mismatch(relevance_of(step), reference)
        if difference is not None:
            self._disable(f"the replayed heatmap differs from the eager one ({difference})")
            return
        self.graphs[key] = captured
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)

    def _disable(self, why: str) -> None:
        self.disabled = why
        self.graphs.clear()
        warnings.warn(f"{self.owner}: CUDA graphs are off for this explainer: {why}. Explanations run eagerly (the "
                      f"same numbers, without the speed-up).", RuntimeWarning, stacklevel=4)


def _mismatch(result: torch.Tensor, reference: torch.Tensor) -> str | None:
    """None if ``result`` equals ``reference`` to 1e-6 of its largest value with the same NaN and inf places, else
    what differs."""
    if result.shape != reference.shape:
        return f"shape {tuple(result.shape)} against {tuple(reference.shape)}"
    finite = torch.isfinite(reference)
    if not torch.equal(finite, torch.isfinite(result)) or not torch.equal(
            result[~finite].nan_to_num(), reference[~finite].nan_to_num()):
        return "NaN or inf in other places"
    scale = reference[finite].abs().max() if finite.any() else reference.new_zeros(())
    error = (result[finite] - reference[finite]).abs().max() if finite.any() else reference.new_zeros(())
    if error > 1e-6 * scale:
        return f"max. relative error {(error / scale).item():.1e}"
    return None
