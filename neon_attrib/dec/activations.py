"""Classifier activations for the surrogate: forward hooks on named layers, batch iteration over tensors or loaders,
and the classifier's train/eval flags kept as they were.

Only one batch lives on the model's device at a time; hooks are removed and modes restored also on errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["Data", "ModeGuard", "capture_activations", "class_labels", "collect_activations", "iter_batches",
           "resolve_layers", "stream_activations"]

Data = Any  # a tensor / array of images, or an iterable (DataLoader) of batches


def resolve_layers(model: nn.Module, layers: Sequence[str], owner: str) -> dict[str, nn.Module]:
    """The submodules of ``model`` named ``layers`` (unknown names and duplicates raise; errors name ``owner``)."""
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


def iter_batches(data: Data, labels: Any, batch_size: int, owner: str) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(images, labels or None)`` from tensors/arrays (in batches of ``batch_size``) or from an iterable of
    batches (``(images, labels)`` or images)."""
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
    acts, logits, labels, _ = collect_activations(model, layers, data, labels, batch_size=batch_size,
                                                  device=device, progress=progress, owner="capture_activations")
    return acts, logits, labels


def collect_activations(model: nn.Module, layers: Sequence[str], data: Data, labels: Any, *, batch_size: int,
                        device: str | torch.device | None, progress: bool,
                        owner: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None, tuple]:
    """:func:`capture_activations` with errors naming ``owner``; also returns the shape of one input image."""
    acts, logits, labs, shape = {}, [], [], None
    batches = stream_activations(model, layers, data, labels, batch_size=batch_size, device=device, progress=progress,
                                 owner=owner)
    for batch_acts, batch_logits, batch_labels, images in batches:
        for name, value in batch_acts.items():
            acts.setdefault(name, []).append(value.float().cpu())
        logits.append(batch_logits.float().cpu())
        labs.append(batch_labels)
        shape = tuple(images.shape[1:])
    if not logits:
        raise ValueError(f"{owner} received no data.")
    return {k: torch.cat(v) for k, v in acts.items()}, torch.cat(logits), class_labels(labs, owner), shape


def class_labels(batches: Sequence[torch.Tensor | None], owner: str, n_classes: int | None = None
                 ) -> torch.Tensor | None:
    """The labels of all batches as one int64 CPU tensor (None if a batch has none), checked: integer dtype (floats
    would be truncated) and, given ``n_classes``, in ``[0, n_classes)`` (another label can never be predicted).

    Raises
    ------
    ValueError
        Naming ``owner``, the dtype or the range received.
    """
    if not batches or any(batch is None for batch in batches):
        return None
    labels = torch.cat([torch.as_tensor(batch).reshape(-1) for batch in batches]).cpu()
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{owner}: labels must be integer class labels (an int dtype). Got dtype {labels.dtype}; "
                         f"a float label would be truncated to a class.")
    labels = labels.long()
    if n_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"{owner}: labels must lie in [0, {n_classes}) (the classifier has {n_classes} outputs). "
                         f"Got range [{int(labels.min())}, {int(labels.max())}].")
    return labels


def stream_activations(model: nn.Module, layers: Sequence[str], data: Data, labels: Any, *, batch_size: int,
                       device: str | torch.device | None, progress: bool, owner: str) -> Iterator[tuple]:
    """Per batch: ``({layer: activations}, logits, labels or None, images)``, with the activations and logits still on
    the model's device (``device=None``: the device of its first parameter).

    The model runs in eval mode without gradients; hooks are removed and its mode restored when the generator ends,
    is closed or raises. Each named layer must run exactly once per forward pass.
    """
    modules = resolve_layers(model, layers, owner)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with _Capture(modules, owner) as capture, torch.no_grad():
            for images, batch_labels in tqdm(iter_batches(data, labels, batch_size, owner), desc=f"{owner} forward",
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


class ModeGuard:
    """Save the ``training`` flag of every submodule of ``model`` and restore each one on exit (not recursively)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> ModeGuard:
        self.flags = [(module, module.training) for module in self.model.modules()]
        return self

    def __exit__(self, *exc) -> None:
        for module, training in self.flags:
            module.training = training
