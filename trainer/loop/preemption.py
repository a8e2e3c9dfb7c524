"""Preemption: a signal sets a flag; ranks agree on it at a step boundary, checkpoint and exit.

Slurm sends USR1 (``--signal=B:USR1@secs``, forwarded by the batch script) or TERM (time limit,
scancel). Doing nothing inside the handler but setting a flag keeps the collective checkpoint in
the main thread, where every rank reaches it at the same step.
"""
from __future__ import annotations

import signal
import sys


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"[preemption] received {self.signal_name}; will checkpoint at the next step boundary",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
