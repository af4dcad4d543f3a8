"""PyTorch's process-wide switches around an explanation: the precision policy (TF32, cuDNN algorithms) and batch
norms that PyTorch would refuse (``eps <= 0``). Public through :mod:`neon_attrib.pipeline`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["PRECISIONS", "precision_mode", "guard_batch_norms", "unguard_batch_norms"]


# ---------------------------------------------------------------------------------------------------------------------
# precision policy
PRECISIONS = ("exact", "fast")
"""The precision policies of an explanation: ``"exact"`` (the default) and ``"fast"`` (see :func:`precision_mode`)."""


def check_precision(precision: str, owner: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"The 'precision' parameter of {owner} must be one of {PRECISIONS}. Got {precision!r} "
                         f"instead.")
    return precision


def _precision_flags() -> list[tuple[Any, str, Any, Any]]:
    """``(object, attribute, exact value, fast value)`` of every process-wide switch the policy sets (a fast value of
    None keeps the caller's).

    PyTorch >= 2.9 has per-backend ``fp32_precision`` switches, and refuses to read the older ``allow_tf32`` ones
    once the newer were set; older versions have only ``allow_tf32``. The policy uses the newer where they exist.
    """
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    if hasattr(cuda.matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        tf32 = [(cuda.matmul, "fp32_precision", "ieee", "tf32"), (cudnn.conv, "fp32_precision", "ieee", "tf32"),
                (cudnn.rnn, "fp32_precision", "ieee", "tf32")]
    else:  # pragma: no cover - torch < 2.9
        tf32 = [(cuda.matmul, "allow_tf32", False, True), (cudnn, "allow_tf32", False, True)]
    return tf32 + [(cudnn, "deterministic", True, None), (cudnn, "benchmark", False, True)]


class _PrecisionFlags:
    """Reference-counted process-wide switches: the first explanation to enter saves the caller's values, the last to
    leave restores them; while explanations of both policies run (threads), the exact policy's values hold."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = {precision: 0 for precision in PRECISIONS}
        self.saved: list[Any] | None = None

    def enter(self, precision: str) -> None:
        with self.lock:
            flags = _precision_flags()
            if not any(self.active.values()):
                self.saved = [getattr(obj, name) for obj, name, _, _ in flags]
            self.active[precision] += 1
            self._apply(flags)

    def leave(self, precision: str) -> None:
        with self.lock:
            flags = _precision_flags()
            self.active[precision] -= 1
            if any(self.active.values()):
                self._apply(flags)
            elif self.saved is not None:
                for (obj, name, _, _), value in zip(flags, self.saved):
                    setattr(obj, name, value)
                self.saved = None

    def _apply(self, flags: list[tuple[Any, str, Any, Any]]) -> None:
        exact = self.active["exact"] > 0
        for (obj, name, exact_value, fast_value), saved in zip(flags, self.saved):
            setattr(obj, name, exact_value if exact else saved if fast_value is None else fast_value)


_FLAGS = _PrecisionFlags()


@contextlib.contextmanager
def precision_mode(precision: str = "exact", device: torch.device | str = "cuda") -> Iterator[None]:
    """Context manager: PyTorch's CUDA precision switches for one explanation on ``device``, restored on exit.

    * ``"exact"``: float32 matrix products and convolutions in full float32 (TensorFloat-32 off, which cuDNN and
      cuBLAS otherwise use on Ampere and later GPUs), deterministic cuDNN convolution algorithms, no autotuning. The
      same input gives the same relevance on every call, and a GPU's equals the CPU's to float32 rounding.
    * ``"fast"``: TensorFloat-32 on (products rounded to 10 mantissa bits, ~1e-3 each; LRP's rules amplify it where
      they divide by small pre-activations), cuDNN autotuning; ``cudnn.deterministic`` stays as the caller set it.

    The switches are process-wide: nested and concurrent explanations are counted, the caller's values come back
    when the last one leaves, and while an exact and a fast explanation overlap (two threads) both run exact. On a
    device other than CUDA nothing is changed. Work that other threads run on the GPU meanwhile sees the switches too.

    Examples
    --------
    >>> with precision_mode("exact", "cuda"):
    ...     torch.backends.cudnn.deterministic
    True
    """
    precision = check_precision(precision, "precision_mode")
    if torch.device(device).type != "cuda":
        yield
        return
    _FLAGS.enter(precision)
    try:
        yield
    finally:
        _FLAGS.leave(precision)


# ---------------------------------------------------------------------------------------------------------------------
# batch norms with eps <= 0
#: where a guarded batch norm keeps its scale and shift
_AFFINE = "_neon_attrib_affine"


def _batch_norm_eval(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode batch norm in element-wise operations (see :func:`guard_batch_norms`); ``√1 = 1`` and ``1 / 1 = 1``
    are exact, so a merged norm (mean 0, var 1, weight 1, bias 0, eps 0) returns ``x + 0`` exactly, in one
    operation. The scale and shift are computed once and again only when a statistic or parameter changes."""
    tensors = (self.running_mean, self.running_var, self.weight, self.bias)
    key = (self.eps,) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cached = self.__dict__.get(_AFFINE)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # usable by later calls with gradients too
            scale = 1.0 / torch.sqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = self.weight * scale
            shift = -self.running_mean * scale
            if self.bias is not None:
                shift = self.bias + shift
            identity = bool(torch.all(scale == 1) & torch.all(shift == 0))
        cached = self.__dict__[_AFFINE] = (key, scale, shift, identity)
    _, scale, shift, identity = cached
    if identity:
        return x + 0.0
    shape = (-1,) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def guard_batch_norms(model: nn.Module) -> list[nn.Module]:
    """Give every batch norm of ``model`` with ``eps <= 0`` a forward that PyTorch runs: ``x · s + t`` in element-wise
    operations, with ``s = weight / √(running_var + eps)`` and ``t = bias − running_mean · s``.

    Zennit 1.0's batch-norm merge leaves the merged norm as the identity with ``eps = 0``, which PyTorch 2.10 and 2.11
    refuse even in eval mode. The pipeline calls this on its copy after the canonizers ran, so every canonizer
    (Zennit's, the fast ones, your own) is covered. The result equals the batch norm's own to rounding, and a merged
    norm (``s = 1``, ``t = 0``) passes its input through exactly. Returns the guarded modules (an instance attribute
    ``forward``; delete it to undo).

    Raises
    ------
    ValueError
        For such a batch norm in training mode (or without running statistics): explain models in eval mode.

    Examples
    --------
    >>> norm = nn.BatchNorm2d(3, eps=0.0).eval()
    >>> guard_batch_norms(norm) == [norm]
    True
    >>> x = torch.randn(2, 3, 4, 4)
    >>> torch.equal(norm(x), x)
    True
    """
    guarded = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.eps > 0:
            continue
        if module.training or module.running_mean is None or module.running_var is None:
            raise ValueError(f"{name or 'A batch norm'} ({type(module).__name__}) has eps={module.eps} and normalises "
                             f"with batch statistics (training mode or no running statistics), which PyTorch refuses "
                             f"for eps <= 0. Call model.eval() before explaining, or give the batch norm eps > 0.")
        if "forward" not in module.__dict__:
            module.forward = _batch_norm_eval.__get__(module)
            guarded.append(module)
    return guarded


def unguard_batch_norms(modules: list[nn.Module]) -> None:
    """Undo :func:`guard_batch_norms` on the modules it returned."""
    for module in modules:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_AFFINE, None)
