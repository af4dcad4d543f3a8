"""CUDA graphs of explanation steps (neon_attrib.pipeline.graphs, ``Explainer(cuda_graphs=True)``).

On a CPU the graph is emulated: the "capture" keeps what the step returned, and a "replay" takes the step again and
writes every resulting tensor into the captured ones, as a replayed CUDA graph rewrites its memory. That checks what
the explainer does around the graph (when it captures, what it reads back after a replay, when it falls back); the
CUDA test at the end checks the real graphs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import randomize_batch_norms
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from neon_attrib import KDEOutlier
from neon_attrib.pipeline.engine import ConservationWarning
from neon_attrib.vision.deep import DeepNeon
from neon_attrib.vision.fast import (
    FastEpsilonGammaBox,
    FastEpsilonPlusFlat,
    FastGamma,
    FastResNetCanonizer,
    LRPExplainer,
)

LOW, HIGH = -3.0, 3.0


def _write_into(old, new) -> None:
    """Write every tensor reachable from ``new`` into its counterpart in ``old`` (the same structure)."""
    if old is new or old is None:
        return
    if isinstance(old, torch.Tensor):
        with torch.no_grad():
            old.copy_(new)
    elif isinstance(old, (tuple, list)):
        for a, b in zip(old, new, strict=True):
            _write_into(a, b)
    elif isinstance(old, dict):  # (a check's predictions: booleans the host keeps, no tensors)
        for name in old.keys() & new.keys():
            _write_into(old[name], new[name])
    elif hasattr(old, "__dict__") and not isinstance(old, (nn.Module, type)) and not callable(old):
        for name, value in vars(old).items():
            _write_into(value, vars(new)[name])


#: what a CUDA graph cannot hold: reads of values by the host, and tensors made from host data (each a host-to-device
#: copy on a GPU)
HOST_TRAFFIC = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::lift_fresh",
                "aten::_assert_async", "aten::equal"}


class NoHostTraffic(TorchDispatchMode):
    """Raises on :data:`HOST_TRAFFIC`, as a CUDA stream capture does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_TRAFFIC:
            raise RuntimeError(f"{func._schema.name}: operation not permitted when stream is capturing")
        return func(*args, **(kwargs or {}))


class EmulatedGraph:
    """A CPU stand-in for :class:`neon_attrib.pipeline.graphs.CudaGraph` (see the module docstring); the captured
    run refuses what a CUDA capture refuses (:class:`NoHostTraffic`)."""

    captures = 0

    def __init__(self, device: torch.device):
        self.run = None
        self.result = None

    def capture(self, run):
        type(self).captures += 1
        run()  # the warm-up run
        with NoHostTraffic():
            self.run, self.result = run, run()
        return self.result

    def replay(self) -> None:
        _write_into(self.result, self.run())


class FailingGraph(EmulatedGraph):
    def capture(self, run):
        raise RuntimeError("operation not permitted when stream is capturing")


class WrongGraph(EmulatedGraph):
    def replay(self) -> None:
        super().replay()
        step, _ = self.result
        step.relevance[0].mul_(1.001)


def graphed(model, backend, **options):
    explainer = LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), cuda_graphs=True, **options)
    explainer.graphs.backend = backend
    return explainer


def sign_switching(dtype=torch.float64) -> nn.Sequential:
    """Non-negative inputs keep the second convolution's input non-negative (shortcut); negative ones do not."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, padding=1), nn.ReLU()).eval().to(dtype)
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.abs_()
    return model


def replaying(seed: int):
    """``(model, x, explainer)``: a graphed explainer of :func:`sign_switching` that has explained ``x`` twice, captured
    the step and replayed it once."""
    model = sign_switching()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fast = graphed(model, EmulatedGraph)
    for _ in range(3):
        fast(x, identity)
    assert fast.graphs.replays == 1
    return model, x, fast


def identity(out: torch.Tensor) -> torch.Tensor:
    return out


@pytest.fixture
def on_cuda(monkeypatch):
    """Let the explainer treat CPU tensors as CUDA ones (only whether it uses its graphs depends on it)."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def test_replays_equal_eager_explanations(on_cuda):
    """Captured after two eager explanations of one kind of input, then replayed: every heatmap, output and audit
    equals the eager explainer's, and the returned tensors are not rewritten by later replays."""
    model = sign_switching()
    generator = torch.Generator().manual_seed(32)
    inputs = [torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=generator) for _ in range(5)]
    EmulatedGraph.captures = 0
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, graphed(model, EmulatedGraph) as fast:
        results = []
        for x in inputs:
            output, relevance = fast(x, identity)
            reference_output, reference = eager(x, identity)
            assert torch.equal(relevance, reference) and torch.equal(output, reference_output)
            assert torch.equal(fast.last_audit.relative_error, eager.last_audit.relative_error)
            results.append(relevance)
        assert fast.graphs.replays == 3 and EmulatedGraph.captures == 1
        for x, relevance in zip(inputs, results):  # copies: unchanged by the later replays
            assert torch.equal(relevance, eager(x, identity)[1])
        # another shape or another attr_output function: eager again (then captured in its turn)
        fast(inputs[0][:1], identity)
        fast(inputs[0], lambda out: 2 * out)
        assert fast.graphs.replays == 3


def test_failed_prediction_in_a_replay_is_taken_eagerly(on_cuda):
    """A replay whose followed shortcut prediction fails (negative images after non-negative ones) is discarded and the
    step taken eagerly: the exact heatmap; the graph is dropped and captured again with the new predictions."""
    model = sign_switching()
    generator = torch.Generator().manual_seed(33)
    positive = [torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=generator) for _ in range(3)]
    negative = -4 * torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=generator)
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, graphed(model, EmulatedGraph) as fast:
        for x in positive:
            fast(x, identity)
        assert fast.graphs.replays == 1 and fast.graphs.graphs
        _, relevance = fast(negative, identity)
        assert torch.equal(relevance, eager(negative, identity)[1])
        # the graph that followed the failed prediction was dropped, and the step captured again with the new ones
        assert fast.graphs.replays == 1 and sum(fast.graphs.captures.values()) == 2
        _, relevance = fast(negative, identity)
        assert torch.equal(relevance, eager(negative, identity)[1]) and fast.graphs.replays == 2
        gamma = [hook for hook in fast.composite.hook_refs if isinstance(hook, FastGamma)]
        assert any(hook.last_path == "exact" for hook in gamma)


def test_nan_heatmap_from_a_replay_fails_the_audit(on_cuda):
    """The audit of a replayed step is read from its captured records: a NaN the replay produces is reported."""
    _, x, fast = replaying(34)
    with fast:
        poisoned = x.clone()
        poisoned[0, 0, 0, 0] = float("nan")
        with pytest.warns(ConservationWarning, match="not finite"):
            _, relevance = fast(poisoned, identity)
        assert relevance[0].isnan().any() and not fast.last_audit.ok


@pytest.mark.parametrize("backend, reason", [(FailingGraph, "capturing failed"), (WrongGraph, "differs")])
def test_a_failed_or_wrong_capture_switches_graphs_off(on_cuda, backend, reason):
    """An error while capturing, or a replay that differs from the eager step: one RuntimeWarning, then eager
    explanations (the same heatmaps)."""
    model = sign_switching()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(35))
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, graphed(model, backend) as fast:
        fast(x, identity)
        with pytest.warns(RuntimeWarning, match=reason):
            fast(x, identity)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(2):
                assert torch.equal(fast(x, identity)[1], eager(x, identity)[1])
        assert fast.graphs.disabled and fast.graphs.replays == 0


def test_changed_weights_or_tensor_targets_run_eagerly(on_cuda):
    """A parameter changed in place is a new kind of input (the captured step holds the old modified weights);
    tensors as attr_output are not captured. Both give the eager heatmaps."""
    model, x, fast = replaying(36)
    with fast:
        with torch.no_grad():
            model[3].weight.mul_(2)
        with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager:
            assert torch.equal(fast(x, identity)[1], eager(x, identity)[1])
            seed = torch.ones(2, 4, 8, 8, dtype=torch.float64)
            for _ in range(3):
                assert torch.equal(fast(x, seed)[1], eager(x, seed)[1])
        assert fast.graphs.replays == 1


def small_resnet() -> nn.Module:
    torch.manual_seed(38)
    return randomize_batch_norms(torchvision.models.resnet18(num_classes=4), seed=38).eval().double()


@pytest.mark.parametrize("case", ["epsilon_plus_flat", "resnet", "deepneon_kde", "fused"])
def test_steps_hold_no_host_traffic(on_cuda, monkeypatch, case):
    """The steps captured for the documented paths read nothing back and copy nothing from the host (a CUDA capture
    would fail): a ResNet with its canonizer and merged batch norms, the other composite, a DeepNeon model with a KDE
    head, fused kernels; every replay equals the eager explanation."""
    generator = torch.Generator().manual_seed(39)
    if case == "deepneon_kde":
        features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)).double()
        model = DeepNeon(features, KDEOutlier(gamma=1e-2)).fit(
            torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=generator), progress=False)
        eager, fast = model.explainer(), model.explainer(cuda_graphs=True)
        fast.graphs.backend = EmulatedGraph
        explain = [lambda x, e=e: e(x) for e in (eager, fast)]
    else:
        model = small_resnet() if case == "resnet" else sign_switching()
        canonizers = [FastResNetCanonizer()] if case == "resnet" else []
        composite = (lambda: FastEpsilonPlusFlat(canonizers=list(canonizers))) if case != "fused" else (
            lambda: FastEpsilonGammaBox(low=LOW, high=HIGH))
        if case == "fused":
            from neon_attrib.core import fused
            monkeypatch.setattr(fused, "MIN_ELEMENTS", 2)
        eager = LRPExplainer(model, composite())
        fast = LRPExplainer(model, composite(), cuda_graphs=True, fused=case == "fused")
        fast.graphs.backend = EmulatedGraph
        explain = [lambda x, e=e: e(x, identity) for e in (eager, fast)]
    with eager, fast:
        for _ in range(4):
            x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=generator)
            assert torch.equal(explain[1](x)[1], explain[0](x)[1])
        assert fast.graphs.disabled is None, fast.graphs.disabled
        assert fast.graphs.replays == 2


def test_cuda_graphs_option_is_checked_and_off_on_cpu():
    model = sign_switching()
    with pytest.raises(TypeError, match="'cuda_graphs' parameter"):
        LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), cuda_graphs=1)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with graphed(model, EmulatedGraph) as fast:
        for _ in range(4):
            fast(x, identity)
        assert fast.graphs.replays == 0 and not fast.graphs.graphs  # CPU tensors: never captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_replays_equal_eager(batch):
    """Real CUDA graphs: replays equal the eager explainer's heatmaps (1e-6 of the largest value) and run."""
    model = sign_switching(torch.float32).cuda()
    generator = torch.Generator().manual_seed(37)
    inputs = [torch.rand(batch, 3, 32, 32, generator=generator).cuda() for _ in range(5)]
    with LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH)) as eager, \
            LRPExplainer(model, FastEpsilonGammaBox(low=LOW, high=HIGH), cuda_graphs=True) as fast:
        for x in inputs:
            _, relevance = fast(x, identity)
            _, reference = eager(x, identity)
            assert ((relevance - reference).abs().max() / reference.abs().max()).item() < 1e-6
        assert fast.graphs.disabled is None, fast.graphs.disabled
        assert fast.graphs.replays == 3
