"""PaDiM (Defard et al., *PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization*,
ICPR 2021) as a neural network.

    patch features   a = FeatureTaps(backbone, layers), a seeded random subset of channels     (linear)
    patch score      s_p = √((a_p − μ_p)ᵀ P_p (a_p − μ_p)),  P_p = (Σ_p + 0.01·I)⁻¹       PositionalMahalanobis
    image score      max_p s_p                                                               PatchPool("max")
    anomaly map      s upsampled bilinearly to the image, Gaussian blur σ = 4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from zennit.core import Composite

from ..core.validation import module_dtype_device
from ..models.gaussian import PositionalMahalanobis
from ._detector import AnomalyDetector
from ._layers import ChannelSelect

__all__ = ["PaDiM"]


class PaDiM(AnomalyDetector):
    """PaDiM: one Gaussian per patch position, fitted on normal images; the patch score is the Mahalanobis distance.

    Parameters
    ----------
    features : str, torch.nn.Module or FeatureTaps
        As :class:`~neon_attrib.anomaly.PatchCore`.
    layers : sequence of str, optional
        Default ``["layer1", "layer2", "layer3"]`` for ResNets (the paper), the ReLUs closing blocks 3 and 4 for a VGG
        conv base.
    weights : optional
        Weights of a backbone given by name.
    n_channels : int or None
        Size of the seeded random channel subset (paper: 100 for ResNet-18, 550 for Wide-ResNet-50); None or more
        than the tapped channels: all of them. Each position holds a (d, d) precision factor: memory grows as
        ``h·w·d²``.
    reg : float
        Added to each covariance's diagonal (0.01, the paper's, for features of ImageNet-normalised ResNets, whose
        variances are about 1).
    relative_reg : bool
        Add ``reg`` times the mean variance of the training features instead (the mean over positions and kept
        channels): the same regularisation whatever the features' scale. VGG-16 features of caffe inputs (0–255)
        have variances of 10³–10⁴, where 0.01 regularises nothing and a few positions with nearly singular
        covariances decide the image score.
    aggregate : int or None
        Local average pooling of each tap (default None: none, as the paper; 3 as PatchCore).
    reduce_to : int, optional
        Average-pool the concatenated channels to this many before the random subset.
    seed : int
        Seed of the channel subset.
    preprocessing, explain_target, sigma, composite, lrp_gamma, fast :
        As :class:`~neon_attrib.anomaly.PatchCore`.

    Notes
    -----
    The Gaussians are tied to the positions, so every image must have the size of the fitted ones (a clear error
    otherwise). The CNN rule of the head (:class:`~neon_attrib.core.rules.PositionalMahalanobisActivationRule`)
    propagates
    ``a_pi [P_p(a_p − μ_p)]_i`` and dissipates the rest of ``m_p``; a channel can receive negative relevance through
    the correlations.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = PaDiM("resnet18", n_channels=20).fit(torch.rand(8, 3, 32, 32), progress=False)
    >>> model(torch.rand(2, 3, 32, 32)).shape, model.patch_scores(torch.rand(2, 3, 32, 32)).shape
    (torch.Size([2]), torch.Size([2, 8, 8]))
    """

    _kind = "padim"

    def __init__(self, features: Any, layers: Sequence[str] | str | None = None, *, weights: Any = None,
                 n_channels: int | None = 100, reg: float = 0.01, relative_reg: bool = False,
                 aggregate: int | None = None,
                 reduce_to: int | None = None, seed: int = 0, preprocessing: Any = "torchvision",
                 explain_target: Any = "max", sigma: float | None = 4.0,
                 composite: str | Composite = "epsilon_gamma_box", lrp_gamma: float = 0.25, fast: bool = True):
        if n_channels is not None and (isinstance(n_channels, bool) or not isinstance(n_channels, int)
                                       or n_channels < 1):
            raise ValueError(f"The 'n_channels' parameter of PaDiM must be an int >= 1 or None. "
                             f"Got {n_channels!r} instead.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"The 'seed' parameter of PaDiM must be an int. Got {seed!r} instead.")
        if not isinstance(relative_reg, bool):
            raise ValueError(f"The 'relative_reg' parameter of PaDiM must be a bool. Got {relative_reg!r} instead.")
        head = PositionalMahalanobis(reg=reg, sqrt=True)
        head._validate_hyperparameters()
        super().__init__(features, layers, head, weights=weights, aggregate=aggregate, reduce_to=reduce_to,
                         preprocessing=preprocessing, explain_target=explain_target, sigma=sigma,
                         composite=composite, lrp_gamma=lrp_gamma, fast=fast, extra=ChannelSelect())
        self.n_channels = n_channels
        self.reg = reg
        self.relative_reg = relative_reg
        self.seed = seed

    @property
    def reg_(self) -> float:
        """The value added to every covariance's diagonal (``reg``, or ``reg`` × the mean variance with
        ``relative_reg``)."""
        self._check_fitted()
        return float(self.head.reg)

    @property
    def channels_(self) -> torch.Tensor:
        """(d,) the indices of the channels kept (of the concatenated taps)."""
        self._check_fitted()
        return self.features.select.index

    def _check_images(self, images: Any) -> None:
        super()._check_images(images)
        size = tuple(int(v) for v in self.image_size_)
        if self.is_fitted and size != (0, 0) and tuple(images.shape[-2:]) != size:
            raise ValueError(f"PaDiM was fitted on {size[0]}x{size[1]} images (one Gaussian per patch position); got "
                             f"{images.shape[-2]}x{images.shape[-1]}. Resize the images to {size[0]}x{size[1]}.")

    def _channel_subset(self, channels: int) -> torch.Tensor:
        if self.n_channels is None or self.n_channels >= channels:
            return torch.arange(channels)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(channels, generator=generator)[:self.n_channels].sort().values

    @torch.no_grad()
    def fit(self, images: Any, y: Any = None, *, batch_size: int = 16, progress: bool = True) -> PaDiM:
        """Fit one Gaussian per patch position on normal images (at least 2, all of one size). Returns ``self``.

        ``images`` as in :meth:`PatchCore.fit <neon_attrib.anomaly.PatchCore.fit>`. The batches are streamed: each
        batch's feature maps update per-position running statistics (count, mean, centred scatter; float64,
        :meth:`PositionalMahalanobis.partial_fit <neon_attrib.models.positional.PositionalMahalanobis.partial_fit>`), so
        memory grows with ``h·w·d²``, not with the number of images; the Gaussians (and ``relative_reg``'s mean
        variance) equal those of a fit on all feature maps at once. The statistics are freed after the fit. A failure
        leaves the model as it was.
        """
        from tqdm.auto import tqdm

        batches = self._batches(images, batch_size, "fit")
        dtype, device = module_dtype_device(self.taps)
        # streamed: each batch's maps go into the head's running statistics (L·d² float64), never all maps at once
        head = PositionalMahalanobis(reg=float(self.reg), sqrt=True).to(dtype=dtype, device=device)
        index = None
        for batch in tqdm(batches, desc="PaDiM.fit: features", unit="batch", disable=not progress):
            fmap = self.taps(batch.to(device=device, dtype=dtype))
            if index is None:
                index = self._channel_subset(fmap.shape[1]).to(fmap.device)
            head.partial_fit(fmap.index_select(1, index), finalize=False)
        n_images = head.n_images_seen_
        if self.relative_reg and n_images > 1:  # the mean per-element variance = the mean of the covariance diagonals
            head.reg = float(self.reg) * float(head.variances_.mean())
        n_locations = n_images * head.moments.mean.shape[0]
        head.finalize(keep_statistics=False)  # reg added here; the statistics (L·d² float64) are freed
        self.features.select.index = index
        self.head = head
        self.image_size_.copy_(torch.tensor(batches.size))
        self.n_locations_fit_ = int(n_locations)
        self.n_channels_ = int(head.n_features_in_)
        self._reset_calibration()
        return self

    def fit_head(self, rows: Any) -> PaDiM:
        """Not available: PaDiM's Gaussians need the patch positions; fit it on images with :meth:`fit`."""
        raise TypeError("PaDiM fits on images (the Gaussians are per patch position): call fit(images).")

    def extra_repr(self) -> str:
        return (f"n_channels={self.n_channels}, reg={self.reg}, relative_reg={self.relative_reg}, seed={self.seed}, "
                f"{super().extra_repr()}")
