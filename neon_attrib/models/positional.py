"""PaDiM's head as a network: :class:`PositionalMahalanobis`, one Gaussian per spatial position of a feature map.

The Gaussians are estimated from running statistics (count, mean and centred scatter matrix per position, float64),
so the head also fits on data that do not fit in memory, chunk by chunk (:meth:`PositionalMahalanobis.partial_fit`),
with the same result as one :meth:`~PositionalMahalanobis.fit` on all of it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.estimator import NeonEstimator
from ..core.layers import PositionalMahalanobisDistance, ResizableBuffers, SquareRoot
from ..core.registry import register_model
from ..core.rules import PositionalMahalanobisActivationRule
from ..core.validation import ArrayLike, Boolean, Integer, Real, as_float_tensor, module_dtype_device

__all__ = ["PositionalMahalanobis", "PositionalMoments"]

#: Positions whose statistics and covariances are computed at once (float64 temporaries).
_POSITION_BLOCK = 64


#: a covariance regulariser: a finite float >= 0
REG = Real(closed=True)


class PositionalMoments(ResizableBuffers):
    """Running statistics of per-position Gaussians, always in float64: the number of images ``count``, the means
    ``mean`` (L, C) and the centred scatter matrices ``scatter`` (L, C, C), ``Σ_i (a_ip − μ_p)(a_ip − μ_p)ᵀ``.

    Buffers, so that ``state_dict()`` carries them and ``.to(device)`` moves them; a dtype conversion of the model
    (``.float()``, ``.half()``) leaves them in float64. Empty placeholders mean "no statistics"; a state dict saved
    without them (by an older version) loads as "no statistics" too.
    """

    count: torch.Tensor
    mean: torch.Tensor
    scatter: torch.Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean", torch.empty(0, 0, dtype=torch.float64))
        self.register_buffer("scatter", torch.empty(0, 0, 0, dtype=torch.float64))

    @property
    def empty(self) -> bool:
        return self.scatter.numel() == 0

    def set(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        self.count = torch.tensor(count, dtype=torch.int64, device=mean.device)
        self.mean, self.scatter = mean, scatter

    def clear(self) -> None:
        device = self.mean.device
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.mean = torch.empty(0, 0, dtype=torch.float64, device=device)
        self.scatter = torch.empty(0, 0, 0, dtype=torch.float64, device=device)

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        result = super()._apply(fn, recurse)
        for name, old in before.items():  # keep float64 (and the values), follow the device
            new = self._buffers[name]
            if old is not None and new is not None and old.is_floating_point() and new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        absent = [prefix + name for name in self._buffers if prefix + name not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent:  # saved without statistics: the Gaussians load, a later partial_fit raises (never continues wrong)
            missing_keys[:] = [key for key in missing_keys if key not in absent]
            self.clear()

    def extra_repr(self) -> str:
        return f"count={int(self.count)}, shape={tuple(self.mean.shape)}"


def _merge(count: int, mean: torch.Tensor | None, scatter: torch.Tensor | None, rows: torch.Tensor, *,
           in_place: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The statistics of the accumulated images ``(count, mean, scatter)`` and of ``rows`` (n, L, C) together.

    Chan, Golub & LeVeque's pairwise update, per position: the chunk's own mean and centred scatter (two passes, in
    float64), then ``μ = μ_a + δ·n_b/n`` and ``M = M_a + M_b + δδᵀ·n_a·n_b/n`` with ``δ = μ_b − μ_a``. No raw sums
    of ``a aᵀ``, which cancel catastrophically on data far from the origin.
    """
    n_b, n_pos, channels = rows.shape
    total = count + n_b
    if count == 0 or not in_place:
        out_mean = torch.empty(n_pos, channels, dtype=torch.float64, device=rows.device)
        out_scatter = torch.empty(n_pos, channels, channels, dtype=torch.float64, device=rows.device)
    else:
        out_mean, out_scatter = mean, scatter
    for start in range(0, n_pos, _POSITION_BLOCK):
        part = slice(start, start + _POSITION_BLOCK)
        block = rows[:, part].double()
        block_mean = block.mean(0)
        centred = block - block_mean
        block_scatter = torch.einsum("nlc,nld->lcd", centred, centred)
        if count == 0:
            out_mean[part], out_scatter[part] = block_mean, block_scatter
            continue
        delta = block_mean - mean[part]
        out_scatter[part] = scatter[part] + block_scatter + (count * n_b / total) * (delta[:, :, None] * delta[:, None])
        out_mean[part] = mean[part] + (n_b / total) * delta
    return total, out_mean, out_scatter


class PositionalMahalanobis(NeonEstimator):
    """PaDiM's head: one Gaussian ``(μ_p, Σ_p + reg·I)`` per spatial position ``p`` of a feature map, and the squared
    Mahalanobis distance ``m_p(a) = (a_p − μ_p)ᵀ P_p (a_p − μ_p)`` of each location to its own position's Gaussian
    (``√m_p`` with ``sqrt=True``, PaDiM's patch score).

    Shape contract (:class:`~neon_attrib.core.layers.PositionalMahalanobisDistance`): feature maps (n, C, h, w) give
    scores (n, h, w); location rows (n·h·w, C), location-major per image (row ``i·h·w + y·w + x``, the layout of
    :class:`~neon_attrib.vision.deep.DeepNeon`), give scores (n·h·w,). So it works both on its own, stacked after a
    feature extractor (explain one patch with ``target``, or all of them after a pooling), and as a ``DeepNeon`` head.
    Fit it on feature maps (``head.fit(features(images))``, then ``DeepNeon(features, head)``), or let
    ``DeepNeon.fit`` stream whole feature maps into :meth:`partial_fit`; never on a sample of locations, which would
    mix the positions (``DeepNeon.fit(..., max_locations=...)`` and :func:`~neon_attrib.scale.fit_dataset` refuse it).

    Relevance: per position the Mahalanobis rule, ``R_pi = (a_p − μ_p)_i [P_p(a_p − μ_p)]_i / m_p · R_p`` (exact), or
    on CNN activations ``R_pi = a_pi [P_p(a_p − μ_p)]_i / m_p · R_p`` (the rest dissipated, inactive channels 0).

    **Streaming.** :meth:`partial_fit` adds a chunk of images to running statistics (per position: count, mean and
    centred scatter matrix, float64, merged with Chan et al.'s update) and recomputes the Gaussians from them, so after
    ``partial_fit`` over chunks the model equals ``fit`` on their concatenation, in any order of the chunks (float64:
    to rounding). Memory: ``L·C²`` float64 for the statistics, whatever the number of images. ``fit`` starts over;
    ``reg`` is applied when the Gaussians are computed, never stored in the statistics.

    Parameters
    ----------
    reg : float
        Added to each covariance's diagonal (PaDiM: 0.01), which makes every ``Σ_p`` invertible. Setting it on a fitted
        model recomputes the Gaussians from the running statistics (a new fit with that ``reg``); without them (freed
        by ``finalize(keep_statistics=False)``) it needs a new fit.
    n_positions : int, optional
        Number of positions ``h·w``; needed only to fit on location rows (fitting on feature maps sets it).
    sqrt : bool
        Output the Mahalanobis distance ``√m_p`` instead of its square (relevance passes the root unchanged).

    Attributes
    ----------
    map_shape_ : tuple of int or None
        ``(h, w)`` when fitted on feature maps.
    n_images_seen_ : int
        Images in the running statistics (0 when there are none: before fitting, after
        ``finalize(keep_statistics=False)``, or loaded from a state saved without them).
    moments : PositionalMoments
        The running statistics (saved in ``state_dict()``, so that ``partial_fit`` continues after loading).

    Examples
    --------
    >>> maps = torch.rand(10, 4, 3, 3)
    >>> head = PositionalMahalanobis().fit(maps)
    >>> head(maps[:2]).shape
    torch.Size([2, 3, 3])

    Streaming, chunk by chunk, gives the same model:

    >>> chunked = PositionalMahalanobis()
    >>> for chunk in maps.split(4):
    ...     chunked = chunked.partial_fit(chunk)
    >>> chunked.n_images_seen_, torch.allclose(chunked(maps), head(maps), rtol=1e-4)
    (10, True)
    """

    _state_attributes = ("reg", "n_positions", "sqrt", "n_features_in_", "map_shape_")
    #: fitted on whole feature maps (``DeepNeon.fit`` streams them into :meth:`partial_fit`), never on a sample
    _fits_on_feature_maps = True
    _refit_parameters = ("reg", "n_positions")

    _parameter_checks = {"reg": REG, "n_positions": Integer(1, allow_none=True), "sqrt": Boolean()}

    def __init__(self, reg: float = 0.01, n_positions: int | None = None, *, sqrt: bool = False):
        super().__init__()
        self.reg = reg
        self.n_positions = n_positions
        self.sqrt = sqrt
        self.map_shape_: tuple[int, int] | None = None
        self.distance = PositionalMahalanobisDistance()
        self.root = SquareRoot()
        self.moments = PositionalMoments()  # after `distance`: the model's dtype is that of the Gaussians

    def _refit_in_place(self, name: str, value: Any) -> bool:
        # a new 'reg': the Gaussians are recomputed from the running statistics (reg is added only there); without
        # them (freed, half-updated, or an old saved state) it needs a new fit
        if name != "reg" or self.moments.empty or int(self.moments.count) < 0:
            return False
        REG.check(value, owner=self._name, name="reg")
        old = self.reg
        object.__setattr__(self, "reg", value)  # past the refit guard: finalize reads it
        try:
            self.finalize()
        except Exception:
            object.__setattr__(self, "reg", old)
            raise
        return True

    def _configure_layers(self) -> None:
        self.distance.map_shape = None if self.map_shape_ is None else tuple(self.map_shape_)

    @property
    def n_images_seen_(self) -> int:
        return max(int(self.moments.count), 0)

    @property
    def variances_(self) -> torch.Tensor:
        """(L, C) float64: the per-position variances of the running statistics (the covariances' diagonals, without
        ``reg``; unbiased). Their mean is the mean per-element variance of the feature maps seen."""
        self._check_statistics()
        if self.n_images_seen_ < 2:
            raise ValueError(f"{self._name} needs at least 2 images for variances. Got {self.n_images_seen_}.")
        return self.moments.scatter.diagonal(dim1=-2, dim2=-1) / (self.n_images_seen_ - 1)

    def _check_statistics(self) -> None:
        if int(self.moments.count) < 0:
            raise ValueError(f"The running statistics of this {self._name} were left half-updated by an interrupted "
                             f"partial_fit(..., finalize=False); its Gaussians are those of before. Call 'fit' on all "
                             f"the data, or 'partial_fit' chunk by chunk from a new model.")
        if self.moments.empty:
            fitted = "was fitted, but has" if self.__sklearn_is_fitted__() else "has"
            raise ValueError(f"This {self._name} {fitted} no running statistics to continue from (discarded with "
                             f"finalize(keep_statistics=False), or loaded from a state saved without them). Call "
                             f"'fit' on all the data, or 'partial_fit' chunk by chunk from a new model.")

    def _input(self, x: ArrayLike, name: str = "X") -> torch.Tensor:
        dtype, device = module_dtype_device(self)
        tensor = as_float_tensor(x, dtype=dtype, device=device, owner=self._name, name=name)
        if tensor.ndim not in (2, 4):
            raise ValueError(f"{name} passed to {self._name} must be feature maps (n, C, h, w) or location rows "
                             f"(n·h·w, C). Got shape {tuple(tensor.shape)}.")
        if self._fitted_features() not in (None, tensor.shape[1]):
            raise ValueError(f"{name} has {tensor.shape[1]} channels, but {self._name} was fitted with "
                             f"{self.n_features_in_} channels.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} passed to {self._name} contains NaN or infinity.")
        return tensor

    def _rows(self, X: ArrayLike, continuing: bool) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """``X`` as (n, L, C) per-position rows and its map shape; checked against the running statistics when
        ``continuing``. Changes nothing."""
        dtype, device = module_dtype_device(self)
        data = as_float_tensor(X, dtype=dtype, device=device, owner=self._name, name="X")
        if data.ndim not in (2, 4):
            raise ValueError(f"X passed to {self._name} must be feature maps (n, C, h, w) or location rows "
                             f"(n·h·w, C). Got shape {tuple(data.shape)}.")
        n_pos, channels = self.moments.mean.shape if continuing else (self.n_positions, None)
        if channels is not None and data.shape[1] != channels:
            raise ValueError(f"X has {data.shape[1]} channels, but {self._name} has statistics of {channels} "
                             f"channels.")
        if not bool(torch.isfinite(data).all()):
            raise ValueError(f"X passed to {self._name} contains NaN or infinity.")
        if data.ndim == 4:
            n, c, h, w = data.shape
            if continuing and self.map_shape_ is not None and (h, w) != tuple(self.map_shape_):
                raise ValueError(f"X has {h}x{w} maps, but {self._name} has statistics of {self.map_shape_[0]}x"
                                 f"{self.map_shape_[1]} maps.")
            if n_pos is not None and n_pos != h * w:
                raise ValueError(f"X has {h * w} positions ({h}x{w}), but the 'n_positions' parameter of "
                                 f"{self._name} is {n_pos}." if not continuing else
                                 f"X has {h * w} positions ({h}x{w}), but {self._name} has statistics of {n_pos}.")
            map_shape = self.map_shape_ if continuing else (h, w)
            return data.permute(0, 2, 3, 1).reshape(n, h * w, c), map_shape
        if n_pos is None:
            raise ValueError(f"{self._name} fits on location rows (n·L, C) only with the 'n_positions' parameter "
                             f"set (L = h·w); or fit it on feature maps (n, C, h, w).")
        if continuing and self.n_positions is not None and self.n_positions != n_pos:
            raise ValueError(f"The 'n_positions' parameter of {self._name} is {self.n_positions}, but its statistics "
                             f"have {n_pos} positions.")
        if data.shape[0] % n_pos:
            raise ValueError(f"X has {data.shape[0]} rows, not a multiple of n_positions={n_pos}.")
        return data.reshape(-1, n_pos, data.shape[1]), self.map_shape_ if continuing else None

    def _gaussians(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and precision factors (module dtype) from the statistics, ``reg`` added; raises, changing nothing."""
        if count < 2:
            raise ValueError(f"{self._name} needs at least 2 images to fit. Got {count} in all; accumulate more "
                             f"first with partial_fit(X, finalize=False).")
        n_pos, channels = mean.shape
        dtype = module_dtype_device(self)[0]
        factors = torch.empty(n_pos, channels, channels, dtype=dtype, device=mean.device)
        identity = torch.eye(channels, dtype=torch.float64, device=mean.device)
        for start in range(0, n_pos, _POSITION_BLOCK):  # float64 temporaries of one block of positions only
            part = slice(start, start + _POSITION_BLOCK)
            cov = scatter[part] / (count - 1) + self.reg * identity
            chol, info = torch.linalg.cholesky_ex(cov)  # Σ = G Gᵀ, P = G⁻ᵀG⁻¹: L = G⁻ᵀ
            if bool((info > 0).any()):
                bad = start + int(torch.nonzero(info)[0])
                raise ValueError(f"The covariance of {self._name} at position {bad} is singular ({count} images, "
                                 f"{channels} channels): the 'reg' parameter must be > 0 (PaDiM uses 0.01). "
                                 f"Got reg={self.reg!r}.")
            factors[part] = torch.linalg.solve_triangular(chol, identity, upper=False).transpose(-1, -2).to(dtype)
        return mean.to(dtype=dtype, copy=True), factors  # a copy: the statistics may be updated in place later

    def _install(self, count: int, mean: torch.Tensor, scatter: torch.Tensor, map_shape: tuple[int, int] | None,
                 keep_statistics: bool) -> PositionalMahalanobis:
        """Compute the Gaussians from the statistics, then (only if that succeeds) replace the fitted state."""
        means, factors = self._gaussians(count, mean, scatter)
        self.distance.means = means
        self.distance.factors = factors
        if keep_statistics:
            self.moments.set(count, mean, scatter)
        else:
            self.moments.clear()
        self.map_shape_ = map_shape
        self.n_features_in_ = int(mean.shape[1])
        self._refresh_fitted()
        return self

    @torch.no_grad()
    def fit(self, X: ArrayLike, y: Any = None) -> PositionalMahalanobis:
        """Fit one Gaussian per position on feature maps (n, C, h, w), or on location rows (n·L, C) with
        ``n_positions = L`` set; n >= 2 images. Starts over: earlier fits and running statistics are replaced (the new
        statistics are kept, so :meth:`partial_fit` can continue). A failure leaves the model as it was. Returns
        ``self``."""
        self._validate_hyperparameters()
        rows, map_shape = self._rows(X, continuing=False)
        count, mean, scatter = _merge(0, None, None, rows, in_place=False)
        return self._install(count, mean, scatter, map_shape, keep_statistics=True)

    @torch.no_grad()
    def partial_fit(self, X: ArrayLike, y: Any = None, *, finalize: bool = True) -> PositionalMahalanobis:
        """Add a chunk of images to the running statistics and recompute the Gaussians from them.

        After ``partial_fit`` over chunks, the model equals :meth:`fit` on their concatenation, in any order of the
        chunks. The first chunk decides the layout (feature maps, or location rows with ``n_positions`` set); later
        ones must have its channels and positions (and map shape).

        Parameters
        ----------
        X : array-like
            Feature maps (n, C, h, w), or location rows (n·L, C) (``L`` = ``n_positions``, or that of the statistics).
        y : ignored
        finalize : bool
            Recompute the Gaussians (default), so that the model is usable after every chunk; that needs >= 2 images
            in all; the statistics are updated on a copy (``L·C²`` float64 more, for a moment), so that a failure
            keeps them. ``False`` only accumulates, in place (no copy, and one Cholesky factorisation per position
            saved per chunk); the Gaussians stay as they were until :meth:`finalize` or a later ``partial_fit``. If
            that update is interrupted (``KeyboardInterrupt``, out of memory), the statistics are marked as
            half-updated and continuing from them raises.

        Returns
        -------
        PositionalMahalanobis
            ``self``.

        Raises
        ------
        ValueError
            For a chunk with other channels, positions or map shape than the statistics, NaN or infinity, fewer than
            2 images in all (when finalizing), a singular covariance (``reg=0``), or a fitted model without running
            statistics. The model is left as it was.
        TypeError
            For a floating chunk of another dtype than the model's (as in ``forward``).
        """
        self._validate_hyperparameters()
        continuing = not self.moments.empty
        if continuing or self.__sklearn_is_fitted__():
            self._check_statistics()  # a fitted model without statistics, or half-updated ones: raise
        rows, map_shape = self._rows(X, continuing=continuing)
        count = self.n_images_seen_
        mean, scatter = (self.moments.mean, self.moments.scatter) if continuing else (None, None)
        if finalize:  # new statistics (copies): a failing finalisation keeps the old ones
            return self._install(*_merge(count, mean, scatter, rows, in_place=False), map_shape,
                                 keep_statistics=True)
        try:  # the chunk is checked: only an interruption (or running out of memory) can stop the update now
            merged = _merge(count, mean, scatter, rows, in_place=True)
        except BaseException:
            if continuing:  # some blocks of positions updated, others not: never continue from them
                self.moments.count.fill_(-1)
            raise
        self.moments.set(*merged)
        self.map_shape_ = map_shape
        self._configure_layers()
        return self

    @torch.no_grad()
    def merge_statistics(self, other: PositionalMahalanobis) -> PositionalMahalanobis:
        """Add ``other``'s running statistics (e.g. those of another process's shard of the data) to this model's,
        with Chan et al.'s pairwise update (``μ = μ_a + δ n_b/n``, ``M = M_a + M_b + δδᵀ n_a n_b/n``); the Gaussians
        are not recomputed (call :meth:`finalize`). A model without statistics takes ``other``'s; ``other`` without
        any adds nothing. Raises (changing nothing) for statistics of other channels, positions or map shape.
        Returns ``self``.

        Examples
        --------
        >>> maps = torch.rand(12, 3, 2, 2, dtype=torch.float64)
        >>> a = PositionalMahalanobis().double().partial_fit(maps[:5], finalize=False)
        >>> b = PositionalMahalanobis().double().partial_fit(maps[5:], finalize=False)
        >>> merged = a.merge_statistics(b).finalize()
        >>> bool(torch.allclose(merged(maps), PositionalMahalanobis().double().fit(maps)(maps)))
        True
        """
        if int(other.moments.count) < 0:
            other._check_statistics()  # raises: half-updated statistics
        if other.moments.empty:
            return self
        count_b, mean_b, scatter_b = other.n_images_seen_, other.moments.mean, other.moments.scatter
        if self.moments.empty:
            if self.__sklearn_is_fitted__() or int(self.moments.count) < 0:
                self._check_statistics()
            self.moments.set(count_b, mean_b.to(self.moments.mean.device, copy=True),
                             scatter_b.to(self.moments.mean.device, copy=True))
            self.map_shape_ = other.map_shape_
            self._configure_layers()
            return self
        self._check_statistics()
        mean_a, scatter_a, count_a = self.moments.mean, self.moments.scatter, self.n_images_seen_
        if mean_b.shape != mean_a.shape or (self.map_shape_ is not None and other.map_shape_ is not None
                                            and tuple(self.map_shape_) != tuple(other.map_shape_)):
            raise ValueError(f"{self._name}.merge_statistics: statistics of {tuple(mean_b.shape)} (positions, "
                             f"channels), maps {other.map_shape_}, do not match this model's {tuple(mean_a.shape)}, "
                             f"maps {self.map_shape_}.")
        mean_b, scatter_b = mean_b.to(mean_a.device), scatter_b.to(mean_a.device)
        total = count_a + count_b
        delta = mean_b - mean_a
        scatter = scatter_a + scatter_b + (count_a * count_b / total) * (delta[:, :, None] * delta[:, None])
        self.moments.set(total, mean_a + (count_b / total) * delta, scatter)
        return self

    @torch.no_grad()
    def finalize(self, *, keep_statistics: bool = True) -> PositionalMahalanobis:
        """Compute the Gaussians from the running statistics (after ``partial_fit(..., finalize=False)``), with the
        current ``reg``.

        ``keep_statistics=False`` frees them afterwards (``L·C²`` float64; ``state_dict()`` then holds empty
        placeholders); the model can then no longer ``partial_fit`` (it raises; ``fit`` starts over). A failure
        (fewer than 2 images, a singular covariance) leaves the model as it was. Returns ``self``.

        Examples
        --------
        >>> head = PositionalMahalanobis()
        >>> for chunk in torch.rand(9, 4, 2, 2).split(1):   # one image at a time
        ...     head = head.partial_fit(chunk, finalize=False)
        >>> head.finalize(keep_statistics=False).n_images_seen_, head.n_features_in_
        (0, 4)
        """
        self._validate_hyperparameters()
        self._check_statistics()
        return self._install(self.n_images_seen_, self.moments.mean, self.moments.scatter, self.map_shape_,
                             keep_statistics)

    def check_map_shape(self, map_shape: tuple[int, int]) -> None:
        """Raise a ``ValueError`` unless feature maps of ``map_shape`` (h, w) fit the fitted Gaussians: the same
        shape as the maps it was fitted on, or ``h·w`` positions when it was fitted on rows. ``DeepNeon`` calls it
        before handing the head location rows, whose count alone cannot tell 2 maps of 8x8 from 8 maps of 4x4."""
        self._check_fitted()
        h, w = int(map_shape[0]), int(map_shape[1])
        fitted = None if self.map_shape_ is None else tuple(self.map_shape_)
        if (fitted is not None and (h, w) != fitted) or h * w != self.distance.n_positions:
            expected = f"{fitted[0]}x{fitted[1]}" if fitted is not None else f"{self.distance.n_positions} positions"
            raise ValueError(f"{self._name} was fitted on feature maps of {expected}, one Gaussian per position; got "
                             f"maps of {h}x{w}. Use images of the size it was fitted on.")

    def forward(self, x: ArrayLike) -> torch.Tensor:
        """Scores per position: (n, h, w) for feature maps, (n·L,) for location rows."""
        self._check_fitted()
        scores = self.distance(self._input(x, name="x"))
        return self.root(scores) if self.sqrt else scores


register_model(PositionalMahalanobis, lambda beta, eps: PositionalMahalanobisActivationRule(),
               layers=(PositionalMahalanobisDistance, SquareRoot))
