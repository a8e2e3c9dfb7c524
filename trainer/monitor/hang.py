"""Every rank's liveness beacon and hang watchdog (records and verdicts: trainer/monitor/liveness.py).

The loop tells the beacon where it is (``enter(phase)`` at each phase of a step, ``progress(step, phase)`` after
it); a daemon thread rewrites the rank's record every ``beat_interval`` seconds and, when this rank's own progress is
older than ``run.hang_timeout_minutes``, calls ``on_hang`` once. A rank waiting inside a collective for a stuck peer
sees its own progress stop too, so whichever rank is still alive notices the hang; the loop's handler
(trainer/loop/failures.py) names the stuck rank from every rank's record and tears the job down.

The watchdog arms at the first completed step: set-up (engine build, resume, W&B start, the MFU probe) differs
between ranks and is covered by the collective timeout alone, whose waits end in the same verdict.

The thread keeps running while the main thread waits in a gloo or NCCL collective (they release the GIL), so a
hang is noticed even where no collective timeout fires: DeepSpeed's CPU shared-memory all-reduce has none, and
NCCL's own watchdog aborts the process without naming anyone. It only observes: ``on_hang`` decides what happens.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, Mapping, Optional

from trainer.monitor.liveness import beat_interval, write_record


def host_addresses(host: str) -> list[str]:
    """The addresses ``host`` resolves to: what peers see in a dropped connection's error (gloo binds there)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)})
    except OSError:
        return []


class RankBeacon:
    def __init__(self, run_dir: str, rank: int, world: int, attempt: str, hang_seconds: float,
                 on_hang: Optional[Callable[["RankBeacon"], None]] = None, clock: Callable[[], float] = time.time,
                 environ: Mapping[str, str] = os.environ):
        self.run_dir = run_dir
        self.hang_seconds = float(hang_seconds)
        self.interval = beat_interval(self.hang_seconds)
        self.on_hang = on_hang
        self.clock = clock
        host = socket.gethostname()
        self.record = {"rank": int(rank), "world": int(world), "host": host, "addrs": host_addresses(host),
                       "pid": os.getpid(),
                       "attempt": attempt, "slurm_job_id": environ.get("SLURM_JOB_ID", ""),
                       "slurm_restart": int(environ.get("SLURM_RESTART_COUNT", "0") or 0), "step": 0, "micro": 0,
                       "phase": "setup", "progress_time": clock(), "state": "running",
                       "interval": self.interval, "hang_timeout": self.hang_seconds}
        self.triggered = False
        self.armed = False  # from the first completed step on; set-up is covered by the collective timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ called by the loop (cheap: no I/O)
    def enter(self, phase: str, micro: Optional[int] = None) -> None:
        """This rank entered ``phase`` of the current step (progress: it got past the previous phase)."""
        rec = self.record
        rec["phase"], rec["progress_time"] = phase, self.clock()
        if micro is not None:
            rec["micro"] = micro

    def progress(self, step: int, phase: str = "step", arm: bool = True) -> None:
        """``step`` steps are complete (a resumed run starts at its checkpoint's step, ``arm=False``)."""
        rec = self.record
        rec["step"], rec["micro"], rec["phase"], rec["progress_time"] = int(step), 0, phase, self.clock()
        self.armed = self.armed or arm

    # ------------------------------------------------------------------ records
    def beat(self, now: Optional[float] = None, **fields) -> dict:
        with self._lock:
            self.record.update(fields)
            rec = dict(self.record, time=self.clock() if now is None else now)
        write_record(self.run_dir, rec)
        return rec

    def fail(self, kind: str, message: str) -> dict:
        """Record this rank's failure at once (``error``: its own; ``peer``/``timeout``: it saw another's)."""
        return self.beat(state="failed", failure={"time": self.clock(), "kind": kind, "message": message})

    def check(self, now: Optional[float] = None) -> bool:
        """Write the record; call ``on_hang`` once when this rank's progress is older than the hang timeout."""
        now = self.clock() if now is None else now
        rec = self.beat(now)
        stuck = (self.armed and 0 < self.hang_seconds < now - float(rec["progress_time"])
                 and rec.get("state") == "running")
        if stuck and not self.triggered and self.on_hang is not None:
            self.triggered = True
            self.on_hang(self)
        return stuck

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the beacon must never take the run down by itself
                pass

    def start(self) -> "RankBeacon":
        self.beat()
        self._thread = threading.Thread(target=self._run, name="dit-beacon", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: str = "done") -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.beat(state=state, phase="done" if state == "done" else self.record["phase"])
