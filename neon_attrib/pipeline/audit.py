"""The conservation audit of an explanation: what each rule dissipated, what reached the input, and the check that
nothing else was created or lost (:class:`Audit`), recorded during the backward pass by wrapping the rules' hooks."""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from zennit.core import Hook
from zennit.rules import Pass

__all__ = ["Audit", "ConservationError", "ConservationWarning", "default_tolerance"]


class ConservationWarning(UserWarning):
    """The relevance reaching the input differs from what the rules promise (see :class:`Audit`)."""


class ConservationError(ValueError):
    """Raised instead of :class:`ConservationWarning` when an explanation is run with ``strict=True``."""


#: the values an :class:`Audit` derives from its fields, computed once (forgotten when a field is assigned)
_DERIVED = ("finite", "relative_error", "passed")


@dataclass
class Audit:
    """Conservation audit of one explanation, per sample.

    A sample passes when every recorded value is finite and the relevance that no rule accounts for is within
    :attr:`tolerance` of :attr:`scale`, the score and the heatmap's mass: ``|unaccounted| <= tolerance · (|score| +
    Σ|relevance at the input|)``. What the rules dissipate does not widen the tolerance, so relevance that leaks where
    no rule ran cannot hide behind rules that absorb much; a NaN or an infinity in the score, the heatmap, the
    unaccounted relevance or any module's record fails.

    The derived values (:attr:`finite`, :attr:`relative_error`, :attr:`passed`) are computed once, when first read;
    assigning a field computes them again (changing a field's tensor in place does not).

    Attributes
    ----------
    score : torch.Tensor
        (n,) the explained score (the relevance put on the output).
    input_sum : torch.Tensor
        (n,) the relevance that reached the input(s).
    dissipated : torch.Tensor
        (n,) what the rules report to have absorbed (biases, stabilisers, the residual shares of the CNN rules):
        ``Σ_layers (Σ R_out − Σ R_in)``.
    unaccounted : torch.Tensor
        (n,) ``score − dissipated − input_sum``: relevance created or destroyed where no rule ran. ~0 (rounding)
        for a correctly covered model.
    per_module : dict of str to torch.Tensor
        What each hooked module dissipated, (n,) each (summed over its calls when a module runs several times); in
        the audit of an explanation, rows of one tensor.
    tolerance : float
        The relative tolerance of :attr:`ok`.
    input_mass : torch.Tensor, optional
        (n,) ``Σ |relevance at the input|``, the heatmap's mass; ``|input_sum|`` when not given.

    Examples
    --------
    >>> audit = Audit(score=torch.tensor([1.0]), input_sum=torch.tensor([0.2]), dissipated=torch.tensor([0.3]),
    ...               unaccounted=torch.tensor([0.5]), per_module={"a": torch.tensor([1e3]), "b": torch.tensor([-1e3])})
    >>> audit.ok   # half the score unaccounted for: fails, however much the modules moved
    False
    """

    score: torch.Tensor
    input_sum: torch.Tensor
    dissipated: torch.Tensor
    unaccounted: torch.Tensor
    per_module: dict[str, torch.Tensor] = field(repr=False)
    tolerance: float = 1e-2
    input_mass: torch.Tensor | None = field(default=None, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        for derived in _DERIVED:  # computed from the old value
            self.__dict__.pop(derived, None)

    @property
    def scale(self) -> torch.Tensor:
        """(n,) the magnitude the mismatch is compared with: ``|score| + Σ|relevance at the input|``."""
        mass = self.input_sum.abs() if self.input_mass is None else self.input_mass
        return self.score.abs() + mass

    @functools.cached_property
    def finite(self) -> torch.Tensor:
        """(n,) bool: the score, the input relevance, the unaccounted relevance and every module's record are
        finite."""
        values = [self.score, self.input_sum, self.dissipated, self.unaccounted,
                  *(() if self.input_mass is None else (self.input_mass,)), *self.per_module.values()]
        device = self.score.device
        values = [value if value.device == device else value.to(device) for value in values]
        if len({value.shape for value in values}) > 1:
            values = list(torch.broadcast_tensors(*values))
        return torch.isfinite(torch.stack(values)).all(0)  # one check of every value

    @functools.cached_property
    def relative_error(self) -> torch.Tensor:
        """(n,) ``|unaccounted| / scale``: 0 where both are 0, inf where the scale is 0 alone or a value is not
        finite."""
        # with finite values, NaN comes from 0 / 0 only (nothing created out of nothing: 0), and a scale of 0 with
        # relevance unaccounted for gives inf
        error = (self.unaccounted.abs() / self.scale.clamp_min(0)).nan_to_num_(0.0, math.inf, math.inf)
        return torch.where(self.finite, error, math.inf)

    @functools.cached_property
    def passed(self) -> torch.Tensor:
        """(n,) bool: which samples pass (finite, relative error within :attr:`tolerance`)."""
        return self.finite & (self.relative_error <= self.tolerance)

    @property
    def ok(self) -> bool:
        """Whether every sample passes (:attr:`passed`)."""
        return bool(self.passed.all())

    def __str__(self) -> str:
        errors = self.relative_error
        worst = float(errors.max()) if errors.numel() else 0.0
        return self._describe(self.ok, worst, int((~self.finite).sum()))

    def _describe(self, ok: bool, worst: float, nonfinite: int) -> str:
        finite = f", {nonfinite} with NaN or inf" if nonfinite else ""
        return (f"Audit(n={self.score.numel()}, ok={ok}, worst relative mismatch={worst:.2e}, "
                f"tolerance={self.tolerance:g}{finite})")


def default_tolerance(dtype: torch.dtype, precision: str = "exact") -> float:
    """Relative audit tolerance: 1e-2 for 16/32-bit floats, 1e-6 for float64; under the ``"fast"`` precision policy
    (TensorFloat-32 products, see :func:`precision_mode`) 5e-2 for 16/32-bit floats."""
    if dtype == torch.float64:
        return 1e-6
    return 5e-2 if precision == "fast" else 1e-2


class _AuditRecorder:
    """Wraps each hooked module's ``backward`` to record ``Σ R_out`` and ``Σ R_in``, per sample where the batch allows.

    A module call costs two reductions (float32 sums, float64 for float64 tensors); :meth:`audit` stacks the records
    once, in float64, and takes the differences and their sum in one operation each.
    """

    def __init__(self, hooked: dict[str, Hook], n: int):
        self.n = n
        #: one ``(name, Σ R_out, Σ R_in or None)`` per module call: (n,) sums per sample, or 0-d totals when the
        #: tensors are not batched over n
        self.records: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self.wrapped: list[Hook] = []
        #: the last input relevance summed and its sum: a pass-through rule (a ReLU) hands that very tensor to the
        #: next module down as its output relevance, whose sum is then not taken again
        self._last: tuple[torch.Tensor, int, bool, torch.Tensor] | None = None
        for name, hook in hooked.items():
            if not _passes_through(hook):  # a pass-through dissipates nothing: no need to sum its relevance
                self._wrap(name, hook)

    def _record(self, name: str, out: torch.Tensor, inp: torch.Tensor | None) -> None:
        n = self.n
        rows = bool(n) and _batched(out, n) and (inp is None or _batched(inp, n))
        last = self._last
        if last is not None and last[0] is out and last[1] == out._version and last[2] == rows:
            out_sum = last[3]
        else:
            out_sum = _row_sums(out, n) if rows else _total(out)
        inp_sum = None
        if inp is not None:
            inp_sum = _row_sums(inp, n) if rows else _total(inp)
            self._last = (inp, inp._version, rows, inp_sum)
        self.records.append((name, out_sum, inp_sum))

    def _wrap(self, name: str, hook: Hook) -> None:
        original = hook.backward

        def backward(module, grad_input, grad_output):
            result = original(module, grad_input, grad_output)
            out = grad_output[0] if grad_output else None
            if out is not None:
                self._record(name, out, result[0] if result else None)
            return result

        hook.backward = backward
        self.wrapped.append(hook)

    def close(self) -> None:
        """Unwrap the hooks (they may serve further explanations: :class:`Explainer`)."""
        for hook in self.wrapped:
            hook.__dict__.pop("backward", None)
        self._last = None

    def audit(self, score: torch.Tensor, input_sum: torch.Tensor, input_mass: torch.Tensor, tolerance: float) -> Audit:
        """Per sample when the score, the input and every module's record are batched alike, else in total (n = 1)."""
        per_sample = score.shape[0] == self.n and input_sum.shape[0] == self.n and all(
            out.ndim for _, out, _ in self.records)
        if not per_sample:
            score, input_sum, input_mass = (value.sum().reshape(1) for value in (score, input_sum, input_mass))
        width, device = score.shape[0], score.device
        sums = [score, input_sum if input_sum.device == device else input_sum.to(device)]
        zeros = None
        for _, out, inp in self.records:
            for value in (out, inp):
                if value is None:  # no relevance flows to the module's input (it needs no gradient)
                    value = zeros = torch.zeros(width, dtype=torch.float64, device=device) if zeros is None else zeros
                elif not per_sample:
                    value = value.sum().reshape(1)
                sums.append(value if value.device == device else value.to(device))
        # one table (1 + calls, out/in, n) led by (score, input_sum): one subtraction gives score − input_sum and
        # what each call dissipated (stack promotes the float32 records to the score's float64)
        table = torch.stack(sums).view(len(sums) // 2, 2, width)
        moved = table[:, 0] - table[:, 1]
        dissipated = moved[1:].sum(0)
        if input_mass.device != device:
            input_mass = input_mass.to(device)
        return Audit(score=score, input_sum=input_sum, dissipated=dissipated, unaccounted=moved[0] - dissipated,
                     per_module=self._per_module(moved[1:]), tolerance=tolerance, input_mass=input_mass)

    def _per_module(self, moved: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: Σ R_out − Σ R_in}`` from the rows of ``moved`` (one per call), a module's calls added in order."""
        calls: dict[str, list[int]] = {}
        for index, (name, _, _) in enumerate(self.records):
            calls.setdefault(name, []).append(index)
        rows = moved.unbind(0)
        return {name: functools.reduce(operator.add, (rows[index] for index in indices))
                for name, indices in calls.items()}


def _passes_through(hook: Hook) -> bool:
    """Rules that hand the output relevance to the input unchanged: Zennit's ``Pass`` and rules that declare it with a
    class attribute ``passes_relevance_through = True`` (the fast ``FastPass``)."""
    return isinstance(hook, Pass) or getattr(type(hook), "passes_relevance_through", False)


def _rows(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """``tensor`` (k·n, ...) detached and viewed as (n, k, ...): splitting the first dimension is a view for any
    strides (``reshape(n, -1)`` copies a ``channels_last`` or broadcast tensor)."""
    tensor = tensor.detach()
    return tensor.view(n, tensor.shape[0] // n, *tensor.shape[1:])


def _accumulation(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a module record is summed in: float64 for float64 tensors, else float32. A float64 sum of a float32
    tensor first writes a float64 copy of it (twice the tensor's memory traffic, on every device); float32's pairwise
    summation errs by ~1e-6 of the relevance mass, far below the audit's 1e-2 tolerance. :meth:`_AuditRecorder.audit`
    stacks the records into float64 with the score."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _row_sums(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) sums of a tensor batched over ``n`` (its first dimension a multiple of ``n``), in :func:`_accumulation`'s
    dtype."""
    rows = _rows(tensor, n)
    return rows.sum(tuple(range(1, rows.ndim)), dtype=_accumulation(tensor))


def _total(tensor: torch.Tensor) -> torch.Tensor:
    """The 0-d sum of ``tensor``, in :func:`_accumulation`'s dtype."""
    return tensor.detach().sum(dtype=_accumulation(tensor))


def _batched(tensor: torch.Tensor, n: int) -> bool:
    return tensor.ndim > 0 and tensor.shape[0] % n == 0


def _sample_sums(tensor: torch.Tensor, n: int, absolute: bool = False) -> torch.Tensor:
    """Per-sample sums (n,) when ``tensor`` is batched over ``n``, else its total as a (1,) tensor, in float64;
    ``absolute``: sums of absolute values (without an absolute copy)."""
    if n and tensor.ndim and tensor.shape[0] == n:
        rows = _rows(tensor, n)
        dims: tuple[int, ...] | None = tuple(range(1, rows.ndim))
    else:
        rows, dims = tensor.detach(), None
    if absolute:
        sums = torch.linalg.vector_norm(rows, 1, dim=dims, dtype=torch.float64)
    else:
        sums = rows.sum(dims, dtype=torch.float64)
    return sums if dims is not None else sums.reshape(1)


def _reached_sums(reached: Sequence[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample sums and absolute sums (:func:`_sample_sums`) of the floating relevance where the backward pass
    ended, added over the tensors."""
    floating = [r for r in reached if r.is_floating_point()]
    if not floating:
        zeros = torch.zeros(n or 1, dtype=torch.float64, device=reached[0].device if reached else None)
        return zeros, zeros
    return (functools.reduce(operator.add, (_sample_sums(r, n) for r in floating)),
            functools.reduce(operator.add, (_sample_sums(r, n, absolute=True) for r in floating)))


def _report(audit: Audit, owner: str, strict: bool) -> None:
    """Warn (or raise with ``strict``) when ``audit`` fails: one host synchronisation (the worst relative error) when
    it passes, one more when a sample's error is infinite (to count the samples with NaN or inf)."""
    errors = audit.relative_error
    if not errors.numel():
        return
    worst = float(errors.max())
    # a non-finite sample's error is inf, so every sample passes when the worst one does (but for an inf tolerance)
    if worst <= audit.tolerance and (worst < math.inf or audit.ok):
        return
    nonfinite = int((~audit.finite).sum()) if worst == math.inf else 0
    description = audit._describe(False, worst, nonfinite)
    if nonfinite:
        message = (f"{owner}: the explanation is not finite ({description}): the score, the relevance or a layer's "
                   f"relevance holds NaN or inf (an overflow in the model or its rules, or non-finite weights). Do "
                   f"not trust this heatmap; use float64 or inputs of a smaller magnitude. The audit is in the "
                   f"result's 'audit'.")
    else:
        message = (f"{owner}: the relevance is not conserved where the rules promise it ({description}): relevance "
                   f"was created or destroyed by operations without an LRP rule (e.g. a residual addition or a "
                   f"normalisation that is not a module, or an unsupported layer). Do not trust this heatmap; canonize "
                   f"the model (Zennit canonizers) or use a supported architecture. The audit is in the result's "
                   f"'audit'.")
    if strict:
        raise ConservationError(message)
    warnings.warn(message, ConservationWarning, stacklevel=3)
