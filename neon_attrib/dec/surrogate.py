"""Activation-clustering surrogate of a classifier (SPEC §5): one DEC per layer, class posteriors per cluster.

For each selected layer ``j`` a :class:`~neon_attrib.dec.DEC` clusters the layer's activations; the surrogate of the
layer is ``p_j(y|x) = sum_k p(y | z^j = k) q^j_k(x)`` with ``p(y | z = k)`` the class frequencies of the training
examples assigned to ``k``, and the full surrogate is ``sum_j w_j p_j(y|x) / sum_j w_j``. The same embeddings give
similar training examples (weighted embedding distance) and concepts (training examples nearest to each centroid).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .model import DEC, _resolve_device

__all__ = ["ActivationClusteringSurrogate", "capture_activations"]

logger = logging.getLogger(__name__)

Data = Any  # a tensor / array of images, or an iterable (DataLoader) of batches


def _resolve_layers(model: nn.Module, layers: Sequence[str], owner: str) -> dict[str, nn.Module]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise TypeError(f"The 'layers' parameter of {owner} must be a non-empty sequence of module names. "
                        f"Got {layers!r} instead.")
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        if not isinstance(name, str) or name == "" or name not in modules:
            known = [n for n in modules if n][:12]
            raise ValueError(f"Unknown layer name {name!r} for {owner}: the model has no such submodule. "
                             f"Known names start with {known}.")
        out[name] = modules[name]
    if len(out) != len(layers):
        raise ValueError(f"The 'layers' parameter of {owner} contains duplicates: {list(layers)}.")
    return out


class _Capture:
    """Forward hooks that record the output of named modules for one forward call at a time."""

    def __init__(self, modules: Mapping[str, nn.Module], owner: str):
        self.modules = modules
        self.owner = owner
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles: list = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{self.owner} can only capture layers that return one tensor; {name!r} returned "
                                f"{type(output).__name__}.")
            self.calls[name] = self.calls.get(name, 0) + 1
            self.outputs[name] = output.detach()
        return hook

    def reset(self) -> None:
        self.outputs.clear()
        self.calls.clear()

    def check(self) -> None:
        for name in self.modules:
            count = self.calls.get(name, 0)
            if count != 1:
                raise ValueError(f"Layer {name!r} ran {count} times in one forward pass of the model; {self.owner} "
                                 f"needs a module that runs exactly once (use a dedicated module, not a shared one).")


def _iter_batches(data: Data, labels: Any, batch_size: int, owner: str) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(images, labels or None)`` from tensors/arrays or from an iterable of batches."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        if data.ndim < 2:
            raise ValueError(f"{owner} expects images of shape (n, ...). Got shape {tuple(data.shape)} instead.")
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
            if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
                raise ValueError(f"{owner} got {data.shape[0]} images but labels of shape {tuple(labels.shape)}; "
                                 f"expected ({data.shape[0]},).")
        for start in range(0, data.shape[0], batch_size):
            yield data[start:start + batch_size], (None if labels is None else labels[start:start + batch_size])
        return
    if labels is not None:
        raise ValueError(f"{owner}: pass labels only with an image tensor; a loader must yield (images, labels).")
    if not isinstance(data, Iterable):
        raise TypeError(f"{owner} expects a tensor of images or an iterable of batches. Got {type(data).__name__}.")
    for batch in data:
        if isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise ValueError(f"{owner} received an empty batch.")
            images = batch[0]
            batch_labels = batch[1] if len(batch) > 1 else None
        else:
            images, batch_labels = batch, None
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{owner} expects batches of image tensors. Got {type(images).__name__} instead.")
        yield images, (None if batch_labels is None else torch.as_tensor(batch_labels))


@torch.no_grad()
def capture_activations(model: nn.Module, layers: Sequence[str], data: Data, labels: Any = None, *,
                        batch_size: int = 128, device: str | torch.device | None = None,
                        progress: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Run ``model`` over ``data`` and collect the outputs of the named layers on the CPU.

    Only one batch lives on ``device`` at a time; the hooks are removed afterwards (also on errors), and the model's
    train/eval mode is restored.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier (run in eval mode).
    layers : sequence of str
        Names from ``model.named_modules()``.
    data : torch.Tensor, numpy.ndarray or iterable
        Images, or batches of ``(images, labels)`` / images.
    labels : array-like, optional
        Labels when ``data`` is a tensor.
    batch_size : int
        Batch size when ``data`` is a tensor.
    device : str or torch.device, optional
        Where the model runs (default: the model's device).
    progress : bool
        Show a progress bar.

    Returns
    -------
    activations : dict of str to torch.Tensor
        ``(n, *layer_shape)`` per layer (CPU, float32).
    logits : torch.Tensor
        The model outputs ``(n, n_classes)`` (CPU).
    labels : torch.Tensor or None
        The labels (CPU, int64) if given.
    """
    acts, logits, labels, _ = _capture_all(model, layers, data, labels, batch_size=batch_size, device=device,
                                           progress=progress, owner="capture_activations")
    return acts, logits, labels


def _capture_all(model, layers, data, labels, *, batch_size, device, progress, owner):
    acts, logits, labs, shape = {}, [], [], None
    for batch_acts, batch_logits, batch_labels, images in _stream(model, layers, data, labels, batch_size=batch_size,
                                                                  device=device, progress=progress, owner=owner):
        for name, value in batch_acts.items():
            acts.setdefault(name, []).append(value.float().cpu())
        logits.append(batch_logits.float().cpu())
        labs.append(batch_labels)
        shape = tuple(images.shape[1:])
    if not logits:
        raise ValueError(f"{owner} received no data.")
    label_tensor = None if any(lab is None for lab in labs) else torch.cat(labs).long().cpu()
    return {k: torch.cat(v) for k, v in acts.items()}, torch.cat(logits), label_tensor, shape


def _stream(model, layers, data, labels, *, batch_size, device, progress, owner):
    modules = _resolve_layers(model, layers, owner)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with _Capture(modules, owner) as capture, torch.no_grad():
            for images, batch_labels in tqdm(_iter_batches(data, labels, batch_size, owner), desc=f"{owner} forward",
                                             disable=not progress, leave=False):
                capture.reset()
                logits = model(images.to(device))
                capture.check()
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                    raise ValueError(f"{owner} expects the model to return logits of shape (n, n_classes). "
                                     f"Got {getattr(logits, 'shape', type(logits).__name__)} instead.")
                yield {name: capture.outputs[name] for name in modules}, logits.detach(), batch_labels, images
    finally:
        model.train(was_training)


class ActivationClusteringSurrogate:
    """Surrogate of a classifier from Deep Embedded Clustering of its activations at several layers.

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
        Layer weights ``w_j`` of the full surrogate and of the similarity; ``None`` means equal weights. Can be
        changed after fitting (:attr:`weights`).
    dec_params : dict, optional
        Extra keyword arguments for every :class:`~neon_attrib.dec.DEC` (e.g. ``pretrain_epochs``), or a dict from
        layer name to such a dict.
    batch_size : int
        Batch size of the classifier passes.
    device : str or torch.device, optional
        Where the DEC models train and run (default: CUDA when available). Activations are kept on the CPU and moved
        there one minibatch at a time.
    seed : int, optional
        Base seed; layer ``j`` uses ``seed + j``.
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
    fit_time_ : dict of str to float
        Seconds spent in the classifier pass (``"capture"``) and per layer's DEC.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 3))
    >>> images, labels = torch.randn(60, 3, 8, 8), torch.randint(0, 3, (60,))
    >>> sur = ActivationClusteringSurrogate(net, ["1", "3"], n_clusters=3, embedding_dim=4, seed=0, progress=False,
    ...                                     dec_params={"pretrain_epochs": 2, "max_iter": 10, "hidden_dims": (16,)})
    >>> sur.fit(images, labels).predict_proba(images).shape
    torch.Size([60, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        n_clusters: int = 15,
        embedding_dim: int = 20,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        *,
        dec_params: Mapping[str, Any] | None = None,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        seed: int | None = None,
        progress: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"The 'model' parameter of {type(self).__name__} must be a torch.nn.Module. "
                            f"Got {type(model).__name__} instead.")
        self.model = model
        self.layers = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else layers
        _resolve_layers(model, self.layers, type(self).__name__)
        self.n_clusters = n_clusters
        self.embedding_dim = embedding_dim
        self.dec_params = dec_params
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.progress = progress
        self.weights = weights

    # ------------------------------------------------------------------ weights
    @property
    def weights(self) -> torch.Tensor:
        """Layer weights (a float64 tensor in the order of :attr:`layers`); assign a sequence or dict to change them."""
        return self._weights.clone()

    @weights.setter
    def weights(self, value) -> None:
        self._weights = self._check_weights(value)

    def _check_weights(self, value) -> torch.Tensor:
        name = type(self).__name__
        if value is None:
            return torch.ones(len(self.layers), dtype=torch.float64)
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.layers)
            if unknown:
                raise ValueError(f"Unknown layer name(s) {sorted(unknown)} in the weights of {name}; layers are "
                                 f"{self.layers}.")
            value = [float(value.get(layer, 0.0)) for layer in self.layers]
        try:
            w = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"The weights of {name} must be numbers. Got {value!r} instead.") from exc
        if w.ndim != 1 or w.shape[0] != len(self.layers):
            raise ValueError(f"The weights of {name} must have one entry per layer ({len(self.layers)}). "
                             f"Got shape {tuple(w.shape)} instead.")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"The weights of {name} must be finite, >= 0 and not all zero. Got {w.tolist()} instead.")
        return w

    # ------------------------------------------------------------------ fitting
    def _dec_kwargs(self, layer: str) -> dict:
        params = dict(self.dec_params or {})
        if params and all(key in self.layers for key in params):
            params = dict(params.get(layer, {}))
        return params

    def _check_fitted(self) -> None:
        if not hasattr(self, "decs_"):
            raise ValueError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' first.")

    def fit(self, images: Data, labels: Any = None) -> ActivationClusteringSurrogate:
        """Capture the layers' activations on the training data, fit one DEC per layer and the class posteriors.

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
            Missing or mismatched labels, labels outside the classifier's classes, too few samples.
        """
        name = type(self).__name__
        if isinstance(images, (torch.Tensor, np.ndarray)) and labels is None:
            raise ValueError(f"{name}.fit needs labels with an image tensor (the class posteriors p(y|z) are "
                             f"estimated from them).")
        device = _resolve_device(self.device)
        start = time.perf_counter()
        acts, logits, labels_t, shape = _capture_all(self.model, self.layers, images, labels,
                                                     batch_size=self.batch_size, device=None,
                                                     progress=self.progress, owner=name)
        fit_time = {"capture": time.perf_counter() - start}
        if labels_t is None:
            raise ValueError(f"{name}.fit: the loader must yield (images, labels) batches.")
        n_classes = logits.shape[1]
        if labels_t.min() < 0 or labels_t.max() >= n_classes:
            raise ValueError(f"{name}.fit: labels must lie in [0, {n_classes}) (the classifier has {n_classes} "
                             f"outputs). Got range [{int(labels_t.min())}, {int(labels_t.max())}].")
        self.input_shape_ = shape
        decs, posteriors, embeddings, assignments = {}, {}, {}, {}
        prior = torch.bincount(labels_t, minlength=n_classes).double()
        prior /= prior.sum()
        for j, layer in enumerate(self.layers):
            start = time.perf_counter()
            kwargs = {"device": device, "progress": self.progress, **self._dec_kwargs(layer)}
            seed = None if self.seed is None else int(self.seed) + j
            dec = DEC(n_clusters=self.n_clusters, embedding_dim=self.embedding_dim, seed=seed, **kwargs)
            logger.info("%s: fitting DEC on layer %r with activations of shape %s.", name, layer,
                        tuple(acts[layer].shape))
            dec.fit(acts[layer])
            z = dec.transform(acts[layer])
            assign = dec.proba_from_embedding(z).argmax(dim=1)
            del acts[layer]  # free the activations of this layer as soon as possible
            decs[layer] = dec
            embeddings[layer] = z
            assignments[layer] = assign
            posteriors[layer] = self._posteriors(assign, labels_t, n_classes, prior)
            fit_time[layer] = time.perf_counter() - start
        self.decs_ = decs
        self.class_posteriors_ = posteriors
        self.train_embeddings_ = embeddings
        self.train_assignments_ = assignments
        self.train_labels_ = labels_t
        self.train_predictions_ = logits.argmax(dim=1)
        self.n_classes_ = n_classes
        self.n_train_ = int(labels_t.shape[0])
        self.fit_time_ = fit_time
        return self

    def _posteriors(self, assign: torch.Tensor, labels: torch.Tensor, n_classes: int,
                    prior: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(self.n_clusters, n_classes, dtype=torch.float64)
        counts.index_put_((assign, labels), torch.ones(labels.shape[0], dtype=torch.float64), accumulate=True)
        totals = counts.sum(dim=1, keepdim=True)
        post = torch.where(totals > 0, counts / totals.clamp_min(1), prior.unsqueeze(0))
        return post.float()

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
        for acts, batch_logits, batch_labels, _ in _stream(self.model, self.layers, images, labels,
                                                        batch_size=self.batch_size, device=None, progress=False,
                                                        owner=name):
            for layer in self.layers:
                z[layer].append(self.decs_[layer].transform(acts[layer].float()))
            logits.append(batch_logits.float().cpu())
            labs.append(batch_labels)
        if not logits:
            raise ValueError(f"{name} received no images.")
        return {
            "z": {layer: torch.cat(v) for layer, v in z.items()},
            "logits": torch.cat(logits),
            "labels": None if any(lab is None for lab in labs) else torch.cat(labs).long().cpu(),
        }

    def _layer_proba_from(self, z: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {layer: self.decs_[layer].proba_from_embedding(z[layer]) @ self.class_posteriors_[layer]
                for layer in self.layers}

    def _mix(self, layer_proba: Mapping[str, torch.Tensor], weights=None) -> torch.Tensor:
        w = self._weights if weights is None else self._check_weights(weights)
        total = sum(float(w[j]) * layer_proba[layer] for j, layer in enumerate(self.layers))
        return total / float(w.sum())

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
        w = self._weights if weights is None else self._check_weights(weights)
        return self._nearest(self._infer(x)["z"], w, k, chunk_size)

    def _nearest(self, z: Mapping[str, torch.Tensor], w: torch.Tensor, k: int,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = next(iter(z.values())).shape[0]
        best_d = torch.full((n, 0), math.inf, dtype=torch.float64)
        best_i = torch.zeros((n, 0), dtype=torch.long)
        for start in range(0, self.n_train_, chunk_size):
            stop = min(start + chunk_size, self.n_train_)
            dist = torch.zeros(n, stop - start, dtype=torch.float64)
            for j, layer in enumerate(self.layers):
                if float(w[j]) != 0.0:
                    train = self.train_embeddings_[layer][start:stop].double()
                    dist += float(w[j]) * torch.cdist(z[layer].double(), train)
            cand_d = torch.cat([best_d, dist], dim=1)
            cand_i = torch.cat([best_i, torch.arange(start, stop).expand(n, -1)], dim=1)
            top = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=False, sorted=True)
            best_d, best_i = top.values, torch.gather(cand_i, 1, top.indices)
        return best_i, best_d

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
        dist = torch.cdist(self.decs_[layer].cluster_centers_.double(), self.train_embeddings_[layer].double())
        top = torch.topk(dist, per_cluster, dim=1, largest=False, sorted=True)
        return top.indices, top.values

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise ValueError(f"Unknown layer name {layer!r} for {type(self).__name__}; fitted layers are "
                             f"{self.layers}.")

    def head(self, layer: str, beta: float | None = None):
        """The attributable DEC head of ``layer``: classifier input -> layer -> encoder -> cluster evidence.

        See :class:`~neon_attrib.dec.heads.DECHead`; ``neon_attrib.explain(head, images)`` explains "why is this image
        in its concept of ``layer``" in pixels.
        """
        from .heads import DECHead, TruncatedModel

        self._check_fitted()
        self._check_layer(layer)
        return DECHead.from_dec(self.decs_[layer], features=TruncatedModel(self.model, layer), beta=beta)

    def class_head(self, weights=None, beta: float | None = None):
        """The attributable surrogate: classifier input -> all layers -> encoders -> surrogate class probabilities.

        See :class:`~neon_attrib.dec.heads.SurrogateClassHead`.
        """
        from .heads import SurrogateClassHead

        self._check_fitted()
        return SurrogateClassHead.from_surrogate(self, weights=weights, beta=beta)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers}, n_clusters={self.n_clusters}, "
                f"embedding_dim={self.embedding_dim}, weights={self._weights.tolist()})")
