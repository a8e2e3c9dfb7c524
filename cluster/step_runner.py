"""Runs the job's srun steps for cluster/launch.py: forwards preemption signals, records srun's per-task ends, and
makes sure a step that should be over ends, so that Slurm frees the nodes.

Two things can keep an srun step alive after the training is over:

* a lost node: after the first rank failed (or hung and was torn down), srun waits for the tasks of a node that no
  longer answers until Slurm declares it DOWN (``SlurmdTimeout``, minutes). The launcher gives srun
  ``TEARDOWN_GRACE`` seconds (default 60; more than Slurm's ``KillWait``) after the first abnormal task end, then
  kills it; the batch script ends and Slurm releases every node that still answers.
* a job whose every rank is frozen (all stopped, or all on lost nodes): no rank is left to notice the hang. When
  every liveness record of this attempt (``run.dir/ranks/``) is older than the hang timeout plus three beats, the
  launcher kills the step itself and publishes the hang verdict (all ranks silent).

Torch-free.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from cluster.launch_record import log
from cluster.outcome import TaskEnd, parse_srun_line

POLL_SECONDS = 1.0


class StepRunner:
    """Runs srun steps, forwarding preemption signals to the one in flight and recording task ends."""

    def __init__(self, teardown_grace: float = 60.0):
        self.proc: Optional[subprocess.Popen] = None
        self.preempt_signal: Optional[str] = None
        self.ends: list[TaskEnd] = []
        self.teardown_grace = teardown_grace
        self.killed_reason: Optional[str] = None
        self._first_end: Optional[float] = None
        self._lock = threading.Lock()

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        first = self.preempt_signal is None
        self.preempt_signal = self.preempt_signal or name
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # USR1 is what the trainer handles as "checkpoint and exit 75"; srun forwards it to every
            # process of every task without ending the step (TERM would make srun tear it down).
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            log(f"received {name}: forwarded USR1 to the training step (srun pid {proc.pid})")
        elif first:
            log(f"received {name} before training started: will requeue without training")

    def run(self, cmd: list[str], env: Optional[dict] = None, forward: bool = True,
            watch: Optional[Callable[[], Optional[str]]] = None) -> int:
        """Run one step; ``watch()`` is polled every second and returns a reason to kill the step (or None)."""
        self.ends, self._first_end, self.killed_reason = [], None, None
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
        if forward:
            self.proc = proc
        reader = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        reader.start()
        while True:
            try:
                rc = proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                reason = self._overdue() or (watch() if watch is not None else None)
                if reason and self.killed_reason is None:
                    self.killed_reason = reason
                    log(f"{reason}: killing the step (srun pid {proc.pid}) so that Slurm frees the nodes")
                    proc.kill()
            except KeyboardInterrupt:  # SIGINT handler replaced, but be safe
                continue
        reader.join(timeout=30)
        self.proc = None
        return rc

    def _overdue(self) -> Optional[str]:
        with self._lock:
            first = self._first_end
        if first is not None and time.time() - first > self.teardown_grace:
            return (f"srun has not ended {self.teardown_grace:.0f} s after the first task ended (a node that no longer "
                    f"answers?)")
        return None

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            ends = parse_srun_line(line)
            if ends:
                with self._lock:
                    self.ends.extend(ends)
                    if self._first_end is None:
                        self._first_end = time.time()


def silence_watch(run_dir: str, job_id: str, restart: int, world: int, hang_seconds: float,
                  clock: Callable[[], float] = time.time) -> Callable[[], Optional[str]]:
    """A ``watch`` for StepRunner.run: a reason to kill the step once every rank of this attempt has been silent
    for the hang timeout plus three beats (then no rank is left to notice the hang). Publishes the hang verdict
    (every rank silent) if no rank did. Never fires with the hang watchdog off or before all ranks wrote a record."""
    from trainer.monitor.liveness import beat_interval, diagnose_hang, publish, read_records, silent_after

    interval = beat_interval(hang_seconds)
    limit = hang_seconds + silent_after(interval)

    def watch() -> Optional[str]:
        if hang_seconds <= 0:
            return None
        records = read_records(run_dir, job=(job_id, restart))
        now = clock()
        if len(records) < world or any(now - float(r.get("time", 0)) <= limit for r in records.values()):
            return None
        verdict = diagnose_hang(records, world, now, hang_seconds, interval,
                                {"rank": "launcher", "attempt": next(iter(records.values())).get("attempt"),
                                 "slurm_job_id": job_id, "slurm_restart": restart, "world": world})
        publish(run_dir, verdict)
        return f"no rank has written a liveness record for {limit:.0f} s (every rank frozen or its node lost)"

    return watch
