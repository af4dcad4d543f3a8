"""PatchCore (Roth et al., *Towards Total Recall in Industrial Anomaly Detection*, CVPR 2022) as a neural network.

    patch features   a = FeatureTaps(backbone, layers): 3x3 average, bilinear upsampling, concatenation  (linear)
    patch score      s_p = min_j ‖a_p − m_j‖ over the coreset memory bank M          KNNOutlier(k = 1, sqrt)
    image score      max_p s_p  (× the paper's re-weighting factor, optionally)          PatchPool("max")
    anomaly map      s upsampled bilinearly to the image, Gaussian blur σ = 4

Every step is a module with an LRP rule, so :func:`~neon_attrib.explain` takes the image score (or the sum of the
patch scores, their excess over the normal level, or one patch) down to the pixels, and the conservation audit
checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from zennit.core import Composite

from ..core.functional import DEFAULT_CHUNK
from ..models.neighbors import KNNOutlier
from ._detector import AnomalyDetector
from ._layers import _first_occurrences, greedy_coreset

__all__ = ["PatchCore"]


class PatchCore(AnomalyDetector):
    """PatchCore: nearest-neighbour distance of every patch to a coreset memory bank of normal patches.

    Parameters
    ----------
    features : str, torch.nn.Module or FeatureTaps
        A backbone name of :func:`~neon_attrib.vision.backbone` (``"wide_resnet50_2"``, ``"resnet18"``,
        ``"vgg16"``, ...; random weights unless ``weights`` is given), a CNN module (e.g.
        :func:`~neon_attrib.vision.vgg16_features` with real weights) or a ready
        :class:`~neon_attrib.vision.FeatureTaps`.
    layers : sequence of str, optional
        Module names to tap (see :class:`~neon_attrib.vision.FeatureTaps`); default ``["layer2", "layer3"]`` for
        ResNets, the ReLUs closing blocks 3 and 4 for a VGG conv base (``["15", "22"]`` in VGG-16).
    weights : optional
        Weights of a backbone given by name (as :func:`~neon_attrib.vision.backbone`).
    coreset_ratio : float
        Share of the training patches kept in the memory bank, in (0, 1] (paper: 0.01–0.1), chosen by
        :func:`~neon_attrib.anomaly.greedy_coreset`; 1 keeps every distinct patch.
    projection_dim : int or None
        Random projection of the coreset search (default 128; None: none).
    reweight : bool
        The paper's image-score re-weighting: ``s* · (1 − softmax_j(‖a* − m_j‖)_0)`` over the
        ``reweight_neighbors`` memory items nearest to ``m*`` (the nearest item of the most anomalous patch ``a*``),
        as anomalib computes it. A factor per image: the explanation gives the re-weighted score to the same patch.
    reweight_neighbors : int
        ``b`` of the re-weighting (paper and anomalib: 9).
    aggregate : int or None
        Side of the local average pooling of each tap (3).
    reduce_to : int, optional
        Average-pool the concatenated channels to this many (the paper's fixed dimension).
    seed : int
        Seed of the coreset (projection and start).
    preprocessing : str or Preprocessing
        How images became network inputs: sets the input bounds of the first convolution's LRP rule
        (``"torchvision"``; ``"caffe"`` for the Keras VGG-16 weights).
    explain_target : {"max", "sum", "excess"} or (int, int)
        What ``model(images)`` returns and :func:`~neon_attrib.explain` explains (see :attr:`explain_target`).
    sigma : float or None
        σ of the anomaly map's Gaussian blur in pixels (4; None: no blur).
    chunk_size : int
        Memory items searched at once (bounded memory for large banks).
    composite, lrp_gamma, fast :
        LRP rules for the backbone, as in :class:`~neon_attrib.vision.deep.DeepNeon`.

    Attributes
    ----------
    memory_bank_ : torch.Tensor
        (M, C) the coreset of normal patch features.
    threshold_, score_min_, score_max_, tau_ : torch.Tensor
        Calibration (:meth:`calibrate`), NaN before.

    Examples
    --------
    >>> from neon_attrib import explain
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> normal = torch.rand(6, 3, 32, 32)
    >>> model = PatchCore("resnet18", coreset_ratio=0.5).fit(normal, progress=False)
    >>> images = torch.rand(3, 3, 32, 32)
    >>> model(images).shape, model.anomaly_map(images).shape, explain(model, images).shape
    (torch.Size([3]), torch.Size([3, 32, 32]), torch.Size([3, 3, 32, 32]))
    """

    _kind = "patchcore"

    def __init__(self, features: Any, layers: Sequence[str] | str | None = None, *, weights: Any = None,
                 coreset_ratio: float = 0.1, projection_dim: int | None = 128, reweight: bool = False,
                 reweight_neighbors: int = 9, aggregate: int | None = 3, reduce_to: int | None = None, seed: int = 0,
                 preprocessing: Any = "torchvision", explain_target: Any = "max", sigma: float | None = 4.0,
                 chunk_size: int = DEFAULT_CHUNK, composite: str | Composite = "epsilon_gamma_box",
                 lrp_gamma: float = 0.25, fast: bool = True):
        if isinstance(coreset_ratio, bool) or not isinstance(coreset_ratio, (int, float)) or \
                not 0 < coreset_ratio <= 1:
            raise ValueError(f"The 'coreset_ratio' parameter of PatchCore must be a float in (0, 1]. "
                             f"Got {coreset_ratio!r} instead.")
        if projection_dim is not None and (isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
                                           or projection_dim < 1):
            raise ValueError(f"The 'projection_dim' parameter of PatchCore must be an int >= 1 or None. "
                             f"Got {projection_dim!r} instead.")
        if not isinstance(reweight, bool):
            raise ValueError(f"The 'reweight' parameter of PatchCore must be a bool. Got {reweight!r} instead.")
        for value, name in ((reweight_neighbors, "reweight_neighbors"), (chunk_size, "chunk_size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"The '{name}' parameter of PatchCore must be an int >= 1. Got {value!r} instead.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"The 'seed' parameter of PatchCore must be an int. Got {seed!r} instead.")
        super().__init__(features, layers, self._new_head(chunk_size), weights=weights, aggregate=aggregate,
                         reduce_to=reduce_to, preprocessing=preprocessing, explain_target=explain_target,
                         sigma=sigma, composite=composite, lrp_gamma=lrp_gamma, fast=fast)
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.seed = seed
        self.chunk_size = chunk_size

    def saved_settings(self) -> dict[str, Any]:
        """The detector's settings (:meth:`AnomalyDetector.saved_settings`) and the image-score re-weighting."""
        return {**super().saved_settings(), "reweight": self.reweight, "reweight_neighbors": self.reweight_neighbors}

    @staticmethod
    def _new_head(chunk_size: int) -> KNNOutlier:
        # fused: the nearest item is searched in chunks, never an (n_patches, M) matrix beyond one chunk
        return KNNOutlier(n_neighbors=1, sqrt=True, fused=True, chunk_size=chunk_size)

    @property
    def memory_bank_(self) -> torch.Tensor:
        """(M, C): the memory bank (the coreset of the training patches)."""
        self._check_fitted()
        return self.head.support_

    # -- fitting -----------------------------------------------------------------------------------------------------
    def fit(self, images: Any, y: Any = None, *, batch_size: int = 16, progress: bool = True) -> PatchCore:
        """Build the memory bank from normal images: every patch feature, then the greedy coreset. Returns ``self``.

        Parameters
        ----------
        images : torch.Tensor, sequence or iterable
            Normal images, network inputs (preprocessed), all of one size: a tensor (n, C, H, W), a sequence of
            (C, H, W) images or an iterable of batches (a DataLoader yielding tensors or ``(images, labels)``).
        y : ignored
        batch_size : int
            Images per forward pass when ``images`` is a tensor or a sequence.
        progress : bool
            Show progress bars (features, coreset).

        Raises
        ------
        ValueError
            For no images, images of different sizes, or layers the images are too small for.
        """
        batches = self._batches(images, batch_size, "fit")
        rows = self.feature_rows(batches, batch_size=batch_size, progress=progress)
        self._fit_bank(rows, progress)
        self.image_size_.copy_(torch.tensor(batches.size))
        return self

    def fit_head(self, rows: Any) -> PatchCore:
        """Build the memory bank from patch features (N, C) computed before (:meth:`feature_rows`). Returns ``self``."""
        rows = torch.as_tensor(rows)
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"PatchCore.fit_head needs patch features of shape (N >= 1, C). Got {tuple(rows.shape)}.")
        self._fit_bank(rows, False)
        return self

    def _fit_bank(self, rows: torch.Tensor, progress: bool) -> None:
        if self.coreset_ratio >= 1:
            index = _first_occurrences(rows.cpu())
        else:
            count = max(1, math.ceil(self.coreset_ratio * rows.shape[0]))
            index = greedy_coreset(rows, count, projection_dim=self.projection_dim, seed=self.seed,
                                   progress=progress).cpu()
        self._fit_head_as(self._new_head(self.chunk_size), rows[index.to(rows.device)])
        self.n_locations_fit_ = int(rows.shape[0])
        self._reset_calibration()

    # -- the paper's re-weighting --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _image_weights(self, fmap: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        if not self.reweight:
            return None
        n = scores.shape[0]
        rows = self._rows(fmap.detach()).reshape(n, -1, fmap.shape[1])
        patch = rows[torch.arange(n, device=rows.device), scores.detach().flatten(1).argmax(1)]  # a*, (n, C)
        head, bank = self.head, self.head.distance.support
        _, nearest = head.kneighbors(patch, 1)  # m*
        count = min(self.reweight_neighbors, bank.shape[0])
        _, support = head.kneighbors(bank[nearest[:, 0]], count)  # the b items nearest to m* (m* first)
        distances = (patch.unsqueeze(1) - bank[support]).norm(dim=-1)
        return 1.0 - torch.softmax(distances, dim=1)[:, 0]

    def extra_repr(self) -> str:
        return (f"coreset_ratio={self.coreset_ratio}, projection_dim={self.projection_dim}, reweight={self.reweight}, "
                f"seed={self.seed}, {super().extra_repr()}")
