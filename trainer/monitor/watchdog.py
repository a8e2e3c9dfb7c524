"""The logging rank's heartbeat file and stall detector.

Every alert becomes a line in the log (``[alert] title: text``), an ``alert`` record in ``events.jsonl``
(which ``trainer.status`` shows as a flag) and, when W&B runs online, a ``wandb.alert``; all of it goes
through ``trainer.monitor.metrics.Metrics.alert``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable, Optional

from trainer.rundir import atomic_write_text, heartbeat_path


def write_heartbeat(run_dir: str, record: dict) -> None:
    path = heartbeat_path(run_dir)
    try:
        atomic_write_text(path, json.dumps(record), fsync=False)
    except OSError:
        pass  # a full disk must not stop training; status then reports the heartbeat as old


class Watchdog:
    """Heartbeat writer and stall detector of the logging rank.

    The loop calls ``beat(step)`` after every optimizer step. A daemon thread calls ``check`` every
    ``interval`` seconds: it rewrites ``run.dir/heartbeat.json`` (so a dead process is told apart from
    a slow one by the heartbeat's age; always, whether or not the stall alert is on) and, with
    ``stall_seconds`` > 0, raises one ``stall`` alert when no step came for that long, and an INFO alert
    when steps resume. ``check(now)`` takes the time as an argument so tests drive it without sleeping.

    With a ``lease`` (trainer/state/lease.py) every heartbeat carries its token, and the lease is checked
    first: once another launch has taken it over, no heartbeat is written any more and ``on_lease_lost``
    is called once (the loop then ends the run without writing).
    """

    def __init__(self, run_dir: str, stall_seconds: float, interval: float, alert: Callable[[str, str, str], None],
                 clock: Callable[[], float] = time.time, lease=None, on_lease_lost: Optional[Callable[[], None]] = None):
        self.run_dir = run_dir
        self.stall_seconds = stall_seconds
        self.interval = max(0.05, interval)
        self.alert = alert
        self.clock = clock
        self.step = 0
        self.last_step_time = clock()
        self.started = self.last_step_time
        self.stalled = False
        self.state = "running"
        self.lease = lease
        self.on_lease_lost = on_lease_lost
        self.lease_lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, step: int) -> None:
        with self._lock:
            self.step = step
            self.last_step_time = self.clock()
            was_stalled, self.stalled = self.stalled, False
        if was_stalled:
            self.alert("stall cleared", f"step {step} completed; training resumed", "INFO")

    def check(self, now: Optional[float] = None) -> bool:
        """Write the heartbeat; alert once per stall. True while stalled."""
        now = self.clock() if now is None else now
        if self.lease is not None and not self.lease_lost and not self.lease.still_ours():
            self.lease_lost = True
            self.alert("lease lost", f"another launch took over {self.run_dir}; this run stops writing and exits",
                       "ERROR")
            if self.on_lease_lost is not None:
                self.on_lease_lost()
        if self.lease_lost:
            return self.stalled
        with self._lock:
            idle = now - self.last_step_time
            newly = self.state == "running" and 0 < self.stall_seconds < idle and not self.stalled
            if newly:
                self.stalled = True
            record = {"time": now, "step": self.step, "last_step_time": self.last_step_time,
                      "stalled": self.stalled, "state": self.state, "pid": os.getpid(),
                      "host": socket.gethostname(), "rank": 0, "stall_seconds": self.stall_seconds,
                      "lease_token": self.lease.token if self.lease is not None else ""}
        write_heartbeat(self.run_dir, record)
        if newly:
            self.alert("stall", f"no optimizer step for {idle / 60:.1f} min (last completed step {self.step}; "
                                f"threshold {self.stall_seconds / 60:.1f} min)", "ERROR")
        return self.stalled

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watchdog must never take the run down
                pass

    def start(self) -> "Watchdog":
        self.check()
        self._thread = threading.Thread(target=self._run, name="dit-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: str = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state = state
        self.check()
