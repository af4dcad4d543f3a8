"""The one explanation step (``pipeline.run``): relevance at intermediate modules (``at``), a backward pass stopped at
a module (``stop_at``), and the audit on every entry point built on them."""

from __future__ import annotations

import pytest
import torch
from test_trust import _Root, _SkipNet, tiny_cnn  # _Root's NaN passes the graph canonizer: only the audit catches it
from torch import nn
from zennit.composites import LayerMapComposite

from neon_attrib import ConservationError, ConservationWarning, KDEOutlier, KMeansMembership, explain
from neon_attrib.anomaly import PatchCore
from neon_attrib.anomaly.resolution import layer_relevance
from neon_attrib.pipeline.engine import run
from neon_attrib.vision.deep import DeepNeon
from neon_attrib.vision.fast import FastEpsilon, FastPass


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def deep(images) -> DeepNeon:
    return DeepNeon(tiny_cnn(), KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)


def test_relevance_at_modules_leaves_the_explanation_unchanged(deep, images):
    plain = run(deep, (images,))
    staged = run(deep, (images,), at=("features", "head", "features.3"))
    assert plain.at == {} and set(staged.at) == {"features", "head", "features.3"}
    assert torch.equal(plain.relevance[0], staged.relevance[0]) and torch.equal(plain.score, staged.score)
    assert staged.at["features"].shape == (4, 8, 4, 4) and staged.at["features.3"].shape == (4, 8, 4, 4)
    # the sum pool hands each location its own score: the relevance reaching the head's output is the location score
    torch.testing.assert_close(staged.at["head"].reshape(4, 4, 4), deep.location_scores(images), rtol=1e-12, atol=0)
    # a ReLU hands its relevance on unchanged: the relevance at the last convolution's output is the feature map's
    assert torch.equal(staged.at["features.3"], staged.at["features"])


def test_stopping_at_a_module_audits_the_relevance_there(deep, images):
    full = run(deep, (images,), at=("features",))
    stopped = run(deep, (images,), stop_at="features")
    assert stopped.relevance == ()
    # the head's and the pool's rules do not depend on what is below the feature map
    assert torch.equal(stopped.at["features"], full.at["features"])
    assert stopped.audit.ok
    torch.testing.assert_close(stopped.audit.input_sum, stopped.at["features"].sum((1, 2, 3)), rtol=1e-12, atol=0)
    assert torch.equal(stopped.audit.score, full.audit.score)


class _Twice(nn.Module):
    """Calls one ReLU module twice, and holds a module it never calls."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_modules_that_cannot_be_read_are_refused(images):
    torch.manual_seed(0)
    model = DeepNeon(_Twice().double().eval(), KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
    with pytest.raises(ValueError, match="'features.nope' is not a module"):
        run(model, (images,), at=("features.nope",))
    with pytest.raises(ValueError, match="'features.relu' .*runs twice"):
        run(model, (images,), at=("features.relu",))
    with pytest.raises(ValueError, match="'features.unused' .*did not run"):
        run(model, (images,), stop_at="features.unused")
    skip = DeepNeon(_SkipNet().double().eval(), KDEOutlier(gamma=0.5), low=0.0, high=1.0).fit(images, progress=False)
    with pytest.raises(ValueError, match="around 'features.conv2' .*skip connection"):
        run(skip, (images,), stop_at="features.conv2")
    assert run(skip, (images,), stop_at="features.conv1").audit.ok  # every path passes through conv1


def test_deep_relevance_is_audited_like_explain(deep, images):
    _, audit = explain(deep, images, return_audit=True)
    staged = deep.relevance(images)
    for name in ("score", "input_sum", "input_mass", "dissipated", "unaccounted"):
        assert torch.equal(getattr(staged.audit, name), getattr(audit, name)), name
    broken = DeepNeon(nn.Sequential(tiny_cnn(), _Root()), KDEOutlier(gamma=0.5), low=0.0, high=1.0)
    broken.fit(images, progress=False)
    with pytest.warns(ConservationWarning, match="DeepNeon: the explanation is not finite"):
        staged = broken.relevance(images)
    assert not staged.audit.ok and not bool(torch.isfinite(staged.pixels).all())
    with pytest.raises(ConservationError, match="NaN or inf"):
        broken.relevance(images, strict=True)
    # stopped at the feature map, the NaN below it is not part of the explanation
    assert broken.relevance(images, to_pixels=False, strict=True).audit.ok


def test_kmeans_relevance_at_locations_is_the_targets(images):
    head = KMeansMembership(n_clusters=2, n_init=1, random_state=0)
    model = DeepNeon(tiny_cnn(), head, pool="positive", low=0.0, high=1.0).fit(images, progress=False)
    targets = torch.tensor([0, 1, 1, 0])
    staged = model.relevance(images, target=targets)
    assert torch.equal(staged.target, targets) and staged.audit.ok
    scores = model.location_scores(images)[torch.arange(4), targets].clamp_min(0)  # (n, h, w) of the target
    shares = scores / scores.sum((1, 2), keepdim=True) * model(images)[torch.arange(4), targets].reshape(4, 1, 1)
    torch.testing.assert_close(staged.locations, shares, rtol=1e-10, atol=1e-12)
    for to_pixels in (True, False):  # an empty batch: empty relevance at every stage, an empty audit that passes
        empty = model.relevance(images[:0], to_pixels=to_pixels)
        assert empty.features.shape == (0, 8, 4, 4) and empty.locations.shape == (0, 4, 4) and empty.audit.ok


def test_detector_relevance_and_layer_relevance_are_audited(images):
    network = nn.Sequential(tiny_cnn(), _Root())
    model = PatchCore(network, ["1"], coreset_ratio=1.0, seed=0).double().fit(images, progress=False)
    with pytest.warns(ConservationWarning, match="PatchCore: the explanation is not finite"):
        staged = model.relevance(images, "sum")
    assert not staged.audit.ok
    with pytest.raises(ConservationError, match="NaN or inf"):
        model.relevance(images, strict=True)
    assert model.relevance(images, to_pixels=False, strict=True).audit.ok
    with pytest.warns(ConservationWarning, match=r"layer_relevance\(PatchCore\): the explanation is not finite"):
        result = layer_relevance(model, images, "0")  # below the square root
    assert not result.audit.ok
    with pytest.raises(ConservationError):
        layer_relevance(model, images, "0", strict=True)
    good = PatchCore(tiny_cnn(), ["4"], coreset_ratio=1.0, seed=0).double().fit(images, progress=False)
    empty = good.relevance(images[:0])  # an empty batch: no backward pass (the fast rules once failed on it)
    assert empty.pixels.shape == (0, 3, 8, 8) and empty.locations.shape == (0, 4, 4) and empty.audit.ok
    result = layer_relevance(good, images, "2", "sum")
    assert result.audit.ok
    torch.testing.assert_close(result.audit.input_sum, result.relevance.sum((1, 2, 3)), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the audit's records against a naive float64 replica
class _Reused(nn.Module):
    """ε-rule linear layers: ``first``; ``pair`` on two rows per sample; ``shared`` called twice; ``last`` on each
    sample, or (``pooled``) on the whole batch as one row, so that none of its tensors is batched over the samples."""

    def __init__(self, batch: int, pooled: bool = False):
        super().__init__()
        torch.manual_seed(5)
        self.first, self.pair, self.shared = nn.Linear(4, 6), nn.Linear(2, 2), nn.Linear(6, 6)
        self.last = nn.Linear(6 * batch if pooled else 6, 3)
        self.relu, self.pooled = nn.ReLU(), pooled
        self.double()

    def forward(self, x):
        h = self.relu(self.first(x))
        h = self.relu(self.pair(h.reshape(-1, 2))).reshape(h.shape)
        h = self.relu(self.shared(self.relu(self.shared(h))))
        return self.last(h.reshape(1, -1) if self.pooled else h)


def _epsilon_replica(model: _Reused, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The ε rule by hand: (seed, input relevance, {module: [(R_out, R_in) per call]})."""
    def epsilon(layer, a, relevance):
        z = a @ layer.weight.T + layer.bias
        return a * ((relevance / (z + eps * torch.where(z >= 0, 1.0, -1.0))) @ layer.weight)

    a1 = torch.relu(model.first(x))
    pairs = a1.reshape(-1, 2)
    a2 = torch.relu(model.pair(pairs)).reshape(a1.shape)
    a3 = torch.relu(model.shared(a2))
    a4 = torch.relu(model.shared(a3))
    top = a4.reshape(1, -1) if model.pooled else a4
    output = model.last(top)
    seed = output * nn.functional.one_hot(output.argmax(1), 3)
    calls: dict[str, list] = {}
    r4 = epsilon(model.last, top, seed)
    calls["last"] = [(seed, r4)]
    r3 = epsilon(model.shared, a3, r4.reshape(a4.shape))
    r2 = epsilon(model.shared, a2, r3)
    calls["shared"] = [(r4, r3), (r3, r2)]
    r1 = epsilon(model.pair, pairs, r2.reshape(pairs.shape))
    calls["pair"] = [(r2, r1)]
    r0 = epsilon(model.first, x, r1.reshape(a1.shape))
    calls["first"] = [(r1, r0)]
    return seed, r0, calls


@pytest.mark.parametrize("pooled", [False, True])
def test_audit_equals_a_naive_replica_of_conservation(pooled):
    n, eps = 3, 0.25
    model = _Reused(n, pooled).eval()
    x = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    composite = LayerMapComposite([(nn.ReLU, FastPass()), (nn.Linear, FastEpsilon(epsilon=eps))])
    result = run(model, (x,), composite=composite)
    with torch.no_grad():
        seed, relevance, calls = _epsilon_replica(model, x, eps)
    torch.testing.assert_close(result.relevance[0], relevance, rtol=1e-12, atol=1e-15)

    def sums(tensor, absolute=False):  # per sample, or (pooled: nothing is batched over the samples) in total
        tensor = tensor.abs() if absolute else tensor
        return tensor.sum().reshape(1) if pooled else tensor.reshape(n, -1).sum(1)

    audit = result.audit
    expected = {name: sum(sums(out) - sums(inp) for out, inp in records) for name, records in calls.items()}
    assert list(audit.per_module) == ["last", "shared", "pair", "first"]  # in the order of the backward pass
    for name, value in expected.items():
        torch.testing.assert_close(audit.per_module[name], value, rtol=1e-12, atol=1e-15, msg=name)
    dissipated = sum(expected.values())
    for name, value in {"score": sums(seed), "input_sum": sums(relevance), "input_mass": sums(relevance, True),
                        "dissipated": dissipated, "unaccounted": sums(seed) - dissipated - sums(relevance)}.items():
        torch.testing.assert_close(getattr(audit, name), value, rtol=1e-12, atol=1e-14, msg=name)
    assert audit.score.shape == ((1,) if pooled else (n,)) and audit.ok
    assert bool((audit.dissipated.abs() > 1e-3).all())  # ε absorbs: the records are not trivially zero


def test_audit_sums_a_relevance_handed_on_unchanged_once(monkeypatch):
    """A ReLU hands the relevance tensor of the layer above to the layer below unchanged: the audit sums it once, and
    its records are those of summing every tensor (each module's dissipation and the totals, bit for bit)."""
    from neon_attrib.pipeline import audit as audit_module
    from neon_attrib.vision.fast import FastEpsilonGammaBox, LRPExplainer

    torch.manual_seed(24)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 6, 3, padding=1),
                          nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(25))
    calls = []
    row_sums = audit_module._row_sums
    monkeypatch.setattr(audit_module, "_row_sums", lambda tensor, n: calls.append(1) or row_sums(tensor, n))
    with LRPExplainer(model, FastEpsilonGammaBox(low=-3.0, high=3.0)) as explainer:
        explainer(x, lambda out: out)
        assert len(calls) == 4  # the relevance below each ReLU is summed once, not as two modules' records
        shared, calls[:] = explainer.last_audit, []
        monkeypatch.setattr(audit_module._AuditRecorder, "_last", None, raising=False)
        monkeypatch.setattr(audit_module._AuditRecorder, "__setattr__", lambda self, name, value: object.__setattr__(
            self, name, None if name == "_last" else value))
        explainer(x, lambda out: out)
        every = explainer.last_audit
    assert len(calls) == 6  # three convolutions, two sums each, when nothing is shared
    assert shared.per_module.keys() == every.per_module.keys()
    for name in every.per_module:
        assert torch.equal(shared.per_module[name], every.per_module[name])
    assert torch.equal(shared.dissipated, every.dissipated) and torch.equal(shared.unaccounted, every.unaccounted)


def test_non_finite_inputs_raise_inside_explanations_too():
    """Inside an explanation a model's finiteness check is read back with the rules' conditions (no host read of its
    own); a non-finite input still raises the same error, from the retake that checks on the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from neon_attrib.pipeline.engine import Explainer, resolve_composite

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            type(self).count += func._schema.name == "aten::_local_scalar_dense"
            return func(*args, **(kwargs or {}))

    torch.manual_seed(27)
    model = KDEOutlier(gamma=0.5).fit(torch.randn(20, 3))
    bad = torch.randn(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or infinity"):
        explain(model, bad)
    with Explainer(model, resolve_composite(model), audit=False) as explainer:
        with pytest.raises(ValueError, match="contains NaN or infinity"):
            explainer(bad)
        explainer(torch.randn(4, 3))
        with Reads():
            explainer(torch.randn(4, 3))
    assert Reads.count == 0  # no scalar read of its own: read back with the other conditions (one transfer)
