"""Loss-spike detection on the logged loss."""
from __future__ import annotations

import statistics
from collections import deque
from typing import Optional


class LossSpikeDetector:
    """A logged loss above ``factor`` x the median of the last ``window`` finite losses is a spike."""

    def __init__(self, factor: float, window: int = 50, min_history: int = 10):
        self.factor = factor
        self.history: deque = deque(maxlen=window)
        self.min_history = min_history

    def check(self, loss: float) -> Optional[float]:
        """The running median when ``loss`` is a spike, else None; finite losses join the history."""
        if loss != loss or loss in (float("inf"), float("-inf")):
            return None
        spike = None
        if self.factor > 0 and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                spike = median
        self.history.append(loss)
        return spike
