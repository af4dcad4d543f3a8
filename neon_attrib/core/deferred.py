"""Conditions that rules check on the device during a backward pass, settled once at its end.

A rule with a cheaper computation that is exact only under a condition of the data (the fast Gamma rule's shortcut
needs non-negative inputs and no relevance where the layer's output is not positive) would read the condition back
to the host (``bool(tensor)``) in every layer: on a GPU each read waits for every queued kernel, so the host stops
running ahead of the device. Inside :meth:`DeferredChecks.collecting` (the explanation step of
:mod:`neon_attrib.pipeline` opens it) such a rule instead follows its *prediction* (what the condition was the last
time) and records the condition as a device tensor; :meth:`DeferredChecks.settle` reads them all back in one
transfer, updates every prediction, and says whether each prediction that was followed held. When one did not, the
caller computes the explanation again without deferral, where every rule checks its condition before it chooses:
results are exact either way.

Outside :meth:`~DeferredChecks.collecting` (a rule used through Zennit directly), or before a rule has a prediction
(its first backward pass), rules check on the host as before: :func:`decide` does both.

A condition is a boolean (a 0-dim tensor or a value already read) or a tuple of :class:`Bound`: reductions that must
be ``>= 0`` or ``<= 0`` (NaN never holds). Bounds cost a rule one reduction each and nothing more; the comparisons
run once per explanation, over all of them at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch

__all__ = ["Bound", "Condition", "DeferredChecks", "decide", "holds"]

_ACTIVE: ContextVar[DeferredChecks | None] = ContextVar("neon_attrib_deferred_checks", default=None)


class Bound(NamedTuple):
    """Part of a condition: the scalar tensor ``value`` is ``>= 0`` (``lower=True``) or ``<= 0`` (``lower=False``);
    NaN holds neither.

    Examples
    --------
    >>> x = torch.tensor([0.5, 0.0, 2.0])
    >>> holds((Bound(x.amin(), lower=True), Bound(x.amax() - 2.0, lower=False)))
    True
    """

    value: torch.Tensor
    lower: bool


#: what a rule checks: a boolean (tensor or value) or bounds that must all hold
Condition = torch.Tensor | bool | tuple[Bound, ...]


def holds(condition: Condition) -> bool:
    """Whether ``condition`` holds, read on the host (at most one read per device)."""
    return _read_all([condition])[0]


class DeferredChecks:
    """The conditions recorded in one explanation, with the predictions they update.

    Parameters
    ----------
    defer : bool
        Let rules follow their predictions and record the conditions as device tensors (default). ``False``: every
        rule reads its condition on the host before it chooses (the exact retake after a failed prediction) and the
        values are only recorded, so that :meth:`settle` updates the predictions alike.

    A rule whose module runs several times in one forward pass records one condition per call; its prediction becomes
    whether the condition held in every call, so that a call where it fails does not make the next explanation follow
    a prediction that fails again.

    Examples
    --------
    >>> checks, predictions = DeferredChecks(), {"shortcut": True}
    >>> with checks.collecting():
    ...     active = DeferredChecks.active()
    >>> active is checks
    True
    >>> decide(predictions, "shortcut", torch.tensor(False), checks)  # follows the prediction, records the condition
    True
    >>> checks.settle(), predictions
    (False, {'shortcut': False})
    """

    def __init__(self, defer: bool = True) -> None:
        self.defer = defer
        self._entries: list[tuple[dict[str, bool], str, Condition, bool]] = []

    @staticmethod
    def active() -> DeferredChecks | None:
        """The checks collecting in this context (read by a rule in its forward pass), or None."""
        return _ACTIVE.get()

    @contextlib.contextmanager
    def collecting(self) -> Iterator[DeferredChecks]:
        """Context manager: rules whose forward pass runs inside it record their conditions here."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def record(self, predictions: dict[str, bool], key: str, condition: Condition, followed: bool) -> None:
        """Record ``condition`` (tensors on the device, or a value already read) for ``predictions[key]``;
        ``followed``: whether the rule computed with the prediction ``True`` (exact only if the condition holds)."""
        self._entries.append((predictions, key, condition, followed))

    def settle(self, keep: bool = False) -> bool:
        """Read the recorded conditions back (one transfer per device), set each prediction to whether its condition
        held in every call, clear the record (``keep``: keep it, for a captured step whose replays rewrite the recorded
        tensors); return whether every followed prediction held."""
        entries = self._entries
        if not keep:
            self._entries = []
        values = _read_all([condition for _, _, condition, _ in entries])
        combined: dict[tuple[int, str], bool] = {}
        held = True
        for (predictions, key, _, followed), value in zip(entries, values):
            slot = (id(predictions), key)
            combined[slot] = combined.get(slot, True) and value
            held = held and (value or not followed)
        for predictions, key, _, _ in entries:
            predictions[key] = combined[(id(predictions), key)]
        return held

    def stable(self) -> bool:
        """Whether every prediction still equals the value its rule followed when recorded (after :meth:`settle` with
        ``keep``: a captured step still takes the computations the predictions choose)."""
        return all(predictions.get(key) is followed for predictions, key, _, followed in self._entries)


def _read_all(conditions: list[Condition]) -> list[bool]:
    """Whether each condition holds: per device one stack of the booleans, one of the lower and one of the upper
    bounds, one comparison each, one read."""
    values = [True] * len(conditions)
    # per device and kind (None: a boolean, True / False: a lower / an upper bound): (condition index, tensor)
    parts: dict[torch.device, dict[bool | None, list[tuple[int, torch.Tensor]]]] = {}
    for index, condition in enumerate(conditions):
        if isinstance(condition, bool):
            values[index] = condition
            continue
        bounds = [(None, condition)] if isinstance(condition, torch.Tensor) else [
            (bound.lower, bound.value) for bound in condition]
        for kind, tensor in bounds:
            parts.setdefault(tensor.device, {}).setdefault(kind, []).append((index, tensor.reshape(())))
    for kinds in parts.values():
        owners: list[int] = []
        flags: list[torch.Tensor] = []
        for kind, recorded in kinds.items():
            stacked = torch.stack([tensor for _, tensor in recorded])  # promotes: no bound is rounded to a lower type
            flags.append(stacked.bool() if kind is None else stacked >= 0 if kind else stacked <= 0)
            owners.extend(index for index, _ in recorded)
        for index, flag in zip(owners, torch.cat(flags).tolist()):
            values[index] = values[index] and bool(flag)
    return values


def decide(predictions: dict[str, bool], key: str, condition: Condition, checks: DeferredChecks | None) -> bool:
    """Whether to take the computation that is exact only where ``condition`` holds.

    With deferring ``checks`` and a prediction for ``key``: the prediction, recording ``condition`` (no host
    synchronisation). Otherwise :func:`holds` (one synchronisation), recorded in ``checks`` if given, else made the
    prediction at once.
    """
    predicted = predictions.get(key)
    if checks is None:
        value = holds(condition)
        predictions[key] = value
        return value
    if not checks.defer or predicted is None:
        value = holds(condition)
        checks.record(predictions, key, value, followed=False)
        return value
    checks.record(predictions, key, condition, followed=predicted)
    return predicted
