"""Metric sinks: ``metrics.jsonl`` in the run directory, plus W&B when configured.

Only one process logs (the logging rank); the others get a ``NullSink``. A sink failure (W&B down,
disk full on the metrics file) is reported once and never stops training.
"""
from __future__ import annotations

import json
import math
import sys
import time

from trainer.rundir import events_path, metrics_path


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class JsonlSink:
    """Step records to ``metrics.jsonl``; images, alerts and lifecycle events to ``events.jsonl``."""

    def __init__(self, run_dir: str):
        self.path = metrics_path(run_dir)
        self.events_path = events_path(run_dir)
        self._failed = False

    def _append(self, path: str, record: dict) -> None:
        try:
            with open(path, "a") as f:
                f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        except OSError as exc:
            if not self._failed:
                print(f"[metrics] WARNING: cannot append to {path}: {exc}", file=sys.stderr)
            self._failed = True

    def log(self, record: dict) -> None:
        self._append(self.path, record)

    def event(self, record: dict) -> None:
        self._append(self.events_path, dict(record, time=record.get("time", time.time())))

    def log_image(self, step: int, key: str, path: str, info: dict | None = None) -> None:
        self.event({"step": step, "event": "image", "key": key, "path": path, **(info or {})})

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        self.event({"event": "alert", "title": title, "text": text, "level": level})

    def close(self) -> None:
        pass


class NullSink:
    def log(self, record: dict) -> None:
        pass

    def event(self, record: dict) -> None:
        pass

    def log_image(self, step: int, key: str, path: str, info: dict | None = None) -> None:
        pass

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        pass

    def close(self) -> None:
        pass


class Metrics:
    """Fan-out to several sinks; each sink's failure is isolated."""

    MAX_FAILURES = 10  # consecutive failures after which a sink is dropped for the rest of the run

    def __init__(self, sinks):
        self.sinks = list(sinks)
        self._failures = {}

    def _each(self, method: str, *args, **kwargs) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args, **kwargs)
                self._failures[id(sink)] = 0
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
                n = self._failures[id(sink)] = self._failures.get(id(sink), 0) + 1
                print(f"[metrics] WARNING: {type(sink).__name__}.{method} failed: {exc}", file=sys.stderr)
                if n >= self.MAX_FAILURES and len(self.sinks) > 1:
                    print(f"[metrics] WARNING: {type(sink).__name__} failed {n} times in a row; dropped",
                          file=sys.stderr)
                    self.sinks.remove(sink)

    def log(self, record: dict) -> None:
        self._each("log", record)

    def event(self, record: dict) -> None:
        self._each("event", record)

    def log_image(self, step: int, key: str, path: str, info: dict | None = None) -> None:
        """``info``: numbers about the image (the sample grids' latent spread), kept with its event."""
        self._each("log_image", step, key, path, info)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        print(f"[alert] {title}: {text}", file=sys.stderr, flush=True)
        self._each("alert", title, text, level)

    def close(self) -> None:
        self._each("close")


def build_metrics(cfg, run_dir: str, state, logging: bool) -> Metrics:
    """The logging rank's sinks (metrics.jsonl/events.jsonl, then W&B when configured); others log nowhere."""
    if not logging:
        return Metrics([NullSink()])
    sinks = [JsonlSink(run_dir)]
    from trainer.monitor.wandb_sink import make_wandb_sink

    wb = make_wandb_sink(cfg, run_dir, state)
    if wb is not None:
        sinks.append(wb)
    return Metrics(sinks)
