"""Deep Embedded Clustering (Xie et al., 2016) on activation tensors of any shape: the :class:`DEC` estimator.

The variant here follows the activation-clustering surrogate paper: the embedding is normalised onto a
sphere of radius 8 and the Student-t kernel uses ``alpha = 100`` instead of DEC's 1, which makes the soft assignments
sparse.

The parts live in their own modules and are re-exported here: the soft assignment in
:mod:`~neon_attrib.dec.assignment`, the autoencoder (architecture documented there) in
:mod:`~neon_attrib.dec.encoders`, the training stages in :mod:`~neon_attrib.dec.training` and the training checks with
:class:`DECTrainingWarning` in :mod:`~neon_attrib.dec.diagnostics`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from ..core.validation import resolve_random_state
from .assignment import assignment_change, student_t_assignment, target_distribution
from .diagnostics import DECTrainingWarning, clustering_report, pretrain_report
from .encoders import DECEncoder, FeatureScale, SphereNorm, build_autoencoder, feature_rms
from .estimator import FrozenAfterFitMixin, check_activations, check_labels, is_int, resolve_device
from .training import embed, finetune, kmeans_centroids, pretrain

__all__ = ["DEC", "DECEncoder", "DECTrainingWarning", "DEFAULT_PRETRAIN_STEPS", "FeatureScale", "SphereNorm",
           "assignment_change", "student_t_assignment", "target_distribution"]

# doctest.testmod(this module) also runs the examples of the re-exported functions
__test__ = {"student_t_assignment": student_t_assignment}

#: Pretraining steps when neither ``pretrain_steps`` nor ``pretrain_epochs`` is given.
DEFAULT_PRETRAIN_STEPS = 1000


class DEC(FrozenAfterFitMixin, BaseEstimator):
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
    random_state : int or None
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
        Where to train and keep the fitted model (``None``: where ``X`` is). Data stays where it is and is moved per
        batch; :meth:`to` moves a fitted model.
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
    >>> dec = DEC(n_clusters=3, embedding_dim=4, hidden_dims=(16,), pretrain_steps=300, max_iter=20, random_state=0,
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
        random_state: int | None = None,
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
        seed: int | None = None,
    ):
        self.n_clusters = n_clusters
        self.embedding_dim = embedding_dim
        self.alpha = alpha
        self.radius = radius
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
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
            if not (optional and value is None) and not is_int(value, low):
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
                    or not all(is_int(v, 1) for v in value)):
                fail(param, "a non-empty sequence of positive ints")
        for param in ("random_state", "seed"):
            if getattr(self, param) is not None and not is_int(getattr(self, param), -(2**63)):
                fail(param, "an int or None", TypeError)
        if not isinstance(self.keep_best, (bool, np.bool_)):
            fail("keep_best", "a bool", TypeError)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                fail("device", "a torch.device, a device string such as 'cpu' or 'cuda:0', or None")

    def _check_input(self, X, *, fitting: bool) -> torch.Tensor:
        name = self._name()
        X = check_activations(X, name)
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
        if "cluster_centers_" not in self.__dict__:
            raise NotFittedError(f"This {self._name()} instance is not fitted yet. Call 'fit' first.")

    # ------------------------------------------------------------------ helpers
    def _embed(self, encoder: torch.nn.Module, X: torch.Tensor, device: torch.device) -> torch.Tensor:
        return embed(encoder, X, device, self.batch_size, self.embedding_dim)

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
        name = self._name()
        X = self._check_input(X, fitting=True)
        y_t = check_labels(y, X.shape[0], name)
        device = resolve_device(self.device, X)
        conv = self.architecture == "conv" or (self.architecture == "auto" and X.ndim == 4)
        if conv and X.ndim != 4:
            raise ValueError(f"The 'architecture' parameter of {name} is 'conv', which needs input of shape "
                             f"(n, C, H, W). Got X of shape {tuple(X.shape)} instead.")
        in_shape = tuple(X.shape[1:])
        n_pretrain = self._n_pretrain_steps(X.shape[0])
        devices = [device] if device.type == "cuda" else []
        seed = resolve_random_state(self.random_state, self.seed, owner=name)
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            generator = torch.Generator()
            generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**62))
            encoder, decoder, pool = build_autoencoder(
                in_shape, conv=conv, embedding_dim=self.embedding_dim, radius=self.radius,
                scale=feature_rms(X, conv), hidden_dims=self.hidden_dims, conv_channels=self.conv_channels,
                dense_dim=self.dense_dim, pool_to=self.pool_to)
            encoder.to(device)
            decoder.to(device)
            history: dict[str, list[float]] = {"pretrain_loss": [], "delta_label": [], "kl": []}
            history["pretrain_loss"] = pretrain(encoder, decoder, X, steps=n_pretrain, lr=self.lr,
                                                batch_size=self.batch_size, generator=generator, device=device,
                                                conv=conv, pool=pool, progress=self.progress, name=name)
            z_init = self._embed(encoder, X, device)
            centers_init = kmeans_centroids(z_init, self.n_clusters, self.n_init, seed, name)
            snapshot = []
            if self.keep_best and self.max_iter > 0:  # the decoder only changes in fine-tuning with reconstruction
                trained = (encoder, decoder) if self.reconstruction_weight > 0 else (encoder,)
                snapshot = [(m, {k: v.detach().clone() for k, v in m.state_dict().items()}) for m in trained]
            centers, n_iter, converged = self._finetune(X, encoder, decoder, centers_init, generator, device, conv,
                                                        pool, history)
        z = self._embed(encoder, X, device)
        diagnostics, message = pretrain_report(history["pretrain_loss"])
        report, messages, labels = clustering_report(z_init, centers_init, z, centers, alpha=self.alpha, y=y_t,
                                                     n_iter=n_iter, keep_best=self.keep_best)
        if not report["finetuning_kept"]:  # back to the state k-means was run on (weights copied before fine-tuning)
            for module, state in snapshot:
                module.load_state_dict(state)
            z, centers = z_init, centers_init
        messages = ([message] if message else []) + messages
        diagnostics.update(report, warnings=messages)
        if emit:
            for message in messages:
                warnings.warn(f"{name}: {message}", DECTrainingWarning, stacklevel=3)
        encoder.eval()
        decoder.eval()
        # margin of the assigned cluster, min_{k != c} |z - mu_k|^2 - |z - mu_c|^2 (the k-means evidence)
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

    def _finetune(self, X, encoder, decoder, centers, generator, device, conv: bool, pool: int, history):
        """Stage (3), :func:`~neon_attrib.dec.training.finetune` with this estimator's hyperparameters."""
        return finetune(encoder, decoder, X, centers, alpha=self.alpha, max_iter=self.max_iter,
                        update_interval=self.update_interval, tol=self.tol, lr=self.finetune_lr,
                        reconstruction_weight=self.reconstruction_weight, batch_size=self.batch_size,
                        embedding_dim=self.embedding_dim, generator=generator, device=device, conv=conv, pool=pool,
                        progress=self.progress, name=self._name(), history=history)

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
            Embeddings ``z``, shape ``(n, embedding_dim)``, each of norm ``radius`` (float32, on ``X``'s device;
            computed on the model's, see :meth:`to`).

        Raises
        ------
        ValueError
            Not fitted, wrong sample shape, or non-finite values.
        """
        X = self._check_input(X, fitting=False)
        return self._embed(self.encoder_, X, next(self.encoder_.parameters()).device).to(X.device)

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
