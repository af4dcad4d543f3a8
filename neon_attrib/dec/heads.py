"""Attributable DEC heads: explain cluster membership and the surrogate's class evidence in pixels with LRP.

**Membership** (:class:`DECHead`). DEC assigns ``argmax_k q_k = argmin_k |z - mu_k|`` (the Student-t kernel is
decreasing in the distance), so the k-means neuralization on the embedding is exactly DEC's decision::

    x --classifier up to layer j--> a --DEC encoder--> e --SphereNorm--> z --ClusterDifference--> h --MinPool--> f

``f_c(x) = min_{k != c} |z - mu_k|^2 - |z - mu_c|^2`` is positive exactly for the assigned cluster, so
``argmax_c f_c = DEC.predict``. :class:`DECHeadComposite` puts these rules on it:

* ``ClusterDifference + MinPool`` (as one :class:`DECMembership` module): :class:`SphereMembershipRule`. The
  soft-min weights ``p = softmin_beta(h_c)`` split ``R_c`` over the competitors ``k`` (exact), and each
  ``h_k = w_k^T z + b_k`` is split over the embedding coordinates as ``z_i w_ki + b_k z_i^2 / |z|^2`` (exact, since
  the ``z_i^2 / |z|^2`` sum to one): the embedding relevance sums to ``f_c`` **exactly**. The k-means activation rule
  (``R_i = z_i sum_k p_k w_ki R_c / f_c``, :class:`~neon_attrib.core.rules.KMeansActivationRule`) is available with
  ``membership_rule="dot"``; it dissipates ``sum_k p_k (b_k + f_c - h_k)``, which near a border is large compared
  to ``f_c``. The embedding is signed, so ``z_i < 0`` can carry relevance.
* ``SphereNorm`` (``z = r e / |e|``) and ``FeatureScale`` (``x / s``): pass-through. Both multiply each coordinate
  by a positive factor (one per sample, resp. per feature), so the contributions ``z_i w_ki`` are the contributions
  of ``e_i`` with the factor held fixed; this is the LRP treatment of normalisation layers ("LN-rule", Ali et al.,
  2022) and conserves exactly. The assignment itself does not depend on the factor's gradient.
* everything else (the DEC encoder's convolutions and linear layers, the classifier's layers): a Zennit composite,
  ``EpsilonPlusFlat`` by default (Flat on the first linear layer, z+ on convolutions, epsilon on dense layers, Norm on
  sums and average pooling, pass-through on activations). These conserve up to biases and epsilon.

**Class evidence** (:class:`SurrogateClassHead`). The surrogate ``s_y = sum_j w_j sum_k P_j[k, y] q^j_k / sum_j w_j``
is computed exactly. Its :class:`ClassEvidenceRule` splits ``s_y`` exactly over (layer, cluster) pairs, keeps for
each layer the share of its assigned cluster ``c*`` (``w_j P_j[c*, y] q^j_{c*} / sum w``; the rest, small because
``alpha = 100`` makes ``q`` sparse, is dissipated) and sends it through the membership rule of ``c*`` above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from zennit.composites import EpsilonPlusFlat
from zennit.core import Composite
from zennit.rules import Pass

from ..core.composites import NeonComposite, register_rule
from ..core.functional import student_t_logits
from ..core.layers import ClusterDifference, MinPool
from ..core.rules import BetaHook, KMeansActivationRule
from .model import DEC, FeatureScale, SphereNorm

__all__ = ["TruncatedModel", "DECMembership", "SphereMembershipRule", "DECHead", "ClassEvidence", "ClassEvidenceRule",
           "SurrogateClassHead", "DECHeadComposite"]


class _StopForward(Exception):
    pass


class TruncatedModel(nn.Module):
    """The part of ``model`` from its input to the output of the named submodules, as a module.

    Runs ``model`` and stops (by an exception caught here) as soon as all ``layers`` have produced their output, so
    nothing after them is computed; the autograd graph from the input to those outputs is the model's own, so
    gradients and LRP rules on the model's modules apply unchanged. Works for any model whose named layers run once
    per forward pass. The model is shared, not copied; it runs in eval mode (the mode DEC's activations were captured
    in) and every module's mode is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier.
    layers : str or sequence of str
        One name (``forward`` returns a tensor) or several (``forward`` returns a list, in the given order).
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str]):
        super().__init__()
        self.single = isinstance(layers, str)
        names = [layers] if self.single else list(layers)
        modules = dict(model.named_modules())
        for name in names:
            if not isinstance(name, str) or name == "" or name not in modules:
                raise ValueError(f"Unknown layer name {name!r} for TruncatedModel: the model has no such submodule.")
        self.model = model
        self.layers = names

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(module, inputs, output):
                store[name] = output
                if len(store) == len(self.layers):
                    raise _StopForward
            return hook

        handles = [self.model.get_submodule(name).register_forward_hook(make_hook(name)) for name in self.layers]
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()  # the activations DEC was fitted on are the classifier's in eval mode
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes:
                module.training = training
        missing = [name for name in self.layers if name not in store]
        if missing:
            raise RuntimeError(f"TruncatedModel: layer(s) {missing} did not run in the model's forward pass.")
        return store[self.layers[0]] if self.single else [store[name] for name in self.layers]

    def extra_repr(self) -> str:
        return f"layers={self.layers}"


def _finite(x: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """``x``, or a ValueError naming the head when it holds NaN or inf (its assignment and relevance would be NaN)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{type(head).__name__}: x contains NaN or infinity ({int((~torch.isfinite(x)).sum())} "
                         f"value(s)); the cluster assignment and the relevance would be NaN.")
    return x


def _own_device_eval(head: nn.Module, device: torch.device) -> nn.Module:
    """Move the head's own modules to ``device`` and set them to eval mode; the classifier it shares
    (``head.features``) keeps its device and mode."""
    shared = {id(module) for module in head.features.modules()}
    for module in head.children():
        if id(module) not in shared:
            module.to(device)
    for module in head.modules():
        if id(module) not in shared:
            module.training = False
    return head


class DECMembership(nn.Module):
    """k-means membership evidence on DEC embeddings: ``f_c(z) = min_{k != c} |z - mu_k|^2 - |z - mu_c|^2``.

    A :class:`~neon_attrib.core.layers.ClusterDifference` (buffers) followed by a
    :class:`~neon_attrib.core.layers.MinPool`;
    output ``(n, K)``.

    Parameters
    ----------
    centroids : torch.Tensor
        DEC centroids ``(K, d)``.
    beta : float
        Soft-min sharpness of the explanation (stored on the pool).
    """

    def __init__(self, centroids: torch.Tensor, beta: float = 1.0):
        super().__init__()
        self.difference = ClusterDifference(torch.as_tensor(centroids).detach())
        self.pool = MinPool(beta=beta)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.pool(self.difference(z))


def _membership_relevance(z: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                          beta: torch.Tensor | float, eps: float = 1e-9) -> torch.Tensor:
    """Sphere rule for one cluster ``c`` per row: ``R_i = sum_k p_k R (z_i w_ki + b_k z_i^2/|z|^2) / h_k``.

    ``z`` (..., d), competitors' ``h`` (..., M) (``inf`` marks an excluded entry), ``w`` (..., M, d), ``b`` (..., M),
    ``scale`` = the relevance ``R`` of the cluster (...). Since ``sum_i z_i^2/|z|^2 = 1``, each ``h_k`` is decomposed
    exactly over the coordinates, and the soft-min weights ``p`` sum to one, so ``sum_i R_i = R``.
    """
    p = torch.softmax(-torch.as_tensor(beta, dtype=z.dtype, device=z.device).unsqueeze(-1) * h, dim=-1)
    finite = torch.isfinite(h)
    h_safe = torch.where(finite, h, torch.ones_like(h))
    h_safe = h_safe + eps * torch.where(h_safe >= 0, 1.0, -1.0).to(h.dtype)
    coef = torch.where(finite, p / h_safe, torch.zeros_like(p)) * scale.unsqueeze(-1)  # (..., M)
    share = z.pow(2) / z.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)  # (..., d)
    linear = z * torch.einsum("...m,...md->...d", coef, w)
    bias = share * (coef * torch.where(finite, b, torch.zeros_like(b))).sum(-1, keepdim=True)
    return linear + bias


class SphereMembershipRule(BetaHook):
    """Exactly conservative rule for :class:`DECMembership`: the k-means evidence decomposed on the embedding.

    For cluster ``c`` with relevance ``R_c``: ``p = softmin_beta(h_c)`` over the competitors ``k`` and
    ``R_i = sum_k p_k R_c (z_i w_ki + b_k z_i^2 / |z|^2) / h_k``. Each ``h_k = w_k^T z + b_k`` is split over the
    coordinates without remainder (the bias in proportion to ``z_i^2``, which sums to one after dividing by ``|z|^2``;
    on DEC's sphere ``|z|^2 = r^2`` is a constant), so ``sum_i R_i = R_c`` exactly. For the assigned cluster every
    ``h_k >= f_c > 0``, so the division is safe; for other targets a sign-matched ``1e-9`` stabilises it.
    Compare the k-means activation rule (:class:`~neon_attrib.core.rules.KMeansActivationRule`), which dissipates the
    bias
    share.

    Parameters
    ----------
    beta : float, optional
        Soft-min sharpness; ``None`` uses the module's ``pool.beta``.

    Examples
    --------
    >>> SphereMembershipRule(beta=2.0).copy().beta
    2.0
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.pool.beta
        diff = module.difference
        h = diff(x)  # (n, K, K-1)
        n, k = relevance_out.shape
        zz = x.unsqueeze(1).expand(n, k, x.shape[1])
        return _membership_relevance(zz, h, diff.weight.unsqueeze(0).expand(n, -1, -1, -1),
                                     diff.bias.unsqueeze(0).expand(n, -1, -1), relevance_out, beta).sum(1)


def _default_beta(dec: DEC, beta: float | None) -> float:
    if beta is not None:
        if not beta > 0:
            raise ValueError(f"The 'beta' parameter must be a float > 0. Got {beta!r} instead.")
        return float(beta)
    mean = getattr(dec, "mean_evidence_", None)
    return 1.0 / mean if mean else 1.0


class DECHead(nn.Module):
    """Attributable DEC assignment: ``features -> DEC encoder -> DECMembership``, output ``(n, n_clusters)``.

    ``argmax`` of the output equals :meth:`DEC.predict` on ``features(x)``; ``neon_attrib.explain(head, x)`` explains
    the assigned cluster (``target`` picks another) with :class:`DECHeadComposite`.

    Parameters
    ----------
    encoder : torch.nn.Module
        The fitted DEC encoder (``DEC.encoder_``), shared.
    centroids : torch.Tensor
        ``DEC.cluster_centers_``.
    features : torch.nn.Module, optional
        From the input to the clustered activations (e.g. :class:`TruncatedModel`); identity by default.
    beta : float
        Soft-min sharpness of the membership rule.

    Examples
    --------
    >>> import neon_attrib
    >>> X = torch.randn(100, 6)
    >>> dec = DEC(n_clusters=3, embedding_dim=4, hidden_dims=(16,), pretrain_steps=300, max_iter=10, random_state=0,
    ...           progress=False).fit(X)
    >>> head = DECHead.from_dec(dec)
    >>> bool((head(X).argmax(1) == dec.predict(X)).all())
    True
    >>> neon_attrib.explain(head, X[:4]).shape
    torch.Size([4, 6])
    """

    def __init__(self, encoder: nn.Module, centroids: torch.Tensor, features: nn.Module | None = None,
                 beta: float = 1.0):
        super().__init__()
        self.features = features if features is not None else nn.Identity()
        self.encoder = encoder
        self.membership = DECMembership(centroids, beta=beta)

    @classmethod
    def from_dec(cls, dec: DEC, features: nn.Module | None = None, beta: float | None = None) -> DECHead:
        """Build the head of a fitted :class:`DEC` (``beta`` defaults to ``1 / dec.mean_evidence_``)."""
        dec._check_fitted()
        head = cls(dec.encoder_, dec.cluster_centers_, features=features, beta=_default_beta(dec, beta))
        return _own_device_eval(head, next(dec.encoder_.parameters()).device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The DEC embedding ``z`` of ``x``."""
        return self.encoder(self.features(_finite(x, self)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.membership(self.embed(x))

    def default_target(self, output: torch.Tensor) -> torch.Tensor:
        """The assigned cluster (used by :func:`neon_attrib.explain` when no target is given)."""
        return output.argmax(dim=1)

    def neon_composite(self, beta: float | None = None, eps: float | None = None,
                       base: Composite | None = None) -> DECHeadComposite:
        """The composite every explanation of this head uses (``base``: rules for the classifier and the encoder,
        default ``EpsilonPlusFlat``; ``eps`` is unused)."""
        return DECHeadComposite(beta=beta, base=base)


class ClassEvidence(nn.Module):
    """The surrogate's class probabilities from the stacked embeddings of all layers.

    ``s_y(z) = sum_j w_j sum_k P_j[k, y] q_k(z^j) / sum_j w_j`` with the Student-t ``q`` of DEC.

    Parameters
    ----------
    centroids : torch.Tensor
        ``(L, K, d)`` centroids of the ``L`` layers.
    posteriors : torch.Tensor
        ``(L, K, C)`` class posteriors ``p(y | z^j = k)``.
    weights : torch.Tensor
        ``(L,)`` layer weights (normalised to sum to one here).
    alpha : float
        Student-t degrees of freedom.
    beta : torch.Tensor
        ``(L,)`` soft-min sharpness of the membership rule per layer.
    """

    centroids: torch.Tensor
    posteriors: torch.Tensor
    weights: torch.Tensor
    beta: torch.Tensor

    def __init__(self, centroids: torch.Tensor, posteriors: torch.Tensor, weights: torch.Tensor, alpha: float,
                 beta: torch.Tensor):
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("centroids", torch.as_tensor(centroids, dtype=torch.float32).clone())
        self.register_buffer("posteriors", torch.as_tensor(posteriors, dtype=torch.float32).clone())
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("beta", torch.as_tensor(beta, dtype=torch.float32).clone())
        self.alpha = float(alpha)

    def assignments(self, z: torch.Tensor) -> torch.Tensor:
        """``q`` per layer, ``(n, L, K)``."""
        dist2 = (z.unsqueeze(2) - self.centroids.unsqueeze(0)).pow(2).sum(-1)
        return torch.softmax(student_t_logits(dist2, self.alpha), dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = self.assignments(z)
        return torch.einsum("l,nlk,lkc->nc", self.weights.to(z.dtype), q, self.posteriors.to(z.dtype))


class ClassEvidenceRule(BetaHook):
    """LRP rule of :class:`ClassEvidence`: the assigned cluster's share of every layer, through its membership rule.

    For output relevance ``R_y`` and each layer ``j`` with assigned cluster ``c`` (``argmax_k q^j_k``), the share
    ``R_j = sum_y R_y w_j P_j[c, y] q^j_c / s_y`` (exact: the mixture is a sum over layers and clusters) goes to the
    embedding by the membership rule of :class:`SphereMembershipRule` for ``c`` (exactly conservative). Dissipated:
    only the share of the non-assigned clusters, ``sum_j w_j sum_{k != c} P_j[k, y] q^j_k``.

    Parameters
    ----------
    beta : float, optional
        Soft-min sharpness for every layer; ``None`` uses the module's per-layer ``beta``.

    Examples
    --------
    >>> ClassEvidenceRule(beta=3.0).copy().beta
    3.0
    """

    def relevance(self, module, x, out, relevance_out):
        return _class_evidence_relevance(module, x, out, relevance_out, self.beta)


def _class_evidence_relevance(module: ClassEvidence, z: torch.Tensor, s: torch.Tensor, r_out: torch.Tensor,
                              beta: float | None = None) -> torch.Tensor:
    q = module.assignments(z)  # (n, L, K)
    assigned = q.argmax(dim=-1)  # (n, L)
    q_c = q.gather(-1, assigned.unsqueeze(-1)).squeeze(-1)  # (n, L)
    n_layers = z.shape[1]
    layer_idx = torch.arange(n_layers, device=z.device)
    post_c = module.posteriors[layer_idx.unsqueeze(0), assigned]  # (n, L, C)
    ratio = torch.where(s != 0, r_out / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))
    share = module.weights.view(1, -1).to(z.dtype) * q_c * torch.einsum("nlc,nc->nl", post_c.to(z.dtype), ratio)
    mu = module.centroids  # (L, K, d)
    mu_c = mu[layer_idx.unsqueeze(0), assigned]  # (n, L, d)
    w = 2.0 * (mu_c.unsqueeze(2) - mu.unsqueeze(0))  # (n, L, K, d); the k = c entry is zero
    sq = mu.pow(2).sum(-1)  # (L, K)
    b = sq.unsqueeze(0) - sq[layer_idx.unsqueeze(0), assigned].unsqueeze(-1)  # (n, L, K)
    h = torch.einsum("nlkd,nld->nlk", w, z) + b
    self_mask = torch.nn.functional.one_hot(assigned, mu.shape[1]).bool()
    h_others = h.masked_fill(self_mask, float("inf"))
    betas = module.beta.to(z.dtype) if beta is None else torch.full_like(module.beta, beta, dtype=z.dtype)
    return _membership_relevance(z, h_others, w, b, share, betas.view(1, -1).expand_as(share))


class SurrogateClassHead(nn.Module):
    """Attributable full surrogate: ``classifier up to the layers -> DEC encoders -> ClassEvidence``, ``(n, C)``.

    The output equals :meth:`ActivationClusteringSurrogate.predict_proba` (for the weights it was built with).
    """

    def __init__(self, features: nn.Module, encoders: Sequence[nn.Module], evidence: ClassEvidence):
        super().__init__()
        self.features = features
        self.encoders = nn.ModuleList(encoders)
        self.evidence = evidence

    @classmethod
    def from_surrogate(cls, surrogate, weights=None, beta: float | None = None) -> SurrogateClassHead:
        """Build the head of a fitted :class:`~neon_attrib.dec.ActivationClusteringSurrogate`."""
        layers = surrogate.layers
        decs = [surrogate.decs_[layer] for layer in layers]
        w = surrogate.layer_weights(weights)
        evidence = ClassEvidence(
            centroids=torch.stack([dec.cluster_centers_ for dec in decs]),
            posteriors=torch.stack([surrogate.class_posteriors_[layer] for layer in layers]),
            weights=w.float(),
            alpha=decs[0].alpha,
            beta=torch.tensor([_default_beta(dec, beta) for dec in decs]),
        )
        head = cls(TruncatedModel(surrogate.model, list(layers)), [dec.encoder_ for dec in decs], evidence)
        return _own_device_eval(head, next(decs[0].encoder_.parameters()).device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked embeddings ``(n, L, d)``."""
        return torch.stack([enc(a) for enc, a in zip(self.encoders, self.features(_finite(x, self)))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.evidence(self.embed(x))

    def default_target(self, output: torch.Tensor) -> torch.Tensor:
        """The surrogate's predicted class."""
        return output.argmax(dim=1)

    def neon_composite(self, beta: float | None = None, eps: float | None = None,
                       base: Composite | None = None) -> DECHeadComposite:
        return DECHeadComposite(beta=beta, base=base)


class DECHeadComposite(NeonComposite):
    """Rules for :class:`DECHead` and :class:`SurrogateClassHead` (see the module docstring for what is exact).

    A :class:`~neon_attrib.core.composites.NeonComposite` whose base defaults to ``EpsilonPlusFlat``: the DEC modules
    get
    their registered rules (:class:`SphereMembershipRule`, :class:`ClassEvidenceRule`, pass-through on the
    normalisations) in every NeonComposite, so ``NeonComposite(base=EpsilonPlusFlat())`` explains a DEC head too.

    Parameters
    ----------
    beta : float, optional
        Soft-min sharpness of the membership rule (``None``: the head's own, ``1 / mean training evidence``).
    base : zennit.core.Composite, optional
        Composite for the classifier and the encoder layers; ``EpsilonPlusFlat()`` by default. Use e.g.
        ``EpsilonGammaBox(low, high)`` for normalised pixel input.
    canonizers : list, optional
        Extra Zennit canonizers (e.g. to merge batch norms).
    membership_rule : {"sphere", "dot"}
        ``"sphere"`` (default): :class:`SphereMembershipRule`, exactly conservative on the embedding. ``"dot"``: the
        k-means activation rule (:class:`~neon_attrib.core.rules.KMeansActivationRule`), which dissipates the bias
        share.
    """

    def __init__(self, beta: float | None = None, base: Composite | None = None, canonizers: list | None = None,
                 membership_rule: str = "sphere"):
        if membership_rule not in ("sphere", "dot"):
            raise ValueError(f"The 'membership_rule' parameter of DECHeadComposite must be 'sphere' or 'dot'. "
                             f"Got {membership_rule!r} instead.")
        self.membership_rule = membership_rule
        layer_map = [(DECMembership, KMeansActivationRule(beta=beta))] if membership_rule == "dot" else []
        super().__init__(beta=beta, base=EpsilonPlusFlat() if base is None else base, layer_map=layer_map,
                         canonizers=canonizers)


register_rule(DECMembership, lambda beta, eps: SphereMembershipRule(beta=beta), mode="any", covers_children=True)
register_rule(ClassEvidence, lambda beta, eps: ClassEvidenceRule(beta=beta), mode="any", covers_children=True)
register_rule((SphereNorm, FeatureScale), lambda beta, eps: Pass(), mode="any")
