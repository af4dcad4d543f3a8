"""The precision policy (CUDA switches scoped to an explanation) and batch norms with ``eps <= 0`` on every canonizer
path (PyTorch 2.10 and 2.11 refuse them, Zennit 1.0's merge makes them).

PyTorch 2.14 here accepts ``eps = 0`` in eval mode, so the refusal is simulated: ``torch.nn.functional.batch_norm``
is replaced by one that raises as PyTorch 2.11 does.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import accept_zero_eps
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from neon_attrib import explain
from neon_attrib.core.functional import safe_sqrt
from neon_attrib.models.neighbors import KNNOutlier
from neon_attrib.pipeline.engine import (
    Explainer,
    default_tolerance,
    guard_batch_norms,
    isolated,
    precision_mode,
    run,
    unguard_batch_norms,
)
from neon_attrib.pipeline.precision import _AFFINE
from neon_attrib.vision.deep import DeepNeon
from neon_attrib.vision.fast import (
    FastEpsilonGammaBox,
    FastResNetCanonizer,
    GuardBatchNorms,
    LRPExplainer,
    MergeBatchNorms,
)

LOW, HIGH = -3.0, 3.0


# ---------------------------------------------------------------------------------------------------------------------
# the precision policy
def cuda_flags() -> tuple:
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    return (cuda.matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, cudnn.deterministic,
            cudnn.benchmark)


def test_exact_mode_sets_and_restores_the_cuda_switches():
    before = cuda_flags()
    with precision_mode("exact", "cuda"):
        assert cuda_flags() == ("ieee", "ieee", "ieee", True, False)
        with precision_mode("fast", "cuda"):  # exact wins while an exact explanation runs
            assert cuda_flags() == ("ieee", "ieee", "ieee", True, False)
        assert cuda_flags() == ("ieee", "ieee", "ieee", True, False)
    assert cuda_flags() == before
    with precision_mode("fast", torch.device("cuda", 0)):
        assert cuda_flags() == ("tf32", "tf32", "tf32", before[3], True)  # deterministic: the caller's
    assert cuda_flags() == before


def test_precision_mode_restores_after_an_error_and_leaves_cpu_alone():
    before = cuda_flags()
    with pytest.raises(RuntimeError, match="boom"), precision_mode("exact", "cuda"):
        raise RuntimeError("boom")
    assert cuda_flags() == before
    with precision_mode("fast", "cpu"):
        assert cuda_flags() == before


def test_precision_mode_keeps_a_users_own_switches():
    cudnn = torch.backends.cudnn
    previous = cudnn.conv.fp32_precision, cudnn.benchmark, cudnn.deterministic
    try:
        cudnn.conv.fp32_precision, cudnn.benchmark, cudnn.deterministic = "tf32", True, False
        with precision_mode("exact", "cuda"):
            assert cudnn.conv.fp32_precision == "ieee" and not cudnn.benchmark and cudnn.deterministic
        assert (cudnn.conv.fp32_precision, cudnn.benchmark, cudnn.deterministic) == ("tf32", True, False)
        cudnn.deterministic = True  # a user who wants repeatable runs keeps them under the fast policy
        with precision_mode("fast", "cuda"):
            assert cudnn.deterministic and cudnn.benchmark
        assert cudnn.deterministic
    finally:
        cudnn.conv.fp32_precision, cudnn.benchmark, cudnn.deterministic = previous


def test_concurrent_explanations_restore_the_switches_once_all_left():
    before = cuda_flags()
    inside, release = threading.Barrier(3), threading.Event()
    seen = []

    def worker(precision):
        with precision_mode(precision, "cuda"):
            inside.wait()
            release.wait()
            seen.append(cuda_flags())

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("exact", "fast")]
    for thread in threads:
        thread.start()
    inside.wait()
    assert cuda_flags() == ("ieee", "ieee", "ieee", True, False)
    release.set()
    for thread in threads:
        thread.join()
    assert cuda_flags() == before and len(seen) == 2


@pytest.mark.parametrize("call", [
    lambda: precision_mode("tf32", "cuda").__enter__(),
    lambda: Explainer(nn.Linear(2, 1), EpsilonGammaBox(low=LOW, high=HIGH), precision="medium"),
    lambda: run(nn.Linear(2, 1), (torch.randn(3, 2),), precision="bf16"),
])
def test_unknown_precision_is_refused(call):
    with pytest.raises(ValueError, match="'precision' parameter .* must be one of \\('exact', 'fast'\\)"):
        call()


def test_fast_precision_defaults_and_tolerance():
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    exact = Explainer(features, FastEpsilonGammaBox(low=LOW, high=HIGH))
    fast = Explainer(features, FastEpsilonGammaBox(low=LOW, high=HIGH), precision="fast")
    assert (exact.precision, exact.channels_last) == ("exact", False)
    assert (fast.precision, fast.channels_last) == ("fast", True)
    x = torch.rand(2, 3, 8, 8)
    # on a CPU the policy changes nothing: the same numbers (channels_last only changes the memory layout)
    torch.testing.assert_close(fast(x, lambda out: out)[1], exact(x, lambda out: out)[1], rtol=1e-6, atol=1e-7)
    assert fast.last_audit.tolerance == default_tolerance(torch.float32, "fast") == 5e-2
    assert exact.last_audit.tolerance == default_tolerance(torch.float32) == 1e-2
    assert default_tolerance(torch.float64, "fast") == 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# batch norms with eps <= 0
@pytest.fixture
def refuse_zero_eps(monkeypatch):
    """``F.batch_norm`` as PyTorch 2.10/2.11 have it: ``eps <= 0`` refused, also in eval mode."""
    original = F.batch_norm

    def batch_norm(input, *args, **kwargs):
        eps = kwargs.get("eps", args[6] if len(args) > 6 else 1e-5)
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
        return original(input, *args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", batch_norm)


def zero_eps_merge(linears, batch_norm):
    """Zennit 1.0's merge, also when Zennit 0.5 is installed: the merged batch norm is the identity with eps = 0."""
    SequentialMergeBatchNorm.merge_batch_norm(linears, batch_norm)
    object.__setattr__(batch_norm, "eps", 0.0)


class ZeroEpsMerge(SequentialMergeBatchNorm):
    merge_batch_norm = staticmethod(zero_eps_merge)


class ZeroEpsMergeBatchNorms(MergeBatchNorms):
    merge_batch_norm = staticmethod(zero_eps_merge)


def zero_eps(canonizer):
    """A ResNet canonizer whose batch-norm merge is Zennit 1.0's (eps = 0), with either Zennit installed."""
    merge = ZeroEpsMergeBatchNorms() if isinstance(canonizer.canonizers[0], MergeBatchNorms) else ZeroEpsMerge()
    canonizer.canonizers = (merge, *canonizer.canonizers[1:])
    return canonizer


def randomized(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.1, generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomized(torchvision.models.resnet18(weights=None, num_classes=10)).double()


def resnet_paths():
    """(name, explain(model, x) -> relevance) for every way a batch norm gets merged."""

    def pipeline_with(composite):
        return lambda model, x: run(model, (x,), composite=composite).relevance[0]

    def explainer_with(composite):
        def call(model, x):
            with LRPExplainer(model, composite) as explainer:
                return explainer(x, lambda out: out)[1]
        return call

    def zennit_gradient(model, x):  # our canonizer with Zennit's attributor, no pipeline
        composite = EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[zero_eps(FastResNetCanonizer())])
        return Gradient(isolated(model), composite)(x, lambda out: out)[1]

    def zennit_guarded(model, x):  # Zennit's own canonizer and attributor, our guard last
        composite = EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[zero_eps(ResNetCanonizer()), GuardBatchNorms()])
        return Gradient(isolated(model), composite)(x, lambda out: out)[1]

    return [
        ("zennit ResNetCanonizer in run", pipeline_with(EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[
            ResNetCanonizer()]))),
        ("zero-eps merge in run", pipeline_with(EpsilonPlusFlat(canonizers=[zero_eps(ResNetCanonizer())]))),
        ("FastResNetCanonizer in LRPExplainer", explainer_with(FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=[
            FastResNetCanonizer()]))),
        ("zero-eps MergeBatchNorms in LRPExplainer", explainer_with(FastEpsilonGammaBox(
            low=LOW, high=HIGH, canonizers=[zero_eps(FastResNetCanonizer())]))),
        ("zero-eps MergeBatchNorms with zennit's Gradient", zennit_gradient),
        ("zero-eps zennit ResNetCanonizer + GuardBatchNorms with zennit's Gradient", zennit_guarded),
    ]


@pytest.mark.parametrize("index", range(len(resnet_paths())), ids=[name for name, _ in resnet_paths()])
def test_no_batch_norm_with_zero_eps_reaches_torch(resnet, refuse_zero_eps, index, monkeypatch):
    """Every canonizer path runs where PyTorch refuses eps = 0, with the relevance of the unguarded network (which
    PyTorch 2.14 runs), and leaves the model as it was."""
    _, explain_with = resnet_paths()[index]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = {key: value.clone() for key, value in resnet.state_dict().items()}
    relevance = explain_with(resnet, x)
    monkeypatch.undo()  # PyTorch as installed: accepts eps = 0 in eval mode; no guard
    monkeypatch.setattr("neon_attrib.pipeline.engine.guard_batch_norms", lambda model: [])
    monkeypatch.setattr("neon_attrib.vision.fast.canonizers.guard_batch_norms", lambda model: [])
    with accept_zero_eps():
        reference = explain_with(resnet, x)
    torch.testing.assert_close(relevance, reference, rtol=1e-12, atol=1e-12 * float(reference.abs().max()))
    assert all(torch.equal(value, state[key]) for key, value in resnet.state_dict().items())
    assert all("forward" not in module.__dict__ and _AFFINE not in module.__dict__ for module in resnet.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guarded_batch_norm_equals_torchs(dtype):
    """A batch norm of the user's own with eps = 0 (not merged): the guard's forward is PyTorch's (which 2.14 runs),
    to rounding, and the identity of a merged norm is exact."""
    bn = randomized(nn.Sequential(nn.BatchNorm2d(5, eps=0.0)))[0].to(dtype)
    x = torch.randn(2, 5, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with accept_zero_eps():  # PyTorch's own where it runs eps = 0 (2.13 and later), a written-out one elsewhere
        expected = bn(x)
    assert guard_batch_norms(bn) == [bn]
    torch.testing.assert_close(bn(x), expected)
    for key, func in zip(("running_mean", "running_var", "bias", "weight"), (torch.zeros_like, torch.ones_like) * 2):
        object.__setattr__(bn, key, func(getattr(bn, key)))
    assert torch.equal(bn(x), x)


def test_guarded_batch_norm_follows_changes_and_grad_modes():
    """The guard computes its scale and shift once: a merged norm costs one operation per call; a statistic changed in
    place, or a move to float64, is followed; a first call in inference mode does not keep the affine map from a later
    call with gradients; unguarding leaves nothing behind."""
    bn = randomized(nn.Sequential(nn.BatchNorm2d(3, eps=0.0)))[0]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    guarded = guard_batch_norms(bn)
    with torch.inference_mode():
        bn(x)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(bn(leaf).sum(), leaf)  # no "inference tensors cannot be saved for backward"
    torch.testing.assert_close(grad, (bn.weight / bn.running_var.sqrt()).detach().view(1, 3, 1, 1).expand_as(x))
    with torch.no_grad():
        bn.running_var.mul_(4.0)
    with accept_zero_eps():
        expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=0.0)
    torch.testing.assert_close(bn(x), expected)
    bn.double()
    torch.testing.assert_close(bn(x.double()), expected.double(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        bn.running_mean.zero_(), bn.running_var.fill_(1.0), bn.weight.fill_(1.0), bn.bias.zero_()
    x = x.double()
    bn(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = bn(x)
    assert torch.equal(result, x) and [event.name for event in profile.events()
                                                 if event.name.startswith("aten::")] == ["aten::add"]
    unguard_batch_norms(guarded)
    assert "forward" not in bn.__dict__ and _AFFINE not in bn.__dict__


def test_guard_refuses_batch_statistics_with_zero_eps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0)).train()
    with pytest.raises(ValueError, match=r"\(BatchNorm2d\) has eps=0.0 .* Call model.eval\(\)"):
        guard_batch_norms(model)
    with pytest.raises(ValueError, match=r"has eps=0.0"):  # with Zennit's own attributor, the merge guards
        with Gradient(model, EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[MergeBatchNorms()])):
            pass
    with pytest.raises(ValueError, match=r"\(training mode\).*Call model.eval\(\)"):  # the pipeline: before merging
        run(model, (torch.randn(2, 3, 8, 8),), composite=EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[
            MergeBatchNorms()]))


# ---------------------------------------------------------------------------------------------------------------------
# square roots at zero distance
@pytest.fixture
def clamp_passes_gradient_at_the_bound(monkeypatch):
    """``clamp_min`` whose gradient passes where the input equals the bound (as in older PyTorch versions, and the
    kernel-dependent case of a distance that rounds to exactly 0): ``√`` then sees an infinite derivative."""
    monkeypatch.setattr(torch.Tensor, "clamp_min", lambda self, bound: torch.where(self >= bound, self, bound))


def test_safe_sqrt_gradient():
    o = torch.tensor([0.0, -1e-30, 1e-300, 2.0, 9.0], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(safe_sqrt(o), o, torch.ones_like(o))
    positive = o.detach()[2:].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(positive.sqrt(), positive, torch.ones_like(positive))
    assert torch.equal(gradient[:2], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(gradient[2:], expected, rtol=1e-15, atol=0)  # torch's elsewhere (to its rounding)
    # torch's own square root of max(o, 0) bit for bit (its vectorized kernels need not round like Python's, e.g. on
    # AVX-512 CPUs), and the known values to its rounding
    root = safe_sqrt(o.detach())
    assert torch.equal(root, torch.tensor([0.0, 0.0, 1e-300, 2.0, 9.0], dtype=torch.float64).sqrt())
    torch.testing.assert_close(root, torch.tensor([0.0, 0.0, 1e-150, 2.0 ** 0.5, 3.0], dtype=torch.float64),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("head", [lambda: KNNOutlier(1, sqrt=True, fused=True), lambda: KNNOutlier(2, sqrt=True)])
def test_knn_sqrt_head_at_zero_distance_gives_zero_relevance(clamp_passes_gradient_at_the_bound, head):
    """Images of the training set: every location's nearest neighbour is itself (distance 0): relevance 0, not NaN;
    a new image's heatmap is finite and its audit passes."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    images = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = DeepNeon(features.double(), head()).fit(images, progress=False)
    relevance = explain(model, images[:1])
    assert torch.isfinite(relevance).all()
    fresh = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    relevance, audit = explain(model, fresh, return_audit=True)
    assert torch.isfinite(relevance).all() and audit.ok, audit


# ---------------------------------------------------------------------------------------------------------------------
# on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_exact_by_default_even_with_tf32_switched_on():
    """With TF32 allowed process-wide (PyTorch's default for cuDNN), an explanation is still exact: the GPU heatmap is
    as close to the float64 one as the CPU's float32 heatmap is (TF32 is ~100 times further off); the fast policy
    stays within its stated error and audit; the switches come back."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    previous = cuda.matmul.fp32_precision, cudnn.conv.fp32_precision
    model = randomized(torchvision.models.resnet18(weights=None, num_classes=10)).float()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    composite = lambda: FastEpsilonGammaBox(low=LOW, high=HIGH, canonizers=[FastResNetCanonizer()])  # noqa: E731
    cpu = run(model, (x,), composite=composite()).relevance[0]
    truth = run(copy.deepcopy(model).double(), (x.double(),), composite=composite()).relevance[0]
    try:
        cuda.matmul.fp32_precision, cudnn.conv.fp32_precision = "tf32", "tf32"
        gpu_model = model.cuda()
        exact = run(gpu_model, (x.cuda(),), composite=composite()).relevance[0].cpu()
        assert (cuda.matmul.fp32_precision, cudnn.conv.fp32_precision) == ("tf32", "tf32")
        with Explainer(gpu_model, composite(), precision="fast") as explainer:
            _, fast = explainer(x.cuda(), lambda out: out)
            assert explainer.last_audit.ok, explainer.last_audit
    finally:
        cuda.matmul.fp32_precision, cudnn.conv.fp32_precision = previous
        model.cpu()
    scale = float(truth.abs().max())
    cpu_error, gpu_error = (float((heatmap.double() - truth).abs().max()) for heatmap in (cpu, exact))
    # float32 rounding on a ResNet-18 reaches ~2e-5 of the largest relevance on either device; TF32 gives ~3e-3
    assert gpu_error <= 4 * cpu_error + 1e-6 * scale, (gpu_error / scale, cpu_error / scale)
    assert float((exact - cpu).abs().max()) <= 1e-4 * scale
    assert float((fast.cpu() - cpu).abs().max()) <= 5e-2 * scale
