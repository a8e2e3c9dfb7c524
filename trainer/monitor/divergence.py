"""Loss-spike and blow-up detection that compares like with like, with an explicit false-alarm budget.

Why not "loss > 3x its running median" (the rule this replaces): the per-step diffusion loss of a small batch is a
mixture over the sampled timesteps, and the loss of a timestep quarter differs from the next by 5-50x (q0, the
least noisy quarter, is the hardest: ε-prediction near t = 0 plus the VB term). A batch that happens to draw
several low-t samples has a several-fold loss without anything being wrong: a healthy tiny run logged every step
raised 16 alerts in 1,000 steps. benchmarks/bench_divergence.py measures both rules on the demo run and on a
1,000-step tiny run.

The statistic, per logged record (the same numbers on every rank: the record's losses are all-reduced):

    r_k  = log(loss_qk / median of the last ``window`` healthy loss_qk)    each timestep quartile k in the record
    s    = mean_k r_k      the geometric mean of the quartiles' ratios to their own baselines; a record without
                           quartile losses (the pipeline engine does not split them) uses log(loss / its median)
    s~   = lower median of the last m values of s, m = ceil(3 / log.every): at log.every = 1 two of three
           consecutive steps must be high (one unlucky batch never alerts); from log.every = 3 on a record already
           averages >= 3 steps and m = 1
    T    = max(log(log.spike_factor), z * sigma)     z = the standard normal (1 - log.spike_budget) quantile,
           sigma = 1.4826 x MAD of the healthy s~ history (a robust spread): the threshold rises above the factor
           on runs whose normalised loss is noisier than the factor allows for at the budgeted false-alarm rate
    spike: s~ > T. One alert per excursion (on entering it). ``sustained`` once the spike has lasted
           ``sustain`` records in a row (``train.blowup_steps`` / ``log.every``): the blow-up that triggers a
           rollback (trainer/loop/rollback.py).

Records inside an excursion do not enter the baselines (a blow-up does not become the new normal); a new stage
(another resolution, another loss level) starts the baselines afresh.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

QUARTILE_KEYS = ("loss_q0", "loss_q1", "loss_q2", "loss_q3")


def _positive(value) -> Optional[float]:
    """A finite positive float from a record value (JSON replays hold "nan" strings), else None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def sustain_records(blowup_steps: int, log_every: int) -> int:
    """Records in a row that make ``train.blowup_steps`` steps (0: a spike never counts as a blow-up)."""
    return 0 if blowup_steps <= 0 else max(1, math.ceil(blowup_steps / max(1, log_every)))


def filter_length(log_every: int) -> int:
    """How many consecutive records the median filter spans: covers >= 3 steps."""
    return max(1, math.ceil(3 / max(1, log_every)))


@dataclass
class Verdict:
    step: int
    statistic: float  # exp(s~): the filtered loss relative to its timestep-matched baseline
    raw: float  # exp(s): this record alone
    threshold: float  # exp(T)
    spike: bool
    alert: bool  # entering an excursion: alert once
    in_row: int  # records in a row above the threshold
    sustained: bool
    onset_step: Optional[int]  # first step of the current excursion


class DivergenceDetector:
    def __init__(self, factor: float = 3.0, budget: float = 1e-4, log_every: int = 1, sustain: int = 10,
                 window: int = 50, min_history: int = 10, by_timestep: bool = True):
        """``by_timestep=False`` ignores the quartile losses (every record is judged like one without them): the
        ablation benchmarks/bench_divergence.py measures the timestep matching against."""
        self.factor = factor
        self.by_timestep = by_timestep
        self.z = statistics.NormalDist().inv_cdf(1.0 - budget)
        self.every = max(1, int(log_every))
        self.m = filter_length(self.every)
        self.sustain = sustain
        self.window = window
        self.min_history = min_history
        self.stage = None
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new stage: another loss level)."""
        self.baselines = {k: deque(maxlen=self.window) for k in QUARTILE_KEYS + ("loss",)}
        self.spread = deque(maxlen=self.window)  # healthy filtered statistics
        self.reset_excursion()

    def reset_excursion(self) -> None:
        """Forget the current excursion but keep the healthy baselines (after a rollback to before it)."""
        self.recent = deque(maxlen=self.m)  # (step, s) of the last m records
        self.in_row = 0
        self.onset = None

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def threshold_log(self) -> float:
        t = math.log(self.factor)
        if len(self.spread) >= self.min_history:
            med = statistics.median(self.spread)
            sigma = 1.4826 * statistics.median(abs(x - med) for x in self.spread)
            t = max(t, med + self.z * sigma)
        return t

    def _ratio(self, key: str, value: float) -> Optional[float]:
        base = self.baselines[key]
        if len(base) < self.min_history:
            return None
        return math.log(value / statistics.median(base))

    def update(self, record: dict) -> Optional[Verdict]:
        """Feed one logged record; None while there is no baseline yet (or the record holds no finite loss)."""
        if not self.enabled:
            return None
        stage = (record.get("stage"), record.get("resolution"))
        if stage != self.stage:
            self.stage = stage
            self.reset()
        step = int(record.get("step", 0))
        values = {k: _positive(record.get(k)) for k in QUARTILE_KEYS + ("loss",)}
        quartiles = [k for k in QUARTILE_KEYS if values[k] is not None] if self.by_timestep else []
        ratios = [r for r in (self._ratio(k, values[k]) for k in quartiles) if r is not None]
        if not quartiles and values["loss"] is not None:  # no timestep split logged: the loss against its own history
            r = self._ratio("loss", values["loss"])
            ratios = [] if r is None else [r]
        threshold = self.threshold_log()
        s = sum(ratios) / len(ratios) if ratios else None
        if s is None or s <= threshold:  # healthy (or not judged yet): the values join the baselines
            for k in quartiles or (["loss"] if values["loss"] is not None else []):
                self.baselines[k].append(values[k])
        if s is None:
            return None
        self.recent.append((step, s))
        filtered = statistics.median_low([x for _, x in self.recent])
        spike = filtered > threshold
        alert = spike and self.in_row == 0
        if spike:
            if alert:  # the excursion began at the earliest of the last m records that was itself above threshold
                first = next((st for st, x in self.recent if x > threshold), step)
                self.onset = max(0, first - self.every) + 1
            self.in_row += 1
        else:
            self.in_row, self.onset = 0, None
            self.spread.append(filtered)
        return Verdict(step=step, statistic=math.exp(filtered), raw=math.exp(s), threshold=math.exp(threshold),
                       spike=spike, alert=alert, in_row=self.in_row,
                       sustained=spike and self.sustain > 0 and self.in_row >= self.sustain, onset_step=self.onset)
