"""PaDiM's head as a network: :class:`PositionalMahalanobis`, one Gaussian per spatial position of a feature map."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._utils import ArrayLike, as_float_tensor, check_int, module_dtype_device
from .composites import register_rule
from .estimator import NeonEstimator
from .layers import PositionalMahalanobisDistance, SquareRoot
from .rules import PositionalMahalanobisActivationRule

__all__ = ["PositionalMahalanobis"]

#: Positions whose covariances :meth:`PositionalMahalanobis.fit` estimates at once (float64 temporaries).
_POSITION_BLOCK = 64


def _check_reg(value: Any, owner: str) -> None:
    ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
          and np.isfinite(value) and value >= 0)
    if not ok:
        raise ValueError(f"The 'reg' parameter of {owner} must be a finite float >= 0. Got {value!r} instead.")


class PositionalMahalanobis(NeonEstimator):
    """PaDiM's head: one Gaussian ``(μ_p, Σ_p + reg·I)`` per spatial position ``p`` of a feature map, and the squared
    Mahalanobis distance ``m_p(a) = (a_p − μ_p)ᵀ P_p (a_p − μ_p)`` of each location to its own position's Gaussian
    (``√m_p`` with ``sqrt=True``, PaDiM's patch score).

    Shape contract (:class:`~neon_attrib.layers.PositionalMahalanobisDistance`): feature maps (n, C, h, w) give
    scores (n, h, w); location rows (n·h·w, C), location-major per image (row ``i·h·w + y·w + x``, the layout of
    :class:`~neon_attrib.deep.DeepNeon`), give scores (n·h·w,). So it works both on its own, stacked after a
    feature extractor (explain one patch with ``target``, or all of them after a pooling), and as a ``DeepNeon`` head.
    Fit it on feature maps (``head.fit(features(images))``, then ``DeepNeon(features, head)``), or let
    ``DeepNeon.fit`` fit it on all location rows with ``n_positions`` set; not on a sample of locations
    (``max_locations``), which would mix the positions.

    Relevance: per position the Mahalanobis rule, ``R_pi = (a_p − μ_p)_i [P_p(a_p − μ_p)]_i / m_p · R_p`` (exact), or
    on CNN activations ``R_pi = a_pi [P_p(a_p − μ_p)]_i / m_p · R_p`` (the rest dissipated, inactive channels 0).

    Parameters
    ----------
    reg : float
        Added to each covariance's diagonal (PaDiM: 0.01), which makes every ``Σ_p`` invertible.
    n_positions : int, optional
        Number of positions ``h·w``; needed only to fit on location rows (fitting on feature maps sets it).
    sqrt : bool
        Output the Mahalanobis distance ``√m_p`` instead of its square (relevance passes the root unchanged).

    Attributes
    ----------
    map_shape_ : tuple of int or None
        ``(h, w)`` when fitted on feature maps.

    Examples
    --------
    >>> maps = torch.rand(10, 4, 3, 3)
    >>> head = PositionalMahalanobis().fit(maps)
    >>> head(maps[:2]).shape
    torch.Size([2, 3, 3])
    """

    _state_attributes = ("reg", "n_positions", "sqrt", "n_features_in_", "map_shape_")
    _refit_parameters = ("reg", "n_positions")

    def __init__(self, reg: float = 0.01, n_positions: int | None = None, *, sqrt: bool = False):
        super().__init__()
        self.reg = reg
        self.n_positions = n_positions
        self.sqrt = sqrt
        self.map_shape_: tuple[int, int] | None = None
        self.distance = PositionalMahalanobisDistance()
        self.root = SquareRoot()

    def _validate_hyperparameters(self) -> None:
        _check_reg(self.reg, self._name)
        if self.n_positions is not None:
            check_int(self.n_positions, owner=self._name, name="n_positions", minimum=1)
        if not isinstance(self.sqrt, (bool, np.bool_)):
            raise ValueError(f"The 'sqrt' parameter of {self._name} must be a bool. Got {self.sqrt!r} instead.")

    def _configure_layers(self) -> None:
        self.distance.map_shape = None if self.map_shape_ is None else tuple(self.map_shape_)

    def _input(self, x: ArrayLike, name: str = "X") -> torch.Tensor:
        dtype, device = module_dtype_device(self)
        tensor = as_float_tensor(x, dtype=dtype, device=device, owner=self._name, name=name)
        if tensor.ndim not in (2, 4):
            raise ValueError(f"{name} passed to {self._name} must be feature maps (n, C, h, w) or location rows "
                             f"(n·h·w, C). Got shape {tuple(tensor.shape)}.")
        if self.n_features_in_ is not None and tensor.shape[1] != self.n_features_in_:
            raise ValueError(f"{name} has {tensor.shape[1]} channels, but {self._name} was fitted with "
                             f"{self.n_features_in_} channels.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} passed to {self._name} contains NaN or infinity.")
        return tensor

    @torch.no_grad()
    def fit(self, X: ArrayLike, y: Any = None) -> PositionalMahalanobis:
        """Fit one Gaussian per position on feature maps (n, C, h, w), or on location rows (n·L, C) with
        ``n_positions = L`` set; n >= 2 images. Returns ``self``."""
        self._validate_hyperparameters()
        data = self._input(X)
        if data.ndim == 4:
            n, c, h, w = data.shape
            if self.n_positions is not None and self.n_positions != h * w:
                raise ValueError(f"X has {h * w} positions ({h}x{w}), but the 'n_positions' parameter of "
                                 f"{self._name} is {self.n_positions}.")
            rows, map_shape = data.permute(0, 2, 3, 1).reshape(n, h * w, c), (h, w)
        else:
            if self.n_positions is None:
                raise ValueError(f"{self._name} fits on location rows (n·L, C) only with the 'n_positions' parameter "
                                 f"set (L = h·w); or fit it on feature maps (n, C, h, w).")
            if data.shape[0] % self.n_positions:
                raise ValueError(f"X has {data.shape[0]} rows, not a multiple of n_positions={self.n_positions}.")
            rows, map_shape = data.reshape(-1, self.n_positions, data.shape[1]), None
        if rows.shape[0] < 2:
            raise ValueError(f"{self._name} needs at least 2 images to fit. Got {rows.shape[0]}.")
        n_images, n_pos, channels = rows.shape
        dtype = module_dtype_device(self)[0]
        means = torch.empty(n_pos, channels, dtype=dtype, device=rows.device)
        factors = torch.empty(n_pos, channels, channels, dtype=dtype, device=rows.device)
        identity = torch.eye(channels, dtype=torch.float64, device=rows.device)
        for start in range(0, n_pos, _POSITION_BLOCK):  # float64 temporaries of one block of positions only
            block = rows[:, start:start + _POSITION_BLOCK].double()
            mean = block.mean(0)
            centred = block - mean
            cov = torch.einsum("nlc,nld->lcd", centred, centred) / (n_images - 1) + self.reg * identity
            chol, info = torch.linalg.cholesky_ex(cov)  # Σ = G Gᵀ, P = G⁻ᵀG⁻¹: L = G⁻ᵀ
            if bool((info > 0).any()):
                bad = start + int(torch.nonzero(info)[0])
                raise ValueError(f"The covariance of {self._name} at position {bad} is singular ({n_images} images, "
                                 f"{channels} channels): the 'reg' parameter must be > 0 (PaDiM uses 0.01). "
                                 f"Got reg={self.reg!r}.")
            means[start:start + _POSITION_BLOCK] = mean.to(dtype)
            factors[start:start + _POSITION_BLOCK] = torch.linalg.solve_triangular(
                chol, identity, upper=False).transpose(-1, -2).to(dtype)
        self.distance.means = means
        self.distance.factors = factors
        self.map_shape_ = map_shape
        self.n_features_in_ = int(rows.shape[2])
        self._refresh_fitted()
        return self

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Scores per position: (n, h, w) for feature maps, (n·L,) for location rows."""
        self._check_fitted()
        scores = self.distance(self._input(x, name="x"))
        return self.root(scores) if self.sqrt else scores


register_rule(PositionalMahalanobis, lambda beta, eps: PositionalMahalanobisActivationRule(), mode="activation",
              covers_children=True)
