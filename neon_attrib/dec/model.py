"""Deep Embedded Clustering (Xie et al., 2016) on activation tensors of any shape.

The variant here follows the activation-clustering surrogate paper (SPEC §5): the embedding is normalised onto a
sphere of radius 8 and the Student-t kernel uses ``alpha = 100`` instead of DEC's 1, which makes the soft assignments
sparse.

Architecture (documented because the attributable heads in :mod:`neon_attrib.dec.heads` reuse the encoder):

* **vectors** ``(n, d)`` and any input that is neither a vector nor a feature map (flattened), an MLP as in Xie et
  al.: ``Flatten -> FeatureScale -> [Linear -> ReLU] * len(hidden_dims) -> Linear(embedding_dim) -> SphereNorm``,
  ``hidden_dims = (500, 500, 2000)`` by default, and the mirrored decoder.
* **feature maps** ``(n, C, H, W)``, a small convolutional encoder: ``FeatureScale`` (one positive scale per channel),
  an average pooling for maps larger than ``pool_to`` (16 by default: 32x32 maps are pooled 2x2), then stride-2
  3x3 convolutions with ReLU (channels from ``conv_channels``) until the map is at most 4x4, then
  ``Flatten -> Linear(dense_dim) -> ReLU -> Linear(embedding_dim) -> SphereNorm``. The decoder mirrors it with
  transposed convolutions that restore the exact input size.

``FeatureScale`` divides by the root mean square of each feature (vectors) or channel (maps) of the training data;
a positive per-feature scaling keeps zero at zero (so convolution padding means the same in both spaces) and is
explained exactly by passing relevance through.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn
from tqdm.auto import tqdm

from ..functional import student_t_logits

__all__ = ["DEC", "DECEncoder", "DECTrainingWarning", "DEFAULT_PRETRAIN_STEPS", "FeatureScale", "SphereNorm",
           "assignment_change", "student_t_assignment", "target_distribution"]

logger = logging.getLogger(__name__)


def student_t_assignment(z: torch.Tensor, centroids: torch.Tensor, alpha: float = 100.0) -> torch.Tensor:
    """Soft assignment of embeddings to centroids with a Student-t kernel (DEC's ``q``).

    ``q_k(z) = (1 + |z - mu_k|^2 / alpha)^(-(alpha + 1) / 2) / sum_k' (...)``, computed in log space (a softmax of
    ``-(alpha + 1) / 2 * log1p(|z - mu_k|^2 / alpha)``) so that large ``alpha`` or far points do not underflow.

    Parameters
    ----------
    z : torch.Tensor
        Embeddings, shape ``(n, d)``.
    centroids : torch.Tensor
        Centroids, shape ``(K, d)``.
    alpha : float
        Degrees of freedom of the Student-t kernel.

    Returns
    -------
    torch.Tensor
        ``q``, shape ``(n, K)``; every row sums to one.

    Examples
    --------
    >>> q = student_t_assignment(torch.zeros(1, 2), torch.tensor([[0.0, 0.0], [3.0, 4.0]]), alpha=1.0)
    >>> torch.allclose(q, torch.tensor([[26 / 27, 1 / 27]]))
    True
    """
    dist2 = torch.cdist(z, centroids.to(z.dtype)).pow(2)
    logits = student_t_logits(dist2, alpha)
    return torch.softmax(logits, dim=1)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's auxiliary target ``p_ik = (q_ik^2 / f_k) / sum_k' (q_ik'^2 / f_k')`` with ``f_k = sum_i q_ik``.

    Squaring sharpens the assignments and dividing by the soft cluster size ``f_k`` keeps large clusters from
    swallowing the rest.

    Parameters
    ----------
    q : torch.Tensor
        Soft assignments, shape ``(n, K)``.

    Returns
    -------
    torch.Tensor
        ``p``, shape ``(n, K)``, rows summing to one.
    """
    weight = q.pow(2) / q.sum(dim=0).clamp_min(torch.finfo(q.dtype).tiny)
    return weight / weight.sum(dim=1, keepdim=True)


def assignment_change(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Fraction of hard assignments that differ between two label vectors (DEC's stopping criterion)."""
    if previous.shape != current.shape:
        raise ValueError(f"Assignment vectors must have the same shape. Got {tuple(previous.shape)} and "
                         f"{tuple(current.shape)} instead.")
    return float((previous != current).float().mean()) if previous.numel() else 0.0


class FeatureScale(nn.Module):
    """Divide each feature (``dim = 1``) by a fixed positive scale, kept as a buffer.

    Parameters
    ----------
    scale : torch.Tensor
        Positive scales, shape ``(C,)``; broadcast over any trailing spatial dimensions.
    """

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if scale.ndim != 1 or not bool((scale > 0).all()):
            raise ValueError("The 'scale' of FeatureScale must be a 1-d tensor of positive values.")
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x / self.scale.view(shape)


class SphereNorm(nn.Module):
    """Project onto the sphere of radius ``radius``: ``z = radius * e / |e|`` (row-wise).

    Parameters
    ----------
    radius : float
        Radius of the sphere (8 in the activation-clustering paper).
    eps : float
        Lower bound on ``|e|`` to avoid dividing by zero.
    """

    def __init__(self, radius: float = 8.0, eps: float = 1e-12):
        super().__init__()
        self.radius = float(radius)
        self.eps = float(eps)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.radius * e / e.norm(dim=1, keepdim=True).clamp_min(self.eps)

    def extra_repr(self) -> str:
        return f"radius={self.radius}"


class DECEncoder(nn.Sequential):
    """The DEC encoder, an ``nn.Sequential`` from activations to the sphere (last module: :class:`SphereNorm`)."""


def _conv_out(size: int) -> int:
    # 3x3 kernel, stride 2, padding 1
    return (size - 1) // 2 + 1


def _build_conv(in_shape: tuple[int, ...], embedding_dim: int, radius: float, scale: torch.Tensor,
                conv_channels: Sequence[int], dense_dim: int,
                pool_to: int | None) -> tuple[DECEncoder, nn.Sequential, int]:
    c, h, w = in_shape
    enc: list[nn.Module] = [FeatureScale(scale)]
    pool = 1
    if pool_to is not None and max(h, w) > pool_to:
        pool = -(-max(h, w) // pool_to)
        enc.append(nn.AvgPool2d(pool, ceil_mode=True))
        h, w = -(-h // pool), -(-w // pool)
    sizes = [(h, w)]
    chans = [c]
    i = 0
    while max(sizes[-1]) > 4 or i == 0:
        out_c = conv_channels[min(i, len(conv_channels) - 1)]
        enc += [nn.Conv2d(chans[-1], out_c, 3, stride=2, padding=1), nn.ReLU()]
        sizes.append((_conv_out(sizes[-1][0]), _conv_out(sizes[-1][1])))
        chans.append(out_c)
        i += 1
    flat = chans[-1] * sizes[-1][0] * sizes[-1][1]
    enc += [nn.Flatten(), nn.Linear(flat, dense_dim), nn.ReLU(), nn.Linear(dense_dim, embedding_dim),
            SphereNorm(radius)]
    dec: list[nn.Module] = [nn.Linear(embedding_dim, dense_dim), nn.ReLU(), nn.Linear(dense_dim, flat), nn.ReLU(),
                            nn.Unflatten(1, (chans[-1], *sizes[-1]))]
    for j in range(len(chans) - 1, 0, -1):
        target = sizes[j - 1]
        pad = tuple(t - (2 * s - 1) for t, s in zip(target, sizes[j]))
        dec.append(nn.ConvTranspose2d(chans[j], chans[j - 1], 3, stride=2, padding=1, output_padding=pad))
        if j > 1:
            dec.append(nn.ReLU())
    return DECEncoder(*enc), nn.Sequential(*dec), pool


def _build_mlp(in_shape: tuple[int, ...], embedding_dim: int, radius: float, scale: torch.Tensor,
               hidden_dims: Sequence[int]) -> tuple[DECEncoder, nn.Sequential]:
    d = int(np.prod(in_shape))
    dims = [d, *hidden_dims]
    enc: list[nn.Module] = [nn.Flatten(), FeatureScale(scale)]
    for a, b in zip(dims[:-1], dims[1:]):
        enc += [nn.Linear(a, b), nn.ReLU()]
    enc += [nn.Linear(dims[-1], embedding_dim), SphereNorm(radius)]
    dec: list[nn.Module] = []
    back = [embedding_dim, *reversed(dims)]
    for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
        dec.append(nn.Linear(a, b))
        if i < len(back) - 2:
            dec.append(nn.ReLU())
    dec.append(nn.Unflatten(1, in_shape))
    return DECEncoder(*enc), nn.Sequential(*dec)


def _scaled(x: torch.Tensor, scale_mod: FeatureScale, conv: bool, pool: int = 1) -> torch.Tensor:
    # the reconstruction target: the input as the encoder's first layers see it (scaled, pooled)
    if conv:
        x = scale_mod(x)
        return nn.functional.avg_pool2d(x, pool, ceil_mode=True) if pool > 1 else x
    return scale_mod(x.reshape(x.shape[0], -1)).reshape(x.shape)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DECTrainingWarning(UserWarning):
    """A DEC model trained badly: unconverged autoencoder, empty or dominant clusters, or harmful fine-tuning.

    The same findings are stored in ``diagnostics_["warnings"]`` of the fitted estimator, so they can be read (or the
    warning silenced with ``warnings.simplefilter("ignore", DECTrainingWarning)``) without losing them.
    """


#: Pretraining steps when neither ``pretrain_steps`` nor ``pretrain_epochs`` is given.
DEFAULT_PRETRAIN_STEPS = 1000

# Diagnostic thresholds (documented in DEC's Notes section).
_MIN_STEPS = 100       # fewer pretraining steps are never taken as converged (plateaus can precede further drops)
_WINDOW = 0.1          # the last two windows of this fraction of the pretraining steps are compared
_STILL_FALLING = 0.05  # ... and the autoencoder is unconverged when the last one is more than 5 % lower
_MIN_GAIN = 0.9        # ... or when the final loss is not below 90 % of the initial loss
_TINY_CLUSTER = 0.01   # a cluster with fewer than 1 % of the points is "tiny" (not used)
_QUALITY_TOL = 0.01    # fine-tuning "lowers the quality" when purity / silhouette drop by more than this


def _nearest(z: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    # exactly the computation of DEC.predict (argmax of q) so that labels and predictions agree
    return student_t_assignment(z, centers.to(z.device), alpha).argmax(dim=1)


def _centroid_silhouette(z: torch.Tensor, centers: torch.Tensor) -> float:
    """Simplified (centroid) silhouette: mean over points of ``(b - a) / max(a, b)``, in [0, 1].

    ``a`` is the distance to the nearest centroid and ``b`` to the second nearest (Hruschka et al., 2004).
    """
    two = torch.cdist(z.double(), centers.double()).topk(2, dim=1, largest=False).values
    a, b = two[:, 0], two[:, 1]
    return float(((b - a) / torch.maximum(a, b).clamp_min(torch.finfo(torch.float64).tiny)).mean())


def _purity(labels: torch.Tensor, y: torch.Tensor, n_clusters: int) -> float:
    """Fraction of points whose class is the majority class of their cluster."""
    n_classes = int(y.max()) + 1
    counts = torch.zeros(n_clusters, n_classes, dtype=torch.float64)
    counts.index_put_((labels, y), torch.ones(y.shape[0], dtype=torch.float64), accumulate=True)
    return float(counts.max(dim=1).values.sum() / max(1, y.shape[0]))


def _used_clusters(sizes: Sequence[int], n: int) -> int:
    return sum(1 for s in sizes if s > 0 and s >= _TINY_CLUSTER * n)


def _cluster_problems(sizes: Sequence[int], n: int) -> str | None:
    """A sentence on empty, tiny (< 1 %) or dominant clusters, or None when the sizes look healthy.

    A cluster is dominant when it holds more than ``(1 + 1/K) / 2`` of the points: more than halfway from its fair
    share ``1/K`` to all of them (75 % for K = 2, 53 % for K = 15).
    """
    k = len(sizes)
    parts = []
    empty = [c for c, s in enumerate(sizes) if s == 0]
    tiny = [c for c, s in enumerate(sizes) if 0 < s < _TINY_CLUSTER * n]
    if empty:
        parts.append(f"{len(empty)} of {k} clusters are empty ({empty})")
    if tiny:
        parts.append(f"{len(tiny)} of {k} clusters hold fewer than 1% of the points ({tiny})")
    largest = int(np.argmax(sizes))
    if n and sizes[largest] / n > (1 + 1 / k) / 2:
        parts.append(f"cluster {largest} holds {sizes[largest] / n:.0%} of the points")
    if not parts:
        return None
    return f"{'; '.join(parts)} (cluster sizes {list(sizes)})"


def _is_int(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


class _FrozenAfterFitMixin:
    """Refuse to change constructor parameters of a fitted estimator that only take effect in ``fit``.

    Parameters named in ``_settable_after_fit`` may change at any time (they take effect at once); every other
    constructor parameter raises an ``AttributeError`` that says to refit, so that ``get_params`` always describes the
    fitted model. Unpickling and ``copy.deepcopy`` restore ``__dict__`` directly and are not affected.
    """

    _settable_after_fit: frozenset[str] = frozenset()
    _fitted_marker: str = ""

    def __setattr__(self, name: str, value) -> None:
        if (not name.startswith("_") and not name.endswith("_") and name not in self._settable_after_fit
                and self._fitted_marker in self.__dict__ and name in self._get_param_names()):
            current = self.__dict__.get(name)
            if value is not current:
                cls = type(self).__name__
                raise AttributeError(
                    f"Cannot set the '{name}' parameter of a fitted {cls} (it is {current!r}; got {value!r}): it only "
                    f"takes effect in 'fit', and the fitted model was trained with the current value. Refit a new "
                    f"estimator instead, e.g. sklearn.base.clone(estimator).set_params({name}=...).fit(...).")
        super().__setattr__(name, value)

    def __sklearn_is_fitted__(self) -> bool:
        return self._fitted_marker in self.__dict__


class DEC(_FrozenAfterFitMixin, BaseEstimator):
    """Deep Embedded Clustering with embeddings on a sphere and a sparse Student-t assignment.

    Fitting runs three stages: (1) pretrain an autoencoder on the activations by mean squared reconstruction error
    (of the feature-scaled input) for a fixed number of optimizer **steps**, (2) k-means (scikit-learn, ``n_init``
    restarts) on the normalised embeddings gives the initial centroids, (3) minimise ``KL(P || Q)`` over encoder and
    centroids, recomputing the target ``P`` on the whole training set every ``update_interval`` steps and stopping
    when fewer than a fraction ``tol`` of the hard assignments changed since the previous refresh (or after
    ``max_iter`` steps). Each stage is checked (see Notes); problems are stored in :attr:`diagnostics_` and reported
    with a :class:`DECTrainingWarning`.

    A scikit-learn estimator: parameters are stored as given and validated in :meth:`fit`, ``get_params`` /
    ``set_params`` / ``sklearn.base.clone`` work, fitted state ends in ``_``. Parameters that shape the fitted model
    cannot be changed after fitting (an ``AttributeError`` says to refit); only ``progress`` can.

    Parameters
    ----------
    n_clusters : int
        Number of clusters ``K`` (>= 2).
    embedding_dim : int
        Dimension of the embedding space ``V``.
    alpha : float
        Degrees of freedom of the Student-t kernel (100 in the paper; DEC uses 1).
    radius : float
        Radius of the sphere the embeddings are normalised to.
    seed : int or None
        Seed for weight initialisation, shuffling and k-means. ``None`` is not reproducible.
    architecture : {"auto", "mlp", "conv"}
        ``"auto"`` uses the conv encoder for 4-d input ``(n, C, H, W)`` and the MLP otherwise.
    hidden_dims : sequence of int
        Hidden widths of the MLP encoder.
    conv_channels : sequence of int
        Channels of the successive stride-2 convolutions of the conv encoder (the last is repeated if needed).
    dense_dim : int
        Width of the dense layer between the convolutions and the embedding.
    pool_to : int or None
        Feature maps larger than ``pool_to`` (height or width) are first average-pooled by the smallest integer factor
        that brings them to at most ``pool_to``; the autoencoder then reconstructs the pooled map. This quarters the
        cost on 32x32 maps (CPU budget); ``None`` disables it.
    pretrain_steps : int or None
        Optimizer steps (minibatches) of autoencoder pretraining; 0 skips pretraining. ``None`` (with
        ``pretrain_epochs=None``) means :data:`DEFAULT_PRETRAIN_STEPS` (1000), whatever the size of the data.
    pretrain_epochs : int or None
        Alternative to ``pretrain_steps``: ``pretrain_epochs * ceil(n_samples / batch_size)`` steps. Set at most one
        of the two.
    max_iter : int
        Maximum number of fine-tuning steps (minibatches).
    update_interval : int
        Steps between refreshes of the target distribution ``P`` (``T``).
    tol : float
        Stop fine-tuning when the fraction of changed hard assignments between refreshes is below ``tol``.
    batch_size : int
        Minibatch size for all stages (and the chunk size of :meth:`transform`).
    lr : float
        Adam learning rate for pretraining.
    finetune_lr : float
        Adam learning rate for fine-tuning.
    reconstruction_weight : float
        Weight of the reconstruction loss kept during fine-tuning (0 is DEC, > 0 is IDEC of Guo et al., 2017).
    n_init : int
        Number of k-means restarts for the centroid initialisation.
    keep_best : bool
        If fine-tuning lowers the cluster quality (see Notes), keep the k-means initialisation (encoder weights and
        centroids from before fine-tuning) instead of the fine-tuned model. Either way a warning is issued.
    device : str, torch.device or None
        Where to train (``None``: CUDA when available, else CPU). Data stays where it is and is moved per batch.
    progress : bool
        Show tqdm progress bars (may be changed after fitting).

    Attributes
    ----------
    encoder_ : DECEncoder
        Trained encoder (eval mode, on the training device; see :meth:`to`), ending in :class:`SphereNorm`.
    decoder_ : torch.nn.Sequential
        Trained decoder (from the sphere back to the feature-scaled input).
    cluster_centers_ : torch.Tensor
        Centroids, shape ``(n_clusters, embedding_dim)`` (CPU; a plain tensor, never a parameter).
    labels_ : torch.Tensor
        Hard assignments of the training data.
    input_shape_ : tuple of int
        Shape of one training example.
    n_features_in_ : int
        Number of values in one training example.
    architecture_ : {"mlp", "conv"}
        The encoder that was built.
    mean_evidence_ : float
        Mean over the training data of the assigned cluster's k-means evidence
        ``min_{k != c} |z - mu_k|^2 - |z - mu_c|^2``; its inverse is the default soft-min sharpness of the
        attributable heads.
    n_iter_ : int
        Fine-tuning steps run.
    converged_ : bool
        Whether the tolerance stop triggered before ``max_iter``.
    history_ : dict
        ``"pretrain_loss"`` per pretraining step (minibatch loss), ``"delta_label"`` and ``"kl"`` per refresh of
        ``P``.
    diagnostics_ : dict
        The training checks (see Notes): ``pretrain_steps``, ``pretrain_initial_loss``, ``pretrain_final_loss``,
        ``pretrain_last_decrease``, ``pretrain_converged`` (``None`` when pretraining was skipped),
        ``cluster_sizes_init``, ``cluster_sizes_finetuned``, ``cluster_sizes`` (of the kept model),
        ``quality_measure`` (``"purity"`` with ``y``, else ``"silhouette"``), ``quality_init``,
        ``quality_finetuned``, ``finetuning_kept`` (``False`` when ``keep_best`` reverted to the k-means
        initialisation) and ``warnings`` (the messages, also issued as :class:`DECTrainingWarning`).

    Notes
    -----
    The checks behind :class:`DECTrainingWarning`:

    * **Unconverged autoencoder.** With ``w = max(1, steps // 10)``, the mean minibatch loss of the last ``w``
      pretraining steps is compared with that of the ``w`` steps before: a decrease of more than 5 % means the loss
      is still falling fast. A final loss (mean of the last ``w`` steps) not below 90 % of the initial one (the first
      minibatch, before any update) means the autoencoder learned almost nothing. Fewer than 100 steps never count
      as converged: reconstruction losses often plateau for a while and then fall again.
    * **Collapsed clusters**, after the k-means initialisation and after fine-tuning: empty clusters, clusters with
      fewer than 1 % of the points, or one cluster holding more than ``(1 + 1/K) / 2`` of them.
    * **Harmful fine-tuning.** The quality of the clustering of the training data is measured before and after
      fine-tuning: the class purity of the clusters when labels ``y`` are passed to :meth:`fit` (used for nothing
      else), otherwise the centroid silhouette ``mean (b - a) / max(a, b)`` (``a``, ``b``: distances to the nearest
      and second-nearest centroid) in the respective embedding. Fine-tuning lowered the quality when it drops by more
      than 0.01 or fewer clusters hold at least 1 % of the points; ``keep_best`` then restores the k-means
      initialisation (a copy of the encoder and decoder weights is kept during fine-tuning for that).

    Examples
    --------
    >>> X = torch.cat([torch.randn(100, 8) + 6 * torch.eye(8)[i] for i in range(3)])
    >>> dec = DEC(n_clusters=3, embedding_dim=4, hidden_dims=(16,), pretrain_steps=300, max_iter=20, seed=0,
    ...           progress=False).fit(X)
    >>> dec.predict(X).shape
    torch.Size([300])
    >>> dec.diagnostics_["pretrain_converged"], dec.diagnostics_["warnings"]
    (True, [])
    """

    _settable_after_fit = frozenset({"progress"})
    _fitted_marker = "cluster_centers_"

    def __init__(
        self,
        n_clusters: int = 15,
        embedding_dim: int = 20,
        alpha: float = 100.0,
        radius: float = 8.0,
        seed: int | None = None,
        *,
        architecture: str = "auto",
        hidden_dims: Sequence[int] = (500, 500, 2000),
        conv_channels: Sequence[int] = (32, 64, 64),
        dense_dim: int = 256,
        pool_to: int | None = 16,
        pretrain_steps: int | None = None,
        pretrain_epochs: int | None = None,
        max_iter: int = 2000,
        update_interval: int = 100,
        tol: float = 1e-3,
        batch_size: int = 256,
        lr: float = 1e-3,
        finetune_lr: float = 1e-4,
        reconstruction_weight: float = 0.0,
        n_init: int = 10,
        keep_best: bool = True,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        self.n_clusters = n_clusters
        self.embedding_dim = embedding_dim
        self.alpha = alpha
        self.radius = radius
        self.seed = seed
        self.architecture = architecture
        self.hidden_dims = hidden_dims
        self.conv_channels = conv_channels
        self.dense_dim = dense_dim
        self.pool_to = pool_to
        self.pretrain_steps = pretrain_steps
        self.pretrain_epochs = pretrain_epochs
        self.max_iter = max_iter
        self.update_interval = update_interval
        self.tol = tol
        self.batch_size = batch_size
        self.lr = lr
        self.finetune_lr = finetune_lr
        self.reconstruction_weight = reconstruction_weight
        self.n_init = n_init
        self.keep_best = keep_best
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------------ validation
    def _name(self) -> str:
        return type(self).__name__

    def _check_params(self, owner: str | None = None, aliases: Mapping[str, str] | None = None) -> None:
        """Validate every parameter; errors name ``owner`` (default: this class) and ``aliases[param]``."""
        name = owner or self._name()
        aliases = aliases or {}

        def fail(param: str, expected: str, exc: type[Exception] = ValueError) -> None:
            raise exc(f"The '{aliases.get(param, param)}' parameter of {name} must be {expected}. "
                      f"Got {getattr(self, param)!r} instead.")

        def _int(param: str, low: int, optional: bool = False) -> None:
            value = getattr(self, param)
            if not (optional and value is None) and not _is_int(value, low):
                fail(param, f"an int >= {low}" + (" or None" if optional else ""))

        def _pos(param: str, allow_zero: bool = False) -> None:
            value = getattr(self, param)
            ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                fail(param, f"a float {'>= 0' if allow_zero else '> 0'}")

        _int("n_clusters", 2)
        _int("embedding_dim", 1)
        _int("dense_dim", 1)
        _int("pretrain_steps", 0, optional=True)
        _int("pretrain_epochs", 0, optional=True)
        _int("max_iter", 0)
        _int("update_interval", 1)
        _int("batch_size", 1)
        _int("n_init", 1)
        _int("pool_to", 1, optional=True)
        _pos("alpha")
        _pos("radius")
        _pos("lr")
        _pos("finetune_lr")
        _pos("tol", allow_zero=True)
        _pos("reconstruction_weight", allow_zero=True)
        if self.pretrain_steps is not None and self.pretrain_epochs is not None:
            raise ValueError(f"The '{aliases.get('pretrain_steps', 'pretrain_steps')}' and "
                             f"'{aliases.get('pretrain_epochs', 'pretrain_epochs')}' parameters of {name} are "
                             f"alternatives; set at most one of them. Got pretrain_steps={self.pretrain_steps!r} and "
                             f"pretrain_epochs={self.pretrain_epochs!r} instead.")
        if not isinstance(self.architecture, str) or self.architecture not in ("auto", "mlp", "conv"):
            fail("architecture", "one of 'auto', 'mlp', 'conv'")
        for param in ("hidden_dims", "conv_channels"):
            value = getattr(self, param)
            if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0
                    or not all(_is_int(v, 1) for v in value)):
                fail(param, "a non-empty sequence of positive ints")
        if self.seed is not None and not _is_int(self.seed, -(2**63)):
            fail("seed", "an int or None", TypeError)
        if not isinstance(self.keep_best, (bool, np.bool_)):
            fail("keep_best", "a bool", TypeError)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                fail("device", "a torch.device, a device string such as 'cpu' or 'cuda:0', or None")

    def _check_input(self, X, *, fitting: bool) -> torch.Tensor:
        name = self._name()
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X)
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{name} expects X as a torch.Tensor or numpy.ndarray. Got {type(X).__name__} instead.")
        if X.is_complex() or not (X.is_floating_point() or X.dtype in (torch.uint8, torch.int8, torch.int16,
                                                                           torch.int32, torch.int64)):
            raise TypeError(f"{name} expects real-valued X. Got dtype {X.dtype} instead.")
        if X.ndim < 2:
            raise ValueError(f"{name} expects X of shape (n_samples, ...) with at least 2 dimensions. "
                             f"Got shape {tuple(X.shape)} instead.")
        if not X.is_floating_point():
            X = X.float()
        if not bool(torch.isfinite(X).all()):
            raise ValueError(f"X contains NaN or infinity; {name} needs finite activations.")
        if fitting:
            if X.shape[0] < self.n_clusters:
                raise ValueError(f"{name} needs at least n_clusters={self.n_clusters} samples. "
                                 f"Got {X.shape[0]} instead.")
        else:
            self._check_fitted()
            if tuple(X.shape[1:]) != self.input_shape_:
                raise ValueError(f"X has samples of shape {tuple(X.shape[1:])}, but {name} was fitted with shape "
                                 f"{self.input_shape_}.")
        return X

    def _check_y(self, y, n: int) -> torch.Tensor | None:
        if y is None:
            return None
        name = self._name()
        try:
            y_t = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"The labels y of {name}.fit must be an array of ints. Got {type(y).__name__}.") from exc
        if y_t.ndim != 1 or y_t.shape[0] != n:
            raise ValueError(f"The labels y of {name}.fit must have shape ({n},) like X. "
                             f"Got shape {tuple(y_t.shape)} instead.")
        if y_t.is_floating_point() or y_t.is_complex() or y_t.dtype == torch.bool:
            raise ValueError(f"The labels y of {name}.fit must be non-negative ints. Got dtype {y_t.dtype} instead.")
        if n and int(y_t.min()) < 0:
            raise ValueError(f"The labels y of {name}.fit must be non-negative ints. Got minimum {int(y_t.min())} "
                             f"instead.")
        return y_t.long()

    def _check_fitted(self) -> None:
        if "cluster_centers_" not in self.__dict__:
            raise ValueError(f"This {self._name()} instance is not fitted yet. Call 'fit' first.")

    # ------------------------------------------------------------------ helpers
    def _batches(self, n: int, generator: torch.Generator | None):
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield order[start:start + self.batch_size]

    @torch.no_grad()
    def _embed(self, encoder: nn.Module, X: torch.Tensor, device: torch.device) -> torch.Tensor:
        was_training = encoder.training
        encoder.eval()
        out = [encoder(X[idx].to(device, torch.float32)).cpu() for idx in self._batches(X.shape[0], None)]
        encoder.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.embedding_dim)

    def _scale(self, X: torch.Tensor, conv: bool) -> torch.Tensor:
        dims = [0, *range(2, X.ndim)] if conv else [0]
        flat = X if conv else X.reshape(X.shape[0], -1)
        rms = flat.double().pow(2).mean(dim=dims).sqrt().float()
        # features that are always zero keep scale one
        return torch.where(rms > 0, rms, torch.ones_like(rms))

    def _n_pretrain_steps(self, n: int) -> int:
        if self.pretrain_steps is not None:
            return int(self.pretrain_steps)
        if self.pretrain_epochs is not None:
            return int(self.pretrain_epochs) * -(-n // int(self.batch_size))
        return DEFAULT_PRETRAIN_STEPS

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> DEC:
        """Fit the autoencoder, initialise centroids with k-means and fine-tune with ``KL(P || Q)``.

        Everything is validated before training, and the fitted state is assigned only at the end: a failed ``fit``
        leaves a previously fitted estimator unchanged.

        Parameters
        ----------
        X : torch.Tensor or numpy.ndarray
            Activations, shape ``(n_samples, ...)``: vectors, feature maps ``(n, C, H, W)`` or anything else (that is
            flattened). Stays on its device; minibatches move to ``device``.
        y : array-like of int, optional
            Class labels, used **only** to measure the purity of the clusters before and after fine-tuning (the
            harmful fine-tuning check, see Notes); training is unsupervised either way.

        Returns
        -------
        DEC
            ``self``.

        Raises
        ------
        ValueError
            Invalid parameters, fewer samples than clusters, non-finite values, labels of the wrong shape.
        TypeError
            ``X`` is not a tensor or array, or a parameter has the wrong type.

        Warns
        -----
        DECTrainingWarning
            Unconverged autoencoder, empty / tiny / dominant clusters, or fine-tuning that lowered the cluster quality
            (details in :attr:`diagnostics_`).
        """
        return self._fit(X, y, emit=True)

    def _fit(self, X, y=None, *, emit: bool = True) -> DEC:
        """``fit``; with ``emit=False`` the training warnings are only stored (the surrogate re-issues them)."""
        self._check_params()
        X = self._check_input(X, fitting=True)
        y_t = self._check_y(y, X.shape[0])
        device = _resolve_device(self.device)
        conv = self.architecture == "conv" or (self.architecture == "auto" and X.ndim == 4)
        if conv and X.ndim != 4:
            raise ValueError(f"The 'architecture' parameter of {self._name()} is 'conv', which needs input of shape "
                             f"(n, C, H, W). Got X of shape {tuple(X.shape)} instead.")
        n = X.shape[0]
        in_shape = tuple(X.shape[1:])
        scale = self._scale(X, conv)
        n_pretrain = self._n_pretrain_steps(n)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            generator = torch.Generator()
            generator.manual_seed(int(self.seed) if self.seed is not None else int(torch.seed() % 2**62))
            pool = 1
            if conv:
                encoder, decoder, pool = _build_conv(in_shape, self.embedding_dim, self.radius, scale,
                                                     self.conv_channels, self.dense_dim, self.pool_to)
            else:
                encoder, decoder = _build_mlp(in_shape, self.embedding_dim, self.radius, scale, self.hidden_dims)
            encoder.to(device)
            decoder.to(device)
            history: dict[str, list[float]] = {"pretrain_loss": [], "delta_label": [], "kl": []}
            history["pretrain_loss"] = self._pretrain(X, encoder, decoder, generator, device, conv, pool, n_pretrain)
            z_init = self._embed(encoder, X, device)
            centers_init = self._init_centroids(z_init)
            snapshot = None
            if self.keep_best and self.max_iter > 0:  # the decoder only changes in fine-tuning with reconstruction
                trained = (encoder, decoder) if self.reconstruction_weight > 0 else (encoder,)
                snapshot = [(m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m in trained]
            centers, n_iter, converged = self._finetune(X, encoder, decoder, centers_init, generator, device, conv,
                                                        pool, history)
        z = self._embed(encoder, X, device)
        diagnostics, message = self._pretrain_diagnostics(history["pretrain_loss"])
        messages = [message] if message else []
        labels_init = _nearest(z_init, centers_init, self.alpha)
        labels = _nearest(z, centers, self.alpha)
        sizes_init = torch.bincount(labels_init, minlength=self.n_clusters).tolist()
        sizes = torch.bincount(labels, minlength=self.n_clusters).tolist()
        if y_t is not None:
            measure = "purity"
            q_init, q_final = _purity(labels_init, y_t, self.n_clusters), _purity(labels, y_t, self.n_clusters)
        else:
            measure = "silhouette"
            q_init, q_final = _centroid_silhouette(z_init, centers_init), _centroid_silhouette(z, centers)
        problem = _cluster_problems(sizes_init, n)
        if problem:
            messages.append(f"after the k-means initialisation, {problem}. Try fewer clusters (n_clusters), a longer "
                            f"pretraining (pretrain_steps) or check the activations.")
        kept = True
        if n_iter > 0:
            problem = _cluster_problems(sizes, n)
            if problem:
                messages.append(f"after fine-tuning, {problem}. Try a lower finetune_lr, fewer fine-tuning steps "
                                f"(max_iter) or fewer clusters.")
            used_init, used = _used_clusters(sizes_init, n), _used_clusters(sizes, n)
            if q_final < q_init - _QUALITY_TOL or used < used_init:
                kept = not self.keep_best
                if not kept:  # back to the state k-means was run on (weights copied before fine-tuning)
                    for module, state in snapshot:
                        module.load_state_dict(state)
                    z, centers, labels = z_init, centers_init, labels_init
                what = ("kept the k-means initialisation instead (keep_best=True)" if not kept
                        else "kept the fine-tuned model (keep_best=False)")
                messages.append(f"fine-tuning lowered the cluster quality ({measure} {q_init:.3f} after k-means, "
                                f"{q_final:.3f} after fine-tuning; {used_init} -> {used} clusters with at least 1% of "
                                f"the points); {what}. Try a lower finetune_lr, fewer steps (max_iter) or "
                                f"reconstruction_weight > 0.")
        diagnostics.update({
            "cluster_sizes_init": sizes_init,
            "cluster_sizes_finetuned": sizes,
            "cluster_sizes": torch.bincount(labels, minlength=self.n_clusters).tolist(),
            "quality_measure": measure,
            "quality_init": q_init,
            "quality_finetuned": q_final,
            "finetuning_kept": kept,
            "warnings": messages,
        })
        if emit:
            for message in messages:
                warnings.warn(f"{self._name()}: {message}", DECTrainingWarning, stacklevel=3)
        encoder.eval()
        decoder.eval()
        # margin of the assigned cluster, min_{k != c} |z - mu_k|^2 - |z - mu_c|^2 (the k-means evidence of SPEC §3)
        two = torch.cdist(z.double(), centers.double()).pow(2).topk(2, dim=1, largest=False).values
        # all state is assigned here, after everything that can fail
        self.encoder_ = encoder
        self.decoder_ = decoder
        self.input_shape_ = in_shape
        self.n_features_in_ = int(np.prod(in_shape))
        self.architecture_ = "conv" if conv else "mlp"
        self.n_iter_ = n_iter
        self.converged_ = converged
        self.history_ = history
        self.diagnostics_ = diagnostics
        self.labels_ = labels
        self.mean_evidence_ = float((two[:, 1] - two[:, 0]).mean())
        self.cluster_centers_ = centers.detach().cpu()
        return self

    def _pretrain(self, X, encoder, decoder, generator, device, conv: bool, pool: int, n_steps: int) -> list[float]:
        """Adam on the reconstruction MSE for ``n_steps`` minibatches; returns the loss of every step."""
        losses: list[float] = []
        if n_steps == 0:
            return losses
        params = list(encoder.parameters()) + list(decoder.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        scale_mod = next(m for m in encoder if isinstance(m, FeatureScale))
        encoder.train()
        decoder.train()
        n = X.shape[0]
        batches = iter(())
        bar = tqdm(total=n_steps, desc=f"{self._name()} pretrain", disable=not self.progress, leave=False)
        for step in range(n_steps):
            try:
                idx = next(batches)
            except StopIteration:  # a new shuffled pass over the data (drawn only when needed: reproducible)
                batches = self._batches(n, generator)
                idx = next(batches)
            xb = X[idx].to(device, torch.float32)
            target = _scaled(xb, scale_mod, conv, pool)
            loss = nn.functional.mse_loss(decoder(encoder(xb)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        logger.info("%s: pretrained the autoencoder for %d steps (loss %.5f -> %.5f).", self._name(), n_steps,
                    losses[0], losses[-1])
        return losses

    @staticmethod
    def _pretrain_diagnostics(losses: Sequence[float]) -> tuple[dict, str | None]:
        """The convergence check of the pretraining (see the class Notes): diagnostics and a message or None."""
        steps = len(losses)
        out: dict = {"pretrain_steps": steps, "pretrain_initial_loss": None, "pretrain_final_loss": None,
                     "pretrain_last_decrease": None, "pretrain_converged": None}
        if steps == 0:
            return out, None
        w = max(1, int(steps * _WINDOW))
        final = float(np.mean(losses[-w:]))
        initial = float(losses[0])
        decrease = None
        if steps >= 2 * w:
            before = float(np.mean(losses[-2 * w:-w]))
            decrease = 1.0 - final / before if before > 0 else 0.0
        out.update(pretrain_initial_loss=initial, pretrain_final_loss=final, pretrain_last_decrease=decrease)
        reasons = []
        if steps < _MIN_STEPS:
            reasons.append(f"fewer than {_MIN_STEPS} steps are too few to tell (the loss often plateaus and then "
                           f"falls again)")
        if decrease is not None and decrease > _STILL_FALLING:
            reasons.append(f"the reconstruction loss still fell by {decrease:.2%} over the last {w} steps "
                           f"(converged: at most {_STILL_FALLING:.0%})")
        if initial > 1e-12 and final >= _MIN_GAIN * initial:
            reasons.append(f"the loss is still {final / initial:.0%} of its initial value {initial:.4g} "
                           f"(converged: below {_MIN_GAIN:.0%})")
        out["pretrain_converged"] = not reasons
        if not reasons:
            return out, None
        return out, (f"the autoencoder has not converged after {steps} pretraining steps: {'; and '.join(reasons)}. "
                     f"Increase pretrain_steps (or lr); clusters of an untrained embedding are poor.")

    def _init_centroids(self, z: torch.Tensor) -> torch.Tensor:
        from sklearn.cluster import KMeans

        random_state = None if self.seed is None else int(self.seed)
        km = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=random_state).fit(z.double().numpy())
        logger.info("%s: k-means initialisation on %d embeddings (inertia %.3f).", self._name(), z.shape[0],
                    km.inertia_)
        return torch.as_tensor(km.cluster_centers_, dtype=torch.float32)

    def _finetune(self, X, encoder, decoder, centers, generator, device, conv: bool, pool: int, history):
        mu = nn.Parameter(centers.to(device).clone())
        params = list(encoder.parameters()) + [mu]
        if self.reconstruction_weight > 0:
            params += list(decoder.parameters())
        opt = torch.optim.Adam(params, lr=self.finetune_lr)
        scale_mod = next(m for m in encoder if isinstance(m, FeatureScale))
        n = X.shape[0]
        prev = None
        p_all = None
        step = 0
        converged = False
        bar = tqdm(total=self.max_iter, desc=f"{self._name()} fine-tune", disable=not self.progress, leave=False)
        batches = iter(())
        while step < self.max_iter:
            if step % self.update_interval == 0:
                q_all = student_t_assignment(self._embed(encoder, X, device), mu.detach().cpu(), self.alpha)
                p_all = target_distribution(q_all)
                labels = q_all.argmax(dim=1)
                kl = float((p_all * (p_all.clamp_min(1e-30).log() - q_all.clamp_min(1e-30).log())).sum(1).mean())
                history["kl"].append(kl)
                if prev is not None:
                    delta = assignment_change(prev, labels)
                    history["delta_label"].append(delta)
                    bar.set_postfix(delta=f"{delta:.4f}", kl=f"{kl:.4f}")
                    if delta < self.tol:
                        converged = True
                        logger.info("%s: stopping early at step %d: %.4f%% of assignments changed (< tol = %.4f%%).",
                                    self._name(), step, 100 * delta, 100 * self.tol)
                        break
                prev = labels
                encoder.train()
            try:
                idx = next(batches)
            except StopIteration:
                batches = self._batches(n, generator)
                idx = next(batches)
            xb = X[idx].to(device, torch.float32)
            z = encoder(xb)
            q = student_t_assignment(z, mu, self.alpha)
            loss = nn.functional.kl_div(q.clamp_min(1e-30).log(), p_all[idx].to(device), reduction="batchmean")
            if self.reconstruction_weight > 0:
                loss = loss + self.reconstruction_weight * nn.functional.mse_loss(
                    decoder(z), _scaled(xb, scale_mod, conv, pool))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
        bar.close()
        if not converged and self.max_iter > 0:
            logger.info("%s: reached max_iter=%d fine-tuning steps without meeting tol=%g.", self._name(),
                        self.max_iter, self.tol)
        return mu.detach().cpu(), step, converged

    # ------------------------------------------------------------------ inference
    def transform(self, X) -> torch.Tensor:
        """Embed ``X`` onto the sphere.

        Parameters
        ----------
        X : torch.Tensor or numpy.ndarray
            Activations shaped like the training data, ``(n, *input_shape_)``.

        Returns
        -------
        torch.Tensor
            Embeddings ``z``, shape ``(n, embedding_dim)``, each of norm ``radius`` (CPU, float32).

        Raises
        ------
        ValueError
            Not fitted, wrong sample shape, or non-finite values.
        """
        X = self._check_input(X, fitting=False)
        return self._embed(self.encoder_, X, next(self.encoder_.parameters()).device)

    def predict_proba(self, X) -> torch.Tensor:
        """Soft assignments ``q`` (Student-t with ``alpha``), shape ``(n, n_clusters)``, rows summing to one."""
        return self.proba_from_embedding(self.transform(X))

    def predict(self, X) -> torch.Tensor:
        """Hard assignments ``argmax_k q_k = argmin_k |z - mu_k|``, shape ``(n,)``."""
        return self.predict_proba(X).argmax(dim=1)

    def fit_predict(self, X, y=None) -> torch.Tensor:
        """Fit (``y`` only for the diagnostics, as in :meth:`fit`) and return the training data's hard assignments."""
        return self.fit(X, y).labels_

    def proba_from_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """``q`` for embeddings that were already computed with :meth:`transform`."""
        self._check_fitted()
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"{self._name()} expects embeddings of shape (n, {self.embedding_dim}). "
                             f"Got {getattr(z, 'shape', type(z).__name__)} instead.")
        return student_t_assignment(z, self.cluster_centers_.to(z.device), self.alpha)

    def to(self, device: str | torch.device) -> DEC:
        """Move the fitted encoder to ``device`` (inference then runs there); returns ``self``."""
        self._check_fitted()
        self.encoder_.to(device)
        self.decoder_.to(device)
        return self
