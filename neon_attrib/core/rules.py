"""Zennit rules for the neuralized layers.

A Zennit rule is a :class:`zennit.core.Hook`: during the forward pass it stores what it needs, and during the backward
pass it replaces the gradient with *relevance*: ``backward(module, grad_input, grad_output)`` receives the relevance of
the module's output in ``grad_output`` and returns the relevance of its (first) input. Every rule here is linear in the
upper relevance, so it composes with any Zennit rule above or below it.

Two families:

* **Input-space rules**, one per layer, for raw feature vectors:
  :class:`SoftArgminRule`, :class:`SquaredDifferenceRule`, :class:`ProportionalRule`, :class:`CosineShareRule`,
  :class:`WeightShareRule`.
* **Activation rules** for heads on CNN activations ``a >= 0``: a neuron with
  ``a_i = 0`` never receives relevance, the share of the score that cannot be expressed through active neurons is
  *dissipated*. They sit on the whole neuralized model (:class:`~neon_attrib.models.KDEOutlier` etc.), because their
  closed forms skip the N-sized intermediate layer entirely: :class:`KDEOutlierActivationRule`,
  :class:`KDEInlierActivationRule`, :class:`KMeansActivationRule`.

Hyperparameters given to a rule override the defaults that the layers carry (``None`` = use the layer's); every rule
keeps them through :meth:`copy`, which Zennit calls once per module.
"""

from __future__ import annotations

import math

import torch
from zennit.core import Hook

from .functional import (
    DEFAULT_CHUNK,
    cosine_activation_coefficients,
    k_nearest,
    precision_product,
    safe_divide,
    soft_argmin,
    soft_min_pass,
    squared_distance,
    squared_mahalanobis,
)

__all__ = [
    "NeonHook",
    "BetaHook",
    "SoftArgminRule",
    "SquaredDifferenceRule",
    "ProportionalRule",
    "CosineShareRule",
    "WeightShareRule",
    "KDEOutlierActivationRule",
    "KDEInlierActivationRule",
    "KMeansActivationRule",
    "LocationPoolRule",
    "LeaveOneOutKDEOutlierRule",
    "LeaveOneOutKDEInlierRule",
    "KMinPoolRule",
    "PassThroughRule",
    "MahalanobisRule",
    "WeightedSoftArgminRule",
    "PositionalMahalanobisRule",
    "KNNOutlierActivationRule",
    "WeightedKDEOutlierActivationRule",
    "GaussianActivationRule",
    "PositionalMahalanobisActivationRule",
]

# Above this many elements (batch × support × features) the squared-difference rule switches from the direct
# (x_i − u_ik)² sum to the matrix-product expansion, which never builds the (n, N, d) tensor.
_DIRECT_LIMIT = 1 << 22


class NeonHook(Hook):
    """Base class of every NEON rule: subclass it and implement :meth:`relevance` (and :meth:`_hyperparameters`).

    A :class:`zennit.core.Hook` that stores the module's detached input and output in the forward pass and, in the
    backward pass, replaces the gradient of the module's first input by ``relevance(module, x, out, R)``, where ``R``
    is the relevance of the output. :meth:`copy` rebuilds the rule from :meth:`_hyperparameters` (Zennit copies a
    rule once per module, and ``Hook.copy`` would drop constructor arguments).

    The module's positional arguments must be tensors, and the first one is the one explained; keyword arguments are
    free. A call that breaks this while a gradient is needed raises a ``TypeError`` / ``ValueError`` before the forward
    pass, with Zennit 0.5 and 1.0 alike (the two versions would otherwise fail or route the relevance differently).

    Examples
    --------
    >>> class HalfRule(NeonHook):  # gives each input half of the output's relevance (for a 2-input sum)
    ...     def relevance(self, module, x, out, relevance_out):
    ...         return relevance_out.unsqueeze(-1).expand_as(x) / 2
    >>> HalfRule().copy()
    HalfRule()
    """

    def pre_forward(self, module, args, *maybe_kwargs):
        # (module, args) on Zennit 0.5, (module, args, kwargs) on Zennit 1.0, which reads the signature to decide
        if torch.is_grad_enabled():
            _check_first_input(self, module, args)
        return super().pre_forward(module, args, *maybe_kwargs)

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input[0].detach()
        self.stored_tensors["output"] = output.detach()

    def backward(self, module, grad_input, grad_output):
        relevance = self.relevance(
            module, self.stored_tensors["input"], self.stored_tensors["output"], grad_output[0].detach()
        )
        return (relevance.to(grad_input[0].dtype),) + (None,) * (len(grad_input) - 1)

    def relevance(self, module, x: torch.Tensor, out: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
        """Input relevance from the module, its input ``x``, its output ``out`` and the output relevance."""
        raise NotImplementedError

    def copy(self):
        return self.__class__(**self._hyperparameters())

    def _hyperparameters(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._hyperparameters().items())
        return f"{type(self).__name__}({args})"


def _check_first_input(hook: Hook, module: torch.nn.Module, args: tuple) -> None:
    """Refuse a call whose relevance would have nowhere to go, or go to different places on different Zennit versions.

    The rule gives the relevance to the first positional argument. When that one needs no gradient but another one
    does, Zennit 0.5 leaves the module to its plain gradient while Zennit 1.0 runs the rule and the other inputs get
    nothing; a positional argument that is not a tensor breaks Zennit's hook (0.5 in the forward pass, 1.0 in the
    backward pass). Both are errors here, raised before Zennit's part of the hook runs, the same on either version.
    """
    if not any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args):
        return  # no gradient through this module: the rule does not run
    name = f"{type(hook).__name__} on {type(module).__name__}"
    if not all(isinstance(arg, torch.Tensor) for arg in args):
        kinds = ", ".join(type(arg).__name__ for arg in args)
        raise TypeError(f"{name}: the positional arguments of the module must be tensors (the first one receives the "
                        f"relevance); pass other arguments by keyword. Got ({kinds}).")
    if not args[0].requires_grad:
        raise ValueError(f"{name}: the rule gives the relevance to the module's first input, which does not require a "
                         f"gradient here while another input does. Make the explained tensor the first argument.")


class BetaHook(NeonHook):
    """Base class of the rules with a soft-min sharpness ``beta`` (None: the module's default): subclass it for a rule
    of your own that takes ``beta`` (it validates it, and :meth:`copy` keeps it).

    Parameters
    ----------
    beta : float, optional
        A finite float > 0, or None.

    Examples
    --------
    >>> class SharpRule(BetaHook):
    ...     def relevance(self, module, x, out, relevance_out):
    ...         return relevance_out
    >>> SharpRule(beta=2.0).copy()
    SharpRule(beta=2.0)
    """

    def __init__(self, beta: float | None = None):
        super().__init__()
        if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"The 'beta' parameter of {type(self).__name__} must be a finite float > 0. "
                             f"Got {beta!r}.")
        self.beta = beta

    def _hyperparameters(self) -> dict:
        return {"beta": self.beta}


class _EpsHook(NeonHook):
    """A rule with a stabiliser ``eps`` (None: the module's default)."""

    def __init__(self, eps: float | None = None):
        super().__init__()
        if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"The 'eps' parameter of {type(self).__name__} must be a float >= 0. Got {eps!r}.")
        self.eps = eps

    def _hyperparameters(self) -> dict:
        return {"eps": self.eps}


class SoftArgminRule(BetaHook):
    """Soft-argmin redistribution on :class:`~neon_attrib.core.layers.LogMeanExpPool` and
    :class:`~neon_attrib.core.layers.MinPool`: ``R_k = exp(−β h_k) / Σ_k' exp(−β h_k') · R``.

    Conserves exactly. For a log-mean-exp with α > 0 (soft max) the weights are ``softmax(+β h)``.

    Parameters
    ----------
    beta : float, optional
        Sharpness. ``None`` uses the layer's default: ``|α|`` for log-mean-exp (β = γ), and for min pooling the value
        :class:`~neon_attrib.models.KMeansMembership` sets at ``fit`` (1 / mean training evidence).

    Examples
    --------
    >>> SoftArgminRule(beta=3.0).copy().beta
    3.0
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else getattr(module, "beta", None)
        alpha = getattr(module, "alpha", -1.0)
        if beta is None:
            beta = abs(alpha)
        weights = soft_argmin(x, beta) if alpha < 0 else torch.softmax(beta * x, dim=-1)
        return weights * relevance_out.unsqueeze(-1)


class SquaredDifferenceRule(_EpsHook):
    """Squared-difference rule on :class:`~neon_attrib.core.layers.SquaredDistance`:
    ``R_i = Σ_k (x_i − u_ik)² / (ε + ‖x − u_k‖²) · R_k``.

    Conserves ``Σ_i R_i = Σ_k R_k · h_k / (ε + h_k)``: exactly for ε = 0, and the share of support points closer than
    ~√ε is dissipated otherwise.

    Parameters
    ----------
    eps : float, optional
        Stabiliser >= 0. ``None`` uses the layer's default (``0.01 / γ``, see :class:`~neon_attrib.models.KDEOutlier`).
    """

    def relevance(self, module, x, out, relevance_out):
        eps = self.eps if self.eps is not None else module.eps
        coef = safe_divide(relevance_out, eps + out)  # (n, N)
        support = module.support
        n, n_support = coef.shape
        if n * n_support * x.shape[1] <= _DIRECT_LIMIT:
            return torch.einsum("nk,nkd->nd", coef, (x.unsqueeze(1) - support.unsqueeze(0)) ** 2)
        # Σ_k c_k (x_i − u_ik)² = x_i² Σ_k c_k − 2 x_i Σ_k c_k u_ik + Σ_k c_k u_ik²: matrix products, chunked over k,
        # around the support's centre (the differences are translation invariant; the expansion is not)
        centre = getattr(module, "centre", None)
        if centre is not None:
            x = x - centre
        first = torch.zeros_like(x)
        second = torch.zeros_like(x)
        for start in range(0, n_support, DEFAULT_CHUNK):
            chunk, c = support[start:start + DEFAULT_CHUNK], coef[:, start:start + DEFAULT_CHUNK]
            if centre is not None:
                chunk = chunk - centre
            first += c @ chunk
            second += c @ (chunk * chunk)
        return x * x * coef.sum(1, keepdim=True) - 2.0 * x * first + second


class ProportionalRule(NeonHook):
    """Redistribution in proportion to the summands on :class:`~neon_attrib.core.layers.MeanPool`:
    ``R_j = h_j / Σ_j' h_j' · R`` (LRP-0 on a linear pooling; ``R_j = h_j / H`` when ``R = î(x)``). Conserves exactly.
    """

    def relevance(self, module, x, out, relevance_out):
        return x * safe_divide(relevance_out, x.sum(-1)).unsqueeze(-1)


class CosineShareRule(NeonHook):
    """ω²-share rule on :class:`~neon_attrib.core.layers.RandomCosineFeatures`:
    ``R_i = Σ_j ω_ij² / ‖ω_j‖² · R_j``. Conserves exactly."""

    def relevance(self, module, x, out, relevance_out):
        sq = module.omega * module.omega
        return relevance_out @ safe_divide(sq, sq.sum(-1, keepdim=True))


class WeightShareRule(NeonHook):
    """w²-share rule on :class:`~neon_attrib.core.layers.ClusterDifference`:
    ``R_i = Σ_{c, k≠c} w_cki² / ‖w_ck‖² · R_ck``. Conserves exactly (pairs of identical centroids have w = 0 and
    pass nothing)."""

    def relevance(self, module, x, out, relevance_out):
        sq = module.weight * module.weight
        return torch.einsum("nck,ckd->nd", relevance_out, safe_divide(sq, sq.sum(-1, keepdim=True)))


class KDEOutlierActivationRule(BetaHook):
    """Activation rule for a :class:`~neon_attrib.models.KDEOutlier` on CNN activations (a >= 0).

    ``R_k = p_k · o(a)`` with ``p = softmin_β(h)`` is split into ``R_k^dot = p_k aᵀ(a − u_k)``, propagated as
    ``R_i = a_i (a_i − u_ik) / aᵀ(a − u_k) · R_k^dot``, and ``R_k^res`` (dissipated). The sum over ``k`` has the
    closed form ``R_i = a_i (a_i − Σ_k p_k u_ik) · R / o(a)``: one pass over the support set in chunks, with an online
    softmax (:func:`~neon_attrib.core.layers.soft_min_pass`), and no (n, N) or (n, N, d) intermediate. Inactive neurons
    (``a_i = 0``) receive exactly 0.

    Parameters
    ----------
    beta : float, optional
        Soft-argmin sharpness; ``None`` uses the model's (γ by default).
    """

    def backward(self, module, grad_input, grad_output):
        beta = self.beta if self.beta is not None else module.beta_
        gradient = grad_input[0]
        if gradient is not None and beta == module.gamma and _gradient_is_softmin(module):
            # With β = γ the soft-argmin weights are those of the score's gradient: autograd has just computed
            # ∇o(a)·R = 2 (a − Σ_k p_k u_k)·R (in the same pass as the score when the model is fused), so
            # R_i = a_i ∇_i o(a) R / (2 o(a)) needs no second pass over the support set.
            x, out = self.stored_tensors["input"], self.stored_tensors["output"]
            scale = safe_divide(torch.full_like(out, 0.5), out).unsqueeze(-1)
            relevance = x * gradient.detach().to(x.dtype) * scale
            return (relevance.to(gradient.dtype),) + (None,) * (len(grad_input) - 1)
        return super().backward(module, grad_input, grad_output)

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.beta_
        _, weighted_mean = soft_min_pass(x, module.distance.support, beta, chunk_size=module.chunk_size,
                                         centre=module.distance.centre)
        return x * (x - weighted_mean) * safe_divide(relevance_out, out).unsqueeze(-1)


class KDEInlierActivationRule(_EpsHook):
    """Activation rule for a :class:`~neon_attrib.models.KDEInlier` (random features) on CNN activations.

    With ``z_j = ω_jᵀa`` and ``c_j = √2 μ_j / H``, each feature's share ``h_j / H = c_j cos(z_j + b_j)`` splits into
    ``R_j^sin = −sin(z_j) sin(b_j) c_j`` and ``R_j^cos = cos(z_j) cos(b_j) c_j``; both go to the inputs in proportion
    to ``a_i ω_ij``, the cosine part with the sign-matched stabiliser ``ε_j`` (dissipated when ``z_j ≈ 0``)::

        R_i = a_i Σ_j ω_ij c_j [ −sin(b_j) sin(z_j)/z_j + cos(b_j) cos(z_j)/(ε_j + z_j) ] · R / î(a)

    One (n, H) product and one (n, H)·(H, d) product. Inactive neurons receive exactly 0.

    Parameters
    ----------
    eps : float, optional
        Stabiliser of the cosine part; ``None`` uses the model's (1.0: ``z_j`` is a phase in radians, and a phase
        below ~1 rad cannot be told apart from the constant ``cos(b_j)`` offset it would otherwise amplify).
    """

    def relevance(self, module, x, out, relevance_out):
        eps = self.eps if self.eps is not None else module.eps_
        return _cosine_relevance(x, module.features, module.features.mean, eps, out, relevance_out)


def _gradient_is_softmin(module) -> bool:
    """Whether autograd's gradient of ``module`` (a KDE outlier head) is ``2(a − Σ_k p_k u_k)`` with β = γ.

    Heads declare it with a class attribute ``_softmin_gradient_forward`` naming their ``forward``; a subclass that
    overrides ``forward`` no longer matches, and the rule then computes the weights itself.
    """
    return getattr(type(module), "_softmin_gradient_forward", None) is type(module).forward


def _cosine_relevance(x: torch.Tensor, layer, mean: torch.Tensor, eps: float, out: torch.Tensor,
                      relevance_out: torch.Tensor) -> torch.Tensor:
    """``R_i = a_i Σ_j ω_ij g_j · R / î(a)``: the random-feature CNN rule with mean feature(s) ``mean``."""
    z = x @ layer.omega.T  # (n, H)
    coef = math.sqrt(2.0) * mean / layer.omega.shape[0]
    g = cosine_activation_coefficients(z, layer.bias, coef, eps) * safe_divide(relevance_out, out).unsqueeze(-1)
    return x * (g @ layer.omega)


class KMeansActivationRule(BetaHook):
    """Activation rule for a :class:`~neon_attrib.models.KMeansMembership` on CNN activations.

    ``R_ck = p_ck f_c(a)`` with ``p_c = softmin_β(h_c)`` over ``k ≠ c``; its part ``R_ck^dot = p_ck aᵀw_ck`` is
    propagated as ``R_i = a_i Σ_k p_ck w_cki`` (times ``R_c / f_c(a)``), and ``R_ck^res = p_ck(b_ck + f_c − h_ck)`` is
    dissipated. Inactive neurons receive exactly 0.

    Parameters
    ----------
    beta : float, optional
        Soft-argmin sharpness; ``None`` uses the model's (set at ``fit``).
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.pool.beta
        h = module.difference(x)  # (n, K, K-1)
        p = soft_argmin(h, beta) * safe_divide(relevance_out, out).unsqueeze(-1)
        return x * torch.einsum("nck,ckd->nd", p, module.difference.weight)


class LocationPoolRule(NeonHook):
    """LRP rule of :class:`~neon_attrib.core.layers.LocationPool`: each location gets its share of the image's
    relevance.

    Conserves exactly (a pool of all-zero contributions passes nothing). Unlike the gradient, which hands every
    location the whole ``R`` under sum pooling, the shares add up to ``R``.

    Examples
    --------
    >>> LocationPoolRule().copy()
    LocationPoolRule()
    """

    def relevance(self, module, x, out, relevance_out):
        if module.mode == "max":
            winner = torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)
            return winner * relevance_out.unsqueeze(-1)
        contributions = x.clamp_min(0.0) if module.mode == "positive" else x
        return contributions * safe_divide(relevance_out, contributions.sum(-1)).unsqueeze(-1)


class LeaveOneOutKDEOutlierRule(BetaHook):
    """CNN rule of :class:`~neon_attrib.models.leave_one_out.LeaveOneOutKDEOutlier`:
    :class:`KDEOutlierActivationRule` with
    the soft-argmin over ``k ≠ r``: ``R_i = a_i (a_i − Σ_{k≠r} p_k u_ik) · R / o_r(a)``.
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.beta_
        weights = soft_argmin(module.distances(x), beta)
        return x * (x - weights @ module.distance.support) * safe_divide(relevance_out, out).unsqueeze(-1)


class LeaveOneOutKDEInlierRule(_EpsHook):
    """CNN rule of :class:`~neon_attrib.models.leave_one_out.LeaveOneOutKDEInlier`:
    :class:`KDEInlierActivationRule` with
    the row's own mean feature ``μ^{(−r)}`` in ``c_j = √2 μ_j / H``.
    """

    def relevance(self, module, x, out, relevance_out):
        eps = self.eps if self.eps is not None else module.eps_
        return _cosine_relevance(x, module.features, module.row_means(x), eps, out, relevance_out)

# the name of the base class before it became public (kept for code written against it)
_NeonHook = NeonHook


# ---------------------------------------------------------------------------------------------------------------------
# rules of more models: k-NN, Mahalanobis, PCA, Gaussian mixtures, one-class SVM, PaDiM
class KMinPoolRule(BetaHook):
    """Rule of :class:`~neon_attrib.core.layers.KMinPool` (``o = 1/k Σ_{j ∈ kNN} h_j``). Conserves exactly.

    * hard (``beta=None``, the layer's default): each of the k smallest gets its share, ``R_j = h_j / Σ_{kNN} h ·
      R`` (``= h_j / k`` when ``R = o``), the others nothing: exactly how the k-min computes the score;
    * soft (a float β > 0): ``R_j = softmin_β(h)_j · R`` over all entries (smooth in x, as the book argues for
      k-means; β → ∞ gives the k = 1 hard rule).

    Examples
    --------
    >>> KMinPoolRule(beta=2.0).copy().beta
    2.0
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else getattr(module, "beta", None)
        if beta is not None:
            return soft_argmin(x, beta) * relevance_out.unsqueeze(-1)
        values, index = x.topk(module.k, dim=-1, largest=False)
        shares = safe_divide(values, values.sum(-1, keepdim=True)) * relevance_out.unsqueeze(-1)
        return torch.zeros_like(x).scatter(-1, index, shares)


class PassThroughRule(NeonHook):
    """Rule of a monotone scalar map on top of a score (:class:`~neon_attrib.core.layers.SquareRoot`): the relevance
    passes
    down unchanged, ``R_in = R_out``, and the rules below share it in their own proportions. Conserves exactly."""

    def relevance(self, module, x, out, relevance_out):
        return relevance_out


class MahalanobisRule(_EpsHook):
    """Quadratic-form rule on :class:`~neon_attrib.core.layers.MahalanobisDistance`:
    ``R_i = Σ_k (x − μ_k)_i [P_k(x − μ_k)]_i / (ε + m_k) · R_k``.

    ``Σ_i (x − μ)_i [P(x − μ)]_i = m``, so with ε = 0 (the default) it conserves exactly; a feature can receive
    negative relevance through correlations (it makes x *less* unusual given the others).

    Parameters
    ----------
    eps : float, optional
        Stabiliser >= 0; ``None`` uses the layer's (0).
    """

    def relevance(self, module, x, out, relevance_out):
        eps = self.eps if self.eps is not None else module.eps
        diff = module.differences(x)
        terms = diff * precision_product(diff, module.factors)  # (n, K, d), sums to m over d
        return (terms * safe_divide(relevance_out, eps + out).unsqueeze(-1)).sum(1)


class WeightedSoftArgminRule(BetaHook):
    """Weighted soft-argmin on :class:`~neon_attrib.core.layers.WeightedLogSumExpPool`:
    ``R_k = w_k exp(−β h_k) / Σ_k' w_k' exp(−β h_k') · R`` (``+β`` for α > 0). Conserves exactly.

    With β = |α| (the default) the weights are each term's share of the pooled sum: the posterior responsibilities
    ``predict_proba`` of a Gaussian mixture, the share of each support vector in a one-class SVM's decision.

    Parameters
    ----------
    beta : float, optional
        Sharpness; ``None`` uses the layer's default (``|α|``).
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.beta
        if beta is None:
            beta = abs(module.alpha)
        sign = -1.0 if module.alpha < 0 else 1.0
        weights = torch.softmax(sign * beta * x + module.log_weights, dim=-1)
        return weights * relevance_out.unsqueeze(-1)


class PositionalMahalanobisRule(_EpsHook):
    """Quadratic-form rule on :class:`~neon_attrib.core.layers.PositionalMahalanobisDistance` (PaDiM), position by
    position: ``R_pi = (a_p − μ_p)_i [P_p(a_p − μ_p)]_i / (ε + m_p) · R_p``. Conserves exactly with ε = 0 (default).
    """

    def relevance(self, module, x, out, relevance_out):
        eps = self.eps if self.eps is not None else 0.0
        diff, _ = module.positions(x)
        terms = diff * precision_product(diff, module.factors)  # (n, L, C)
        coef = safe_divide(relevance_out.reshape(terms.shape[:2]), eps + out.reshape(terms.shape[:2]))
        return module.restore(terms * coef.unsqueeze(-1), x)


def _score_share(relevance_out: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """``R / o`` per row (0 where the score is exactly 0), as a column to scale per-feature terms."""
    return safe_divide(relevance_out, score).unsqueeze(-1)


def _gradient_is_kmin(module) -> bool:
    """Whether autograd's gradient of ``module`` (a k-NN head) is that of the hard k-min, ``2(a − ū)``: heads declare it
    with a class attribute ``_kmin_gradient_forward`` naming their ``forward`` (a subclass overriding it no longer
    matches, and the rule then searches the neighbours itself)."""
    return getattr(type(module), "_kmin_gradient_forward", None) is type(module).forward


def _centre(layer) -> torch.Tensor | None:
    """The expansion point of a distance layer, if it keeps one
    (:func:`~neon_attrib.core.functional.squared_distance`)."""
    return getattr(layer, "centre", None)


class KNNOutlierActivationRule(BetaHook):
    """Activation rule of a :class:`~neon_attrib.models.neighbors.KNNOutlier` head on CNN activations ``a >= 0``.

    With ``p`` the k-min weights (hard: ``1/k`` on the k nearest support points; soft: ``softmin_β(h)``), each
    ``R_j = p_j h_j`` splits into ``p_j aᵀ(a − u_j)`` (propagated) and ``p_j u_jᵀ(u_j − a)`` (dissipated), and the sum
    over ``j`` has the closed form ``R_i = a_i (a_i − ū_i) · R / o(a)``, ``ū = Σ_j p_j u_j``. With the hard weights
    ``ū`` is read off autograd's gradient of the score (``∇o = 2(a − ū)``, computed anyway in the backward pass), so
    the explanation costs no second search of the support set; soft weights take one chunked pass. Inactive neurons
    (``a_i = 0``) receive exactly 0. With ``sqrt`` the head outputs ``√o`` and its relevance passes down unchanged
    (only the ratio ``R / o`` uses ``o``).

    Parameters
    ----------
    beta : float, optional
        ``None``: the head's (hard k-min unless it was given a β); a float: soft-argmin weights over all support points.
    """

    def backward(self, module, grad_input, grad_output):
        beta = self.beta if self.beta is not None else module.pool.beta
        gradient = grad_input[0]
        if gradient is not None and beta is None and _gradient_is_kmin(module):
            # hard k-min: autograd's ∇o(a)·R = 2(a − ū)·R is the rule's ū already (∇√o = ∇o / 2√o with sqrt), so
            # R_i = a_i ∇_i out · R · (√o / o or 1 / 2o) needs no second search of the support set
            x, out = self.stored_tensors["input"], self.stored_tensors["output"]
            scale = safe_divide(torch.full_like(out, 1.0 if module.sqrt else 0.5), out).unsqueeze(-1)
            relevance = x * gradient.detach().to(x.dtype) * scale
            return (relevance.to(gradient.dtype),) + (None,) * (len(grad_input) - 1)
        return super().backward(module, grad_input, grad_output)

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.pool.beta
        support = module.distance.support
        score = out * out if module.sqrt else out
        if beta is None:
            _, index = k_nearest(x, support, module.pool.k, module.chunk_size, centre=_centre(module.distance))
            mean = support[index].mean(1)
        else:
            _, mean = soft_min_pass(x, support, beta, chunk_size=module.chunk_size)
        return x * (x - mean) * _score_share(relevance_out, score)


class WeightedKDEOutlierActivationRule(BetaHook):
    """Activation rule of a :class:`~neon_attrib.models.kernels.WeightedKDEOutlier` (and one-class SVM) head on CNN
    activations: §1's closed form with weighted soft-argmin weights ``p_k ∝ w_k exp(−β h_k)``,
    ``R_i = a_i (a_i − Σ_k p_k u_ik) · R / o(a)``. Rows are processed in blocks (temporaries rows × N); inactive
    neurons receive exactly 0.

    Parameters
    ----------
    beta : float, optional
        ``None``: the head's (γ by default).
    """

    def relevance(self, module, x, out, relevance_out):
        beta = self.beta if self.beta is not None else module.beta_
        support, log_weights = module.distance.support, module.pool.log_weights
        centre = _centre(module.distance)
        rows = max(1, _DIRECT_LIMIT // max(1, support.shape[0]))
        means = []
        for block in x.split(rows):
            h = squared_distance(block if centre is None else block - centre,
                                 support if centre is None else support - centre)
            means.append(torch.softmax(-beta * h + log_weights, dim=-1) @ support)
        mean = torch.cat(means) if means else torch.zeros_like(x)
        return x * (x - mean) * _score_share(relevance_out, out)


class GaussianActivationRule(BetaHook):
    """Activation rule of the Gaussian heads (:class:`~neon_attrib.models.gaussian.MahalanobisOutlier`,
    :class:`~neon_attrib.models.gaussian.PCAResidual`, :class:`~neon_attrib.models.gaussian.GaussianMixtureOutlier`) on
    CNN
    activations ``a >= 0``.

    Each component's energy ``h_k = (a − μ_k)ᵀP_k(a − μ_k)`` splits into ``aᵀP_k(a − μ_k)`` (propagated) and
    ``μ_kᵀP_k(μ_k − a)`` (dissipated); with the responsibilities ``p_k`` of the mixture's top layer (``p = 1`` for a
    single Gaussian) ``R_i = a_i Σ_k p_k [P_k(a − μ_k)]_i · R / o(a)``. Inactive neurons receive exactly 0.

    Parameters
    ----------
    beta : float, optional
        Sharpness of the responsibilities; ``None``: the pool's (1: the posterior, ``predict_proba``).
    """

    def relevance(self, module, x, out, relevance_out):
        layer, pool = module.distance, module.pool
        diff = layer.differences(x)
        product = precision_product(diff, layer.factors)  # (n, K, d)
        log_weights = getattr(pool, "log_weights", None)
        if log_weights is None or product.shape[1] == 1:
            gradient_half = product.sum(1)
        else:
            beta = self.beta if self.beta is not None else (pool.beta if pool.beta is not None else abs(pool.alpha))
            weights = torch.softmax(-beta * squared_mahalanobis(diff, layer.factors) + log_weights, dim=-1)
            gradient_half = (weights.unsqueeze(-1) * product).sum(1)
        return x * gradient_half * _score_share(relevance_out, out)


class PositionalMahalanobisActivationRule(NeonHook):
    """Activation rule of a :class:`~neon_attrib.models.gaussian.PositionalMahalanobis` (PaDiM) head on CNN activations:
    per position, ``R_pi = a_pi [P_p(a_p − μ_p)]_i · R_p / m_p``; ``μ_pᵀP_p(μ_p − a_p)`` is dissipated and inactive
    channels receive exactly 0. With ``sqrt`` the head outputs ``√m_p``, whose relevance passes down unchanged."""

    def relevance(self, module, x, out, relevance_out):
        layer = module.distance
        rows, _ = layer.as_rows(x)
        diff = rows - layer.means
        product = precision_product(diff, layer.factors)  # (n, L, C)
        score = out * out if getattr(module, "sqrt", False) else out  # √m_p on top passes its relevance unchanged
        coef = safe_divide(relevance_out.reshape(diff.shape[:2]), score.reshape(diff.shape[:2]))
        return layer.restore(rows * product * coef.unsqueeze(-1), x)

