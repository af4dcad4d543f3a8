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
    """The conditions recorded in one backward pass, as device tensors, with the predictions they update.

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

    def __init__(self) -> None:
        self._entries: list[tuple[dict[str, bool], str, torch.Tensor, bool]] = []

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

    def record(self, predictions: dict[str, bool], key: str, condition: torch.Tensor, followed: bool) -> None:
        """Record ``condition`` (a boolean tensor on the device) for ``predictions[key]``; ``followed``: whether the
        rule computed with the prediction ``True`` (the result is then exact only if the condition holds)."""
        self._entries.append((predictions, key, condition.reshape(()), followed))

    def settle(self) -> bool:
        """Read every recorded condition back (one transfer per device), set each prediction to its condition, clear
        the record; return whether every followed prediction held."""
        entries, self._entries = self._entries, []
        if not entries:
            return True
        by_device: dict[torch.device, list[int]] = {}
        for index, (_, _, condition, _) in enumerate(entries):
            by_device.setdefault(condition.device, []).append(index)
        values: list[bool] = [True] * len(entries)
        for indices in by_device.values():
            for index, value in zip(indices, torch.stack([entries[i][2] for i in indices]).tolist()):
                values[index] = bool(value)
        held = True
        for (predictions, key, _, followed), value in zip(entries, values):
            predictions[key] = value
            held = held and (value or not followed)
        return held


def decide(predictions: dict[str, bool], key: str, condition: torch.Tensor, checks: DeferredChecks | None) -> bool:
    """Whether to take the computation that is exact only where ``condition`` holds.

    With ``checks`` and a prediction for ``key``: the prediction, recording ``condition`` (no host synchronisation).
    Otherwise ``bool(condition)`` (one synchronisation), which becomes the prediction.
    """
    predicted = predictions.get(key)
    if checks is None or predicted is None:
        value = bool(condition)
        predictions[key] = value
        return value
    checks.record(predictions, key, condition, followed=predicted)
    return predicted
