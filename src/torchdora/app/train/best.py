"""The best evaluation of a run on ``--metric-for-best``, and the early-stopping count (saved in checkpoints)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["METRICS_FOR_BEST", "Best"]

#: ``--metric-for-best`` -> (key of the validation record, whether larger is better)
METRICS_FOR_BEST = {"val_loss": ("val_loss", False), "val_accuracy": ("accuracy", True)}


@dataclass
class Best:
    """The best evaluation so far on ``metric`` and the count of evaluations since it (saved in checkpoints)."""

    metric: str
    value: float | None = None
    step: int | None = None
    evals_without_improvement: int = 0
    stopped_at: int | None = None  # the step early stopping ended the run at

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; whether it is a strict improvement (NaN never is)."""
        larger = METRICS_FOR_BEST[self.metric][1]
        better = math.isfinite(value) and (self.value is None or (value > self.value if larger else value < self.value))
        if better:
            self.value, self.step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        return better

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
