"""Leave-one-out heads for a model fitted on the image it explains (the book's wood example).

When a head is fitted on the locations of the very image it explains
(:meth:`~neon_attrib.vision.deep.DeepNeon.fit_self`),
each location must be scored against the *other* locations: otherwise its own support point dominates its density and
the explanation vanishes exactly where the location is unusual. Their CNN rules are
:class:`~neon_attrib.core.rules.LeaveOneOutKDEOutlierRule` and
:class:`~neon_attrib.core.rules.LeaveOneOutKDEInlierRule`, which
are their only rules (their forward passes do not run through their layers).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.functional import log_mean_exp, random_cosine_features, squared_distance
from ..core.layers import LogMeanExpPool, MeanPool, RandomCosineFeatures, SquaredDistance
from ..core.registry import register_model
from ..core.rules import LeaveOneOutKDEInlierRule, LeaveOneOutKDEOutlierRule
from ..core.validation import ArrayLike, module_dtype_device
from . import KDEInlier, KDEOutlier

__all__ = ["LeaveOneOutKDEOutlier", "LeaveOneOutKDEInlier"]


class _SelfFitted:
    """Mixin: input row ``r`` is the location that was support point ``r mod N``; it is left out of its own model."""

    _name: str

    #: a row may differ from the location it stands for by this share of the support's spread (largest distance
    #: to its mean), plus rounding of the row's magnitude: the features of the same images recomputed (batch-norm
    #: merging, another batch size) differ by rounding, other images by O(spread)
    _self_tolerance = 1e-3

    def _self_index(self, x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """``r mod N`` for every row ``r`` of ``x``, after checking that row ``r`` *is* support point ``r mod N``."""
        n_support = support.shape[0]
        if n_support < 2:
            raise ValueError(f"{self._name} needs at least 2 support points (locations) to leave one out. "
                             f"Got {n_support}.")
        if x.shape[0] % n_support:
            raise ValueError(f"{self._name} scores the locations it was fitted on, row r against all support points "
                             f"but r mod {n_support}; got {x.shape[0]} rows, not a multiple of {n_support}. Explain "
                             f"the image(s) it was fitted on (DeepNeon.fit_self), in the same order.")
        index = torch.arange(x.shape[0], device=x.device) % n_support
        if x.shape[0] == 0:
            return index
        with torch.no_grad():
            expected = support[index].to(x.dtype)
            error = (x.detach() - expected).norm(dim=1)
            rows = support.detach().to(torch.float64)
            spread = float((rows - rows.mean(0)).norm(dim=1).max())
            magnitude = float(rows.norm(dim=1).max())
            allowed = self._self_tolerance * spread + 64 * torch.finfo(x.dtype).eps * magnitude
            worst = int(error.argmax())
            if not float(error[worst]) <= allowed:
                raise ValueError(f"{self._name} scores the locations it was fitted on, in the fitted order; row "
                                 f"{worst} is {float(error[worst]):.3g} away from the location it stands for "
                                 f"(support point {worst % n_support}; the support's spread is {spread:.3g}), so "
                                 f"these are other images (or another order). Explain the image(s) it was fitted on "
                                 f"(DeepNeon.fit_self), or fit it again on these.")
        return index


class LeaveOneOutKDEOutlier(_SelfFitted, KDEOutlier):
    """A :class:`~neon_attrib.models.KDEOutlier` for the locations of the image it was fitted on (the book's wood).

    Row ``r`` of the input is scored against every support point *but* ``r mod N`` (itself, when the input is the
    fitted data in the fitted order)::

        o_r(a) = −(1/γ) log( 1/(N−1) Σ_{k ≠ r} exp(−γ ‖a − u_k‖²) )

    Without leaving itself out, a location's own support point dominates its density (``exp(0) = 1``), every score
    is close to ``log(N)/γ`` and the explanation ``a_i(a_i − Σ_k p_k u_ik)`` vanishes exactly where the location is
    unusual. :meth:`DeepNeon.fit_self` builds one; its CNN rule is :class:`LeaveOneOutKDEOutlierRule`.
    """

    @classmethod
    def from_head(cls, head: KDEOutlier) -> LeaveOneOutKDEOutlier:
        """An unfitted copy of ``head``'s hyperparameters, on its dtype and device."""
        dtype, device = module_dtype_device(head)
        return cls(head.gamma, beta=head.beta, eps=head.eps, chunk_size=head.chunk_size).to(dtype=dtype,
                                                                                            device=device)

    def fit(self, X: ArrayLike, y: Any = None) -> LeaveOneOutKDEOutlier:
        super().fit(X, y)
        if self.distance.support.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 support points (locations). Got 1.")
        return self

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """``‖x_r − u_k‖²`` (rows, N) with ``+inf`` at ``k = r mod N``."""
        support = self.distance.support
        index = self._self_index(x, support)
        h = squared_distance(x, support, centre=self.distance.centre)
        mask = torch.nn.functional.one_hot(index, support.shape[0]).bool()
        return h.masked_fill(mask, math.inf)

    def forward(self, x: ArrayLike) -> torch.Tensor:
        self._check_fitted()
        x = self._as_tensor(x)
        n_support = self.distance.support.shape[0]
        alpha = -float(self.gamma)
        return log_mean_exp(self.distances(x), alpha, self.chunk_size, count=n_support - 1)

    @torch.no_grad()
    def score(self, x: ArrayLike) -> torch.Tensor:
        return self(x)


class LeaveOneOutKDEInlier(_SelfFitted, KDEInlier):
    """A :class:`~neon_attrib.models.KDEInlier` for the locations of the image it was fitted on.

    Row ``r`` uses the mean random feature of the support set without ``u_{r mod N}``:
    ``μ^{(−r)} = (N μ − φ(u_r)) / (N − 1)``, so its score approximates ``1/(N−1) Σ_{k≠r} exp(−γ‖a − u_k‖²)``
    instead of adding the constant ``1/N`` of a location's similarity to itself. CNN rule:
    :class:`LeaveOneOutKDEInlierRule`.
    """

    @classmethod
    def from_head(cls, head: KDEInlier) -> LeaveOneOutKDEInlier:
        """An unfitted copy of ``head``'s hyperparameters, on its dtype and device."""
        dtype, device = module_dtype_device(head)
        return cls(**head.get_params(deep=False)).to(dtype=dtype, device=device)

    def fit(self, X: ArrayLike, y: Any = None) -> LeaveOneOutKDEInlier:
        super().fit(X, y)
        if self.support.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 support points (locations). Got 1.")
        return self

    def row_means(self, x: torch.Tensor) -> torch.Tensor:
        """``μ^{(−r)}`` for every row of ``x``, (rows, H)."""
        layer, support = self.features, self.support
        index = self._self_index(x, support)
        phi = random_cosine_features(support, layer.omega, layer.bias)  # (N, H)
        n = support.shape[0]
        return ((n * layer.mean - phi) / (n - 1))[index]

    def forward(self, x: ArrayLike) -> torch.Tensor:
        self._check_fitted()
        x = self._as_tensor(x)
        layer = self.features
        phi = random_cosine_features(x, layer.omega, layer.bias)
        return (phi * self.row_means(x)).mean(-1)


# their rules are the only correct ones in either family: the forward passes bypass the layers
register_model(LeaveOneOutKDEOutlier, lambda beta, eps: LeaveOneOutKDEOutlierRule(beta=beta), mode="any",
               layers=(SquaredDistance, LogMeanExpPool))
register_model(LeaveOneOutKDEInlier, lambda beta, eps: LeaveOneOutKDEInlierRule(eps=eps), mode="any",
               layers=(RandomCosineFeatures, MeanPool))
