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
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["DEC", "DECEncoder", "FeatureScale", "SphereNorm", "assignment_change", "student_t_assignment",
           "target_distribution"]

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
    logits = -(alpha + 1.0) / 2.0 * torch.log1p(dist2 / alpha)
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


class DEC:
    """Deep Embedded Clustering with embeddings on a sphere and a sparse Student-t assignment.

    Fitting runs three stages: (1) pretrain an autoencoder on the activations by mean squared reconstruction error
    (of the feature-scaled input), (2) k-means (scikit-learn, ``n_init`` restarts) on the normalised embeddings gives
    the initial centroids, (3) minimise ``KL(P || Q)`` over encoder and centroids, recomputing the target ``P`` on the
    whole training set every ``update_interval`` steps and stopping when fewer than a fraction ``tol`` of the hard
    assignments changed since the previous refresh (or after ``max_iter`` steps).

    Parameters
    ----------
    n_clusters : int
        Number of clusters ``K``.
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
    pretrain_epochs : int
        Epochs of autoencoder pretraining.
    max_iter : int
        Maximum number of fine-tuning steps (minibatches).
    update_interval : int
        Steps between refreshes of the target distribution ``P`` (``T``).
    tol : float
        Stop fine-tuning when the fraction of changed hard assignments between refreshes is below ``tol``.
    batch_size : int
        Minibatch size for all stages.
    lr : float
        Adam learning rate for pretraining.
    finetune_lr : float
        Adam learning rate for fine-tuning.
    reconstruction_weight : float
        Weight of the reconstruction loss kept during fine-tuning (0 is DEC, > 0 is IDEC of Guo et al., 2017).
    n_init : int
        Number of k-means restarts for the centroid initialisation.
    device : str, torch.device or None
        Where to train (``None``: CUDA when available, else CPU). Data stays where it is and is moved per batch.
    progress : bool
        Show tqdm progress bars.

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
    mean_evidence_ : float
        Mean over the training data of the assigned cluster's k-means evidence
        ``min_{k != c} |z - mu_k|^2 - |z - mu_c|^2``; its inverse is the default soft-min sharpness of the
        attributable heads.
    n_iter_ : int
        Fine-tuning steps run.
    converged_ : bool
        Whether the tolerance stop triggered before ``max_iter``.
    history_ : dict
        ``"pretrain_loss"`` per epoch, ``"delta_label"`` per refresh, ``"kl"`` per refresh.

    Examples
    --------
    >>> X = torch.randn(200, 8)
    >>> dec = DEC(n_clusters=3, embedding_dim=4, hidden_dims=(16,), pretrain_epochs=2, max_iter=20, seed=0,
    ...           progress=False).fit(X)
    >>> dec.predict(X).shape
    torch.Size([200])
    """

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
        pretrain_epochs: int = 50,
        max_iter: int = 2000,
        update_interval: int = 100,
        tol: float = 1e-3,
        batch_size: int = 256,
        lr: float = 1e-3,
        finetune_lr: float = 1e-4,
        reconstruction_weight: float = 0.0,
        n_init: int = 10,
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
        self.pretrain_epochs = pretrain_epochs
        self.max_iter = max_iter
        self.update_interval = update_interval
        self.tol = tol
        self.batch_size = batch_size
        self.lr = lr
        self.finetune_lr = finetune_lr
        self.reconstruction_weight = reconstruction_weight
        self.n_init = n_init
        self.device = device
        self.progress = progress

    # ------------------------------------------------------------------ validation
    def _name(self) -> str:
        return type(self).__name__

    def _validate_params(self) -> None:
        name = self._name()

        def _int(param: str, low: int) -> None:
            value = getattr(self, param)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"The '{param}' parameter of {name} must be an int >= {low}. Got {value!r} instead.")

        def _pos(param: str, allow_zero: bool = False) -> None:
            value = getattr(self, param)
            ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"The '{param}' parameter of {name} must be a float {bound}. Got {value!r} instead.")

        _int("n_clusters", 2)
        _int("embedding_dim", 1)
        _int("dense_dim", 1)
        _int("pretrain_epochs", 0)
        _int("max_iter", 0)
        _int("update_interval", 1)
        _int("batch_size", 1)
        _int("n_init", 1)
        if self.pool_to is not None:
            _int("pool_to", 1)
        _pos("alpha")
        _pos("radius")
        _pos("lr")
        _pos("finetune_lr")
        _pos("tol", allow_zero=True)
        _pos("reconstruction_weight", allow_zero=True)
        if self.architecture not in ("auto", "mlp", "conv"):
            raise ValueError(f"The 'architecture' parameter of {name} must be one of 'auto', 'mlp', 'conv'. "
                             f"Got {self.architecture!r} instead.")
        for param in ("hidden_dims", "conv_channels"):
            value = getattr(self, param)
            if (not isinstance(value, Sequence) or len(value) == 0
                    or not all(isinstance(v, (int, np.integer)) and v > 0 for v in value)):
                raise ValueError(f"The '{param}' parameter of {name} must be a non-empty sequence of positive ints. "
                                 f"Got {value!r} instead.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise TypeError(f"The 'seed' parameter of {name} must be an int or None. Got {self.seed!r} instead.")

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

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
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

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> DEC:
        """Fit the autoencoder, initialise centroids with k-means and fine-tune with ``KL(P || Q)``.

        Parameters
        ----------
        X : torch.Tensor or numpy.ndarray
            Activations, shape ``(n_samples, ...)``: vectors, feature maps ``(n, C, H, W)`` or anything else (that is
            flattened). Stays on its device; minibatches move to ``device``.
        y : None
            Ignored (scikit-learn convention).

        Returns
        -------
        DEC
            ``self``.

        Raises
        ------
        ValueError
            Invalid parameters, fewer samples than clusters, non-finite values.
        TypeError
            ``X`` is not a tensor or array.
        """
        self._validate_params()
        X = self._check_input(X, fitting=True)
        device = _resolve_device(self.device)
        conv = self.architecture == "conv" or (self.architecture == "auto" and X.ndim == 4)
        if conv and X.ndim != 4:
            raise ValueError(f"The conv architecture of {self._name()} needs input of shape (n, C, H, W). "
                             f"Got {tuple(X.shape)} instead.")
        self._conv = conv
        in_shape = tuple(X.shape[1:])
        scale = self._scale(X, conv)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            generator = torch.Generator()
            generator.manual_seed(int(self.seed) if self.seed is not None else int(torch.seed() % 2**62))
            self._pool = 1
            if conv:
                encoder, decoder, self._pool = _build_conv(in_shape, self.embedding_dim, self.radius, scale,
                                                           self.conv_channels, self.dense_dim, self.pool_to)
            else:
                encoder, decoder = _build_mlp(in_shape, self.embedding_dim, self.radius, scale, self.hidden_dims)
            encoder.to(device)
            decoder.to(device)
            history: dict[str, list[float]] = {"pretrain_loss": [], "delta_label": [], "kl": []}
            self._pretrain(X, encoder, decoder, generator, device, history)
            centers = self._init_centroids(X, encoder, device)
            centers, n_iter, converged, labels = self._finetune(X, encoder, decoder, centers, generator, device,
                                                                history)
        encoder.eval()
        decoder.eval()
        self.encoder_ = encoder
        self.decoder_ = decoder
        self.cluster_centers_ = centers.detach().cpu()
        self.input_shape_ = in_shape
        self.n_features_in_ = int(np.prod(in_shape))
        self.architecture_ = "conv" if conv else "mlp"
        self.n_iter_ = n_iter
        self.converged_ = converged
        self.history_ = history
        z = self._embed(encoder, X, device)
        self.labels_ = self.proba_from_embedding(z).argmax(dim=1)
        if not torch.equal(self.labels_, labels):
            logger.debug("%s: %d labels changed after the last fine-tuning step.", self._name(),
                         int((self.labels_ != labels).sum()))
        # margin of the assigned cluster, min_{k != c} |z - mu_k|^2 - |z - mu_c|^2 (the k-means evidence of SPEC §3)
        two = torch.cdist(z.double(), self.cluster_centers_.double()).pow(2).topk(2, dim=1, largest=False).values
        self.mean_evidence_ = float((two[:, 1] - two[:, 0]).mean())
        return self

    def _pretrain(self, X, encoder, decoder, generator, device, history) -> None:
        if self.pretrain_epochs == 0:
            return
        params = list(encoder.parameters()) + list(decoder.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        scale_mod = next(m for m in encoder if isinstance(m, FeatureScale))
        encoder.train()
        decoder.train()
        bar = tqdm(range(self.pretrain_epochs), desc=f"{self._name()} pretrain", disable=not self.progress,
                   leave=False)
        for epoch in bar:
            total, count = 0.0, 0
            for idx in self._batches(X.shape[0], generator):
                xb = X[idx].to(device, torch.float32)
                target = _scaled(xb, scale_mod, self._conv, self._pool)
                loss = nn.functional.mse_loss(decoder(encoder(xb)), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * xb.shape[0]
                count += xb.shape[0]
            history["pretrain_loss"].append(total / count)
            bar.set_postfix(loss=f"{total / count:.4f}")
            logger.debug("%s pretrain epoch %d: reconstruction loss %.5f", self._name(), epoch, total / count)
        logger.info("%s: pretrained the autoencoder for %d epochs (final loss %.5f).", self._name(),
                    self.pretrain_epochs, history["pretrain_loss"][-1])

    def _init_centroids(self, X, encoder, device) -> torch.Tensor:
        from sklearn.cluster import KMeans

        z = self._embed(encoder, X, device).double().numpy()
        random_state = None if self.seed is None else int(self.seed)
        km = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=random_state).fit(z)
        logger.info("%s: k-means initialisation on %d embeddings (inertia %.3f).", self._name(), z.shape[0],
                    km.inertia_)
        return torch.as_tensor(km.cluster_centers_, dtype=torch.float32)

    def _finetune(self, X, encoder, decoder, centers, generator, device, history):
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
        labels = torch.zeros(n, dtype=torch.long)
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
                    decoder(z), _scaled(xb, scale_mod, self._conv, self._pool))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
        bar.close()
        if not converged:
            logger.info("%s: reached max_iter=%d fine-tuning steps without meeting tol=%g.", self._name(),
                        self.max_iter, self.tol)
        return mu.detach().cpu(), step, converged, labels

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
        """Fit and return the hard assignments of the training data."""
        return self.fit(X).labels_

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

    def __repr__(self) -> str:
        return (f"{self._name()}(n_clusters={self.n_clusters}, embedding_dim={self.embedding_dim}, "
                f"alpha={self.alpha}, radius={self.radius}, seed={self.seed})")
