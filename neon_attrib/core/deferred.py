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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

__all__ = ["DeferredChecks", "decide"]

_ACTIVE: ContextVar[DeferredChecks | None] = ContextVar("neon_attrib_deferred_checks", default=None)


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
        self._entries: list[tuple[dict[str, bool], str, torch.Tensor | bool, bool]] = []

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

    def record(self, predictions: dict[str, bool], key: str, condition: torch.Tensor | bool, followed: bool) -> None:
        """Record ``condition`` (a boolean tensor on the device, or a value already read) for ``predictions[key]``;
        ``followed``: whether the rule computed with the prediction ``True`` (exact only if the condition holds)."""
        if isinstance(condition, torch.Tensor):
            condition = condition.reshape(())
        self._entries.append((predictions, key, condition, followed))

    def settle(self) -> bool:
        """Read the recorded conditions back (one transfer per device), set each prediction to whether its condition
        held in every call, clear the record; return whether every followed prediction held."""
        entries, self._entries = self._entries, []
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        values: list[bool] = []
        for index, (_, _, condition, _) in enumerate(entries):
            if isinstance(condition, torch.Tensor):
                by_device.setdefault(condition.device, []).append((index, condition))
            values.append(condition is True)
        for recorded in by_device.values():
            read = torch.stack([condition for _, condition in recorded]).tolist()
            for (index, _), value in zip(recorded, read):
                values[index] = bool(value)
        combined: dict[tuple[int, str], bool] = {}
        held = True
        for (predictions, key, _, followed), value in zip(entries, values):
            slot = (id(predictions), key)
            combined[slot] = combined.get(slot, True) and value
            held = held and (value or not followed)
        for predictions, key, _, _ in entries:
            predictions[key] = combined[(id(predictions), key)]
        return held


def decide(predictions: dict[str, bool], key: str, condition: torch.Tensor, checks: DeferredChecks | None) -> bool:
    """Whether to take the computation that is exact only where ``condition`` holds.

    With deferring ``checks`` and a prediction for ``key``: the prediction, recording ``condition`` (no host
    synchronisation). Otherwise ``bool(condition)`` (one synchronisation), recorded in ``checks`` if given, else
    made the prediction at once.
    """
    predicted = predictions.get(key)
    if checks is None:
        value = bool(condition)
        predictions[key] = value
        return value
    if not checks.defer or predicted is None:
        value = bool(condition)
        checks.record(predictions, key, value, followed=False)
        return value
    checks.record(predictions, key, condition, followed=predicted)
    return predicted
