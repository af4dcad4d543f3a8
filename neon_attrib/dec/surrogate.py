"""Activation-clustering surrogate of a classifier: one DEC per layer, class posteriors per cluster.

For each selected layer ``j`` a :class:`~neon_attrib.dec.DEC` clusters the layer's activations; the surrogate of the
layer is ``p_j(y|x) = sum_k p(y | z^j = k) q^j_k(x)`` with ``p(y | z = k)`` the class frequencies of the training
examples assigned to ``k``, and the full surrogate is ``sum_j w_j p_j(y|x) / sum_j w_j``. The same embeddings give
similar training examples (weighted embedding distance) and concepts (training examples nearest to each centroid).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from torch import nn

from ..core.validation import resolve_random_state
from .activations import (
    Data,
    ModeGuard,
    capture_activations,
    class_labels,
    collect_activations,
    resolve_layers,
    stream_activations,
)
from .estimator import FrozenAfterFitMixin, is_int
from .heads import DECHead, SurrogateClassHead, TruncatedModel
from .mixture import check_layer_weights, class_posteriors, layer_proba, mix_layers
from .model import DEC, DECTrainingWarning
from .similarity import check_chunk_size, nearest_to_centroids, nearest_training_examples

__all__ = ["ActivationClusteringSurrogate", "capture_activations"]

logger = logging.getLogger(__name__)


# Constructor parameters of the surrogate that are DEC hyperparameters, and the DEC parameter each one sets.
_DEC_PARAMS = {
    "alpha": "alpha", "radius": "radius", "architecture": "architecture", "hidden_dims": "hidden_dims",
    "conv_channels": "conv_channels", "dense_dim": "dense_dim", "pool_to": "pool_to",
    "pretrain_steps": "pretrain_steps", "pretrain_epochs": "pretrain_epochs", "max_iter": "max_iter",
    "update_interval": "update_interval", "tol": "tol", "dec_batch_size": "batch_size", "lr": "lr",
    "finetune_lr": "finetune_lr", "reconstruction_weight": "reconstruction_weight", "n_init": "n_init",
    "keep_best": "keep_best",
}
# DEC parameters the deprecated ``dec_params`` may set (n_clusters, embedding_dim, random_state come from the surrogate)
_DEC_PARAMS_KEYS = frozenset(_DEC_PARAMS.values()) | {"device", "progress"}


class ActivationClusteringSurrogate(FrozenAfterFitMixin, BaseEstimator):
    """Surrogate of a classifier from Deep Embedded Clustering of its activations at several layers.

    A scikit-learn estimator: every parameter is stored as given and validated in :meth:`fit`; ``get_params``,
    ``set_params`` and ``sklearn.base.clone`` work (``clone`` shares ``model``: it is not copied). After fitting only
    ``weights``, ``batch_size`` and ``progress`` can change (they take effect at once); changing any other parameter
    raises an ``AttributeError`` that says to refit.

    Parameters
    ----------
    model : torch.nn.Module
        The trained classifier, returning logits ``(n, n_classes)``. It runs where it is (move it to the GPU yourself)
        in eval mode, and its mode is restored after every pass; it is not otherwise modified.
    layers : sequence of str
        Names of the modules (``model.named_modules()``) whose outputs are clustered. Each must run exactly once per
        forward pass.
    n_clusters : int
        Clusters per layer (``l_j``).
    embedding_dim : int
        Embedding dimension per layer (``dim V_j``).
    weights : sequence of float or dict, optional
        Layer weights ``w_j`` of the full surrogate and of the similarity (a sequence in the order of ``layers`` or a
        ``{layer: weight}`` dict, missing layers weigh 0); ``None`` means equal weights. Stored as given, checked
        when used (:meth:`layer_weights` returns the checked float64 tensor); can be changed after fitting.
    alpha, radius, architecture, hidden_dims, conv_channels, dense_dim, pool_to : optional
        The DEC model of every layer (see :class:`~neon_attrib.dec.DEC`).
    pretrain_steps, pretrain_epochs : int or None
        Autoencoder pretraining in optimizer steps (``None`` for both: 1000 steps), or in epochs; at most one.
    max_iter, update_interval, tol, lr, finetune_lr, reconstruction_weight, n_init, keep_best : optional
        DEC training (see :class:`~neon_attrib.dec.DEC`).
    dec_batch_size : int
        Minibatch size of the DEC training (DEC's ``batch_size``).
    dec_params : dict, optional
        **Deprecated** (a ``DeprecationWarning`` at :meth:`fit`): DEC keyword arguments that override the ones
        above, for every layer or as a dict from layer name to such a dict. Use the keywords above instead.
    batch_size : int
        Batch size of the classifier passes (does not change any result).
    device : str or torch.device, optional
        Where the DEC models train and run (default: the classifier's device). Activations are kept on the CPU and
        moved there one minibatch at a time.
    random_state : int, optional
        Base seed; layer ``j``'s DEC uses ``random_state + j``.
    seed : int, optional
        Deprecated alias of ``random_state`` (a ``FutureWarning`` at ``fit``); removed in the next release.
    progress : bool
        Progress bars.

    Attributes
    ----------
    decs_ : dict of str to DEC
        The fitted DEC models.
    class_posteriors_ : dict of str to torch.Tensor
        ``p(y | z^j = k)``, shape ``(n_clusters, n_classes)`` per layer. An empty cluster gets the training class
        frequencies.
    train_embeddings_ : dict of str to torch.Tensor
        Training embeddings ``(n_train, embedding_dim)`` per layer.
    train_labels_, train_predictions_, train_assignments_ : torch.Tensor
        Training labels, the classifier's argmax on them, and the per-layer cluster assignments
        (``dict`` of ``(n_train,)``).
    n_classes_ : int
        Number of classifier outputs.
    n_train_ : int
        Number of training images.
    input_shape_ : tuple of int
        Shape of one training image.
    fit_time_ : dict of str to float
        Seconds spent in the classifier pass (``"capture"``) and per layer's DEC.
    diagnostics_ : dict
        ``"layers"``: each layer's ``DEC.diagnostics_`` (the DECs get the training labels, so the fine-tuning check
        uses class purity); ``"warnings"``: the :class:`~neon_attrib.dec.DECTrainingWarning` messages, prefixed
        with the layer; ``"train_accuracy"`` (with the weights at fit time), ``"layer_train_accuracy"`` and
        ``"classifier_train_accuracy"`` on the training images.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 3))
    >>> images, labels = torch.randn(60, 3, 8, 8), torch.randint(0, 3, (60,))
    >>> sur = ActivationClusteringSurrogate(net, ["1", "3"], n_clusters=3, embedding_dim=4, random_state=0,
    ...                                     progress=False, pretrain_steps=100, max_iter=10, hidden_dims=(16,),
    ...                                     conv_channels=(4,))
    >>> sur.fit(images, labels).predict_proba(images).shape
    torch.Size([60, 3])
    >>> sorted(sur.diagnostics_["layers"])
    ['1', '3']
    """

    _settable_after_fit = frozenset({"weights", "batch_size", "progress"})
    _fitted_marker = "decs_"

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        n_clusters: int = 15,
        embedding_dim: int = 20,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        *,
        alpha: float = 100.0,
        radius: float = 8.0,
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
        dec_batch_size: int = 256,
        lr: float = 1e-3,
        finetune_lr: float = 1e-4,
        reconstruction_weight: float = 0.0,
        n_init: int = 10,
        keep_best: bool = True,
        dec_params: Mapping[str, Any] | None = None,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        random_state: int | None = None,
        progress: bool = True,
        seed: int | None = None,
    ):
        self.model = model
        self.layers = layers
        self.n_clusters = n_clusters
        self.embedding_dim = embedding_dim
        self.weights = weights
        self.alpha = alpha
        self.radius = radius
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
        self.dec_batch_size = dec_batch_size
        self.lr = lr
        self.finetune_lr = finetune_lr
        self.reconstruction_weight = reconstruction_weight
        self.n_init = n_init
        self.keep_best = keep_best
        self.dec_params = dec_params
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state
        self.seed = seed  # deprecated alias of random_state
        self.progress = progress

    def __sklearn_clone__(self) -> ActivationClusteringSurrogate:
        """An unfitted copy with equal parameters that **shares** ``model`` (scikit-learn would deep-copy it)."""
        params = self.get_params(deep=False)
        return type(self)(**{k: v if k == "model" else clone(v, safe=False) for k, v in params.items()})

    # ------------------------------------------------------------------ weights
    def layer_weights(self, weights=None) -> torch.Tensor:
        """The checked layer weights: a float64 tensor ``(len(layers),)`` in the order of :attr:`layers`.

        Parameters
        ----------
        weights : sequence of float or dict, optional
            Weights to check instead of the ``weights`` parameter.

        Returns
        -------
        torch.Tensor
            Finite, non-negative weights, not all zero (``None`` gives ones).

        Raises
        ------
        ValueError
            Wrong length, unknown layer names, negative or non-finite values, or all zero.
        TypeError
            Values that are not numbers.
        """
        return self._check_weights(self.weights if weights is None else weights)

    def _check_weights(self, value) -> torch.Tensor:
        return check_layer_weights(value, self.layers, type(self).__name__)

    # ------------------------------------------------------------------ fitting
    def _check_params(self) -> dict[str, nn.Module]:
        name = type(self).__name__
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"The 'model' parameter of {name} must be a torch.nn.Module. "
                            f"Got {type(self.model).__name__} instead.")
        modules = resolve_layers(self.model, self.layers, name)
        if not is_int(self.batch_size, 1):
            raise ValueError(f"The 'batch_size' parameter of {name} must be an int >= 1. "
                             f"Got {self.batch_size!r} instead.")
        for param in ("random_state", "seed"):
            value = getattr(self, param)
            if value is not None and not is_int(value, -(2**63)):
                raise TypeError(f"The '{param}' parameter of {name} must be an int or None. Got {value!r} instead.")
        if self.dec_params is not None:
            if not isinstance(self.dec_params, Mapping):
                raise TypeError(f"The 'dec_params' parameter of {name} must be a dict or None. "
                                f"Got {type(self.dec_params).__name__} instead.")
            per_layer = bool(self.dec_params) and all(key in modules for key in self.dec_params)
            for layer, params in (self.dec_params.items() if per_layer else [(None, self.dec_params)]):
                where = "" if layer is None else f"[{layer!r}]"
                if not isinstance(params, Mapping):
                    raise TypeError(f"The 'dec_params' parameter of {name} must map layer names to dicts. "
                                    f"Got {type(params).__name__} for {layer!r} instead.")
                unknown = sorted(set(params) - _DEC_PARAMS_KEYS)
                if unknown:
                    raise ValueError(f"The 'dec_params{where}' parameter of {name} has unknown DEC parameter(s) "
                                     f"{unknown}; expected some of {sorted(_DEC_PARAMS_KEYS)} or layer names from "
                                     f"{list(self.layers)}.")
        return modules

    def _dec_kwargs(self, layer: str) -> dict:
        kwargs = {dec_name: getattr(self, name) for name, dec_name in _DEC_PARAMS.items()}
        device = self.device
        if device is None:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        kwargs.update(device=device, progress=self.progress)
        params = dict(self.dec_params or {})
        if params and all(key in self.layers for key in params):
            params = dict(params.get(layer, {}))
        kwargs.update(params)
        return kwargs

    def _make_decs(self) -> dict[str, DEC]:
        """One unfitted, validated DEC per layer (errors name this class and its parameter names)."""
        name = type(self).__name__
        aliases = {dec_name: name_ for name_, dec_name in _DEC_PARAMS.items()}
        decs = {}
        base = resolve_random_state(self.random_state, self.seed, owner=name)
        for j, layer in enumerate(self.layers):
            seed = None if base is None else int(base) + j
            dec = DEC(n_clusters=self.n_clusters, embedding_dim=self.embedding_dim, random_state=seed,
                      **self._dec_kwargs(layer))
            dec._check_params(owner=name, aliases=aliases)
            decs[layer] = dec
        return decs

    def _check_fitted(self) -> None:
        if "decs_" not in self.__dict__:
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' first.")

    def fit(self, images: Data, labels: Any = None) -> ActivationClusteringSurrogate:
        """Capture the layers' activations on the training data, fit one DEC per layer and the class posteriors.

        All parameters are validated before the classifier runs, and the fitted state is assigned only at the end: a
        failed ``fit`` leaves a previously fitted surrogate unchanged.

        Parameters
        ----------
        images : torch.Tensor, numpy.ndarray or iterable
            Training images ``(n, ...)`` (with ``labels``), or an iterable such as a DataLoader of
            ``(images, labels)`` batches. Activations are collected on the CPU, one batch at a time on ``device``.
        labels : array-like, optional
            Integer class labels in ``[0, n_classes)`` when ``images`` is a tensor.

        Returns
        -------
        ActivationClusteringSurrogate
            ``self``.

        Raises
        ------
        ValueError
            Invalid parameters, missing or mismatched labels, labels outside the classifier's classes, too few
            samples.
        TypeError
            A parameter of the wrong type (e.g. ``model`` is not a module).

        Warns
        -----
        DECTrainingWarning
            A layer's DEC trained badly (see :class:`~neon_attrib.dec.DEC`); the message names the layer, and
            :attr:`diagnostics_` keeps the details.
        DeprecationWarning
            ``dec_params`` was given.
        """
        name = type(self).__name__
        self._check_params()
        self.layer_weights()  # invalid weights fail now, not after training
        decs = self._make_decs()
        if self.dec_params is not None:
            warnings.warn(f"The 'dec_params' parameter of {name} is deprecated; pass the DEC hyperparameters as "
                          f"keywords (e.g. pretrain_steps=..., max_iter=..., dec_batch_size=...).", DeprecationWarning,
                          stacklevel=2)
        if isinstance(images, (torch.Tensor, np.ndarray)) and labels is None:
            raise ValueError(f"{name}.fit needs labels with an image tensor (the class posteriors p(y|z) are "
                             f"estimated from them).")
        start = time.perf_counter()
        acts, logits, labels_t, shape = collect_activations(self.model, self.layers, images, labels,
                                                            batch_size=self.batch_size, device=None,
                                                            progress=self.progress, owner=name)
        fit_time = {"capture": time.perf_counter() - start}
        if labels_t is None:
            raise ValueError(f"{name}.fit: the loader must yield (images, labels) batches.")
        n_classes = logits.shape[1]
        if labels_t.min() < 0 or labels_t.max() >= n_classes:
            raise ValueError(f"{name}.fit: labels must lie in [0, {n_classes}) (the classifier has {n_classes} "
                             f"outputs). Got range [{int(labels_t.min())}, {int(labels_t.max())}].")
        posteriors, embeddings, assignments, layer_diagnostics, messages = {}, {}, {}, {}, []
        prior = torch.bincount(labels_t, minlength=n_classes).double()
        prior /= prior.sum()
        for layer, dec in decs.items():
            start = time.perf_counter()
            logger.info("%s: fitting DEC on layer %r with activations of shape %s.", name, layer,
                        tuple(acts[layer].shape))
            dec._fit(acts[layer], labels_t, emit=False)  # the labels only measure purity (the fine-tuning check)
            z = dec.transform(acts[layer])
            assign = dec.proba_from_embedding(z).argmax(dim=1)
            del acts[layer]  # free the activations of this layer as soon as possible
            embeddings[layer] = z
            assignments[layer] = assign
            posteriors[layer] = class_posteriors(assign, labels_t, self.n_clusters, n_classes, prior)
            layer_diagnostics[layer] = dec.diagnostics_
            messages += [f"layer {layer!r}: {message}" for message in dec.diagnostics_["warnings"]]
            fit_time[layer] = time.perf_counter() - start
        train_proba = layer_proba(decs, posteriors, embeddings)
        mixed = self._mix(train_proba)
        predictions = logits.argmax(dim=1)
        diagnostics = {
            "layers": layer_diagnostics,
            "warnings": messages,
            "train_accuracy": float((mixed.argmax(1) == labels_t).double().mean()),
            "layer_train_accuracy": {k: float((v.argmax(1) == labels_t).double().mean())
                                     for k, v in train_proba.items()},
            "classifier_train_accuracy": float((predictions == labels_t).double().mean()),
        }
        for message in messages:
            warnings.warn(f"{name}, {message}", DECTrainingWarning, stacklevel=2)
        # all state is assigned here, after everything that can fail
        self.input_shape_ = shape
        self.class_posteriors_ = posteriors
        self.train_embeddings_ = embeddings
        self.train_assignments_ = assignments
        self.train_labels_ = labels_t
        self.train_predictions_ = predictions
        self.n_classes_ = n_classes
        self.n_train_ = int(labels_t.shape[0])
        self.fit_time_ = fit_time
        self.diagnostics_ = diagnostics
        self.decs_ = decs
        return self

    # ------------------------------------------------------------------ inference
    def _infer(self, images: Data, labels: Any = None) -> dict[str, Any]:
        """Embeddings per layer, logits and labels (one streamed pass)."""
        self._check_fitted()
        name = type(self).__name__
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor) and self.input_shape_ is not None:
            if images.ndim == len(self.input_shape_):
                images = images.unsqueeze(0)
            if tuple(images.shape[1:]) != self.input_shape_:
                raise ValueError(f"images have shape {tuple(images.shape[1:])}, but {name} was fitted with images of "
                                 f"shape {self.input_shape_}.")
        z: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        logits, labs = [], []
        for acts, batch_logits, batch_labels, _ in stream_activations(self.model, self.layers, images, labels,
                                                                     batch_size=self.batch_size, device=None,
                                                                     progress=False, owner=name):
            for layer in self.layers:
                z[layer].append(self.decs_[layer].transform(acts[layer].float()))
            logits.append(batch_logits.float().cpu())
            labs.append(batch_labels)
        if not logits:
            raise ValueError(f"{name} received no images.")
        return {
            "z": {layer: torch.cat(v) for layer, v in z.items()},
            "logits": torch.cat(logits),
            "labels": class_labels(labs, name, n_classes=logits[0].shape[1]),
        }

    def _layer_proba_from(self, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return layer_proba(self.decs_, self.class_posteriors_, {layer: z[layer] for layer in self.layers})

    def _mix(self, proba: Mapping[str, torch.Tensor], weights=None) -> torch.Tensor:
        return mix_layers(proba, self.layers, self.layer_weights(weights))

    def transform(self, images: Data) -> dict[str, torch.Tensor]:
        """Embeddings ``z^j`` (on the sphere) of ``images`` per layer, ``(n, embedding_dim)`` each."""
        return self._infer(images)["z"]

    def layer_proba(self, images: Data) -> dict[str, torch.Tensor]:
        """Per-layer surrogate ``p_j(y|x) = sum_k p(y|z^j=k) q^j_k(x)``, ``(n, n_classes)`` each."""
        return self._layer_proba_from(self._infer(images)["z"])

    def predict_proba(self, images: Data, weights=None) -> torch.Tensor:
        """Full surrogate ``sum_j w_j p_j(y|x) / sum_j w_j``, shape ``(n, n_classes)``.

        Parameters
        ----------
        images : torch.Tensor, numpy.ndarray or iterable
            Images (a single image without batch dimension is accepted) or batches.
        weights : sequence or dict, optional
            Layer weights for this call only (default: :attr:`weights`).
        """
        return self._mix(self.layer_proba(images), weights)

    def predict(self, images: Data, weights=None) -> torch.Tensor:
        """Surrogate class ``argmax_y``, shape ``(n,)``."""
        return self.predict_proba(images, weights).argmax(dim=1)

    def evaluate(self, images: Data, labels: Any = None, weights=None) -> dict[str, Any]:
        """Accuracy and fidelity of the full surrogate and of every layer's, in one pass over ``images``.

        Returns
        -------
        dict
            ``fidelity``, ``layer_fidelity`` (dict), and with labels ``accuracy``, ``layer_accuracy`` and
            ``baseline_accuracy`` (the classifier's).
        """
        out = self._infer(images, labels)
        layer_proba = self._layer_proba_from(out["z"])
        model_pred = out["logits"].argmax(dim=1)
        full = self._mix(layer_proba, weights).argmax(dim=1)
        result: dict[str, Any] = {
            "fidelity": float((full == model_pred).double().mean()),
            "layer_fidelity": {k: float((v.argmax(1) == model_pred).double().mean()) for k, v in layer_proba.items()},
        }
        y = out["labels"]
        if y is not None:
            result["accuracy"] = float((full == y).double().mean())
            result["layer_accuracy"] = {k: float((v.argmax(1) == y).double().mean()) for k, v in layer_proba.items()}
            result["baseline_accuracy"] = float((model_pred == y).double().mean())
        return result

    def accuracy(self, images: Data, labels: Any = None, weights=None) -> float:
        """Accuracy of the full surrogate against ``labels`` (or the labels a loader yields)."""
        result = self.evaluate(images, labels, weights)
        if "accuracy" not in result:
            raise ValueError(f"{type(self).__name__}.accuracy needs labels.")
        return result["accuracy"]

    def fidelity(self, images: Data, weights=None) -> float:
        """Fraction of ``images`` where the surrogate's argmax equals the classifier's argmax."""
        return self.evaluate(images, weights=weights)["fidelity"]

    def layer_accuracy(self, images: Data, labels: Any = None) -> dict[str, float]:
        """Accuracy of every layer's surrogate ``p_j``."""
        result = self.evaluate(images, labels)
        if "layer_accuracy" not in result:
            raise ValueError(f"{type(self).__name__}.layer_accuracy needs labels.")
        return result["layer_accuracy"]

    def layer_fidelity(self, images: Data) -> dict[str, float]:
        """Fidelity of every layer's surrogate ``p_j`` to the classifier."""
        return self.evaluate(images)["layer_fidelity"]

    # ------------------------------------------------------------------ explanations
    def similar_examples(self, x: Data, k: int = 10, weights=None,
                         chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Training examples nearest to ``x`` by ``sum_j w_j |z^j(x) - z^j(x')|``.

        Parameters
        ----------
        x : torch.Tensor or iterable
            Query images (or one image without batch dimension).
        k : int
            Number of neighbours, ``1 <= k <= n_train``.
        weights : sequence or dict, optional
            Layer weights for the distance (default: :attr:`weights`; e.g. ``(2, 1, 0, 0)`` for low-level similarity).
        chunk_size : int
            Training examples compared at once (bounds memory to ``n_queries x chunk_size`` per layer).

        Returns
        -------
        indices : torch.Tensor
            ``(n, k)`` int64 indices into the training set, nearest first.
        distances : torch.Tensor
            ``(n, k)`` weighted distances.
        """
        self._check_fitted()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n_train_:
            raise ValueError(f"The 'k' parameter of {type(self).__name__}.similar_examples must be an int in "
                             f"[1, {self.n_train_}]. Got {k!r} instead.")
        check_chunk_size(chunk_size, f"{type(self).__name__}.similar_examples")  # before the forward passes
        w = self.layer_weights(weights)
        return self._nearest(self._infer(x)["z"], w, k, chunk_size)

    def _nearest(self, z: Mapping[str, torch.Tensor], w: torch.Tensor, k: int,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        return nearest_training_examples(z, self.train_embeddings_, self.layers, w, k, chunk_size)

    def concepts(self, layer: str, per_cluster: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Training examples nearest to each centroid of ``layer`` (the layer's concepts).

        Parameters
        ----------
        layer : str
            One of :attr:`layers`.
        per_cluster : int
            Examples per cluster, ``1 <= per_cluster <= n_train``.

        Returns
        -------
        indices : torch.Tensor
            ``(n_clusters, per_cluster)`` indices into the training set, nearest first.
        distances : torch.Tensor
            ``(n_clusters, per_cluster)`` embedding distances to the centroid.
        """
        self._check_fitted()
        self._check_layer(layer)
        if isinstance(per_cluster, bool) or not isinstance(per_cluster, (int, np.integer)) \
                or not 1 <= per_cluster <= self.n_train_:
            raise ValueError(f"The 'per_cluster' parameter of {type(self).__name__}.concepts must be an int in "
                             f"[1, {self.n_train_}]. Got {per_cluster!r} instead.")
        return nearest_to_centroids(self.decs_[layer].cluster_centers_, self.train_embeddings_[layer], per_cluster)

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise ValueError(f"Unknown layer name {layer!r} for {type(self).__name__}; fitted layers are "
                             f"{self.layers}.")

    def _keep_modes(self):
        """Context manager restoring the train/eval flag of every module of the classifier (heads call ``.eval()``)."""
        return ModeGuard(self.model)

    def head(self, layer: str, beta: float | None = None) -> DECHead:
        """The attributable DEC head of ``layer``: classifier input -> layer -> encoder -> cluster evidence.

        See :class:`~neon_attrib.dec.heads.DECHead`; ``neon_attrib.explain(head, images)`` explains "why is this image
        in its concept of ``layer``" in pixels. The head shares the classifier; the classifier's train/eval mode (of
        every submodule) is left as it was.

        Parameters
        ----------
        layer : str
            One of :attr:`layers`.
        beta : float, optional
            Soft-min sharpness of the membership rule (default ``1 / mean training evidence``).

        Returns
        -------
        DECHead
            The head, in eval mode (its classifier part keeps the classifier's mode: put the classifier in eval
            mode yourself before explaining if it has dropout or batch norm).
        """
        self._check_fitted()
        self._check_layer(layer)
        with self._keep_modes():
            return DECHead.from_dec(self.decs_[layer], features=TruncatedModel(self.model, layer), beta=beta)

    def class_head(self, weights=None, beta: float | None = None) -> SurrogateClassHead:
        """The attributable surrogate: classifier input -> all layers -> encoders -> surrogate class probabilities.

        See :class:`~neon_attrib.dec.heads.SurrogateClassHead`. The classifier's train/eval mode is left as it was.

        Parameters
        ----------
        weights : sequence of float or dict, optional
            Layer weights of the head (default: the ``weights`` parameter).
        beta : float, optional
            Soft-min sharpness of the membership rules.

        Returns
        -------
        SurrogateClassHead
            The head; its output equals :meth:`predict_proba` with the same weights.
        """
        self._check_fitted()
        checked = self.layer_weights(weights)
        with self._keep_modes():
            return SurrogateClassHead.from_surrogate(self, weights=checked, beta=beta)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers!r}, n_clusters={self.n_clusters!r}, "
                f"embedding_dim={self.embedding_dim!r}, weights={self.weights!r})")
