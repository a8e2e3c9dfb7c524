"""What a rank does when the job fails or hangs: name the rank that failed first, publish it once, end the job.

Three ways in, one verdict format (trainer/monitor/liveness.py):

* hang, noticed by this rank's beacon thread (trainer/monitor/hang.py): its own progress is older than
  ``run.hang_timeout_minutes``. The main thread is blocked (in a collective waiting for a stuck peer, or stuck
  itself), so the thread publishes the verdict and ends the process with ``os._exit(EXIT_HUNG)``; srun's
  ``--kill-on-bad-exit`` (or the deepspeed launcher) then tears the rest of the job down.
* hang, noticed by a collective timeout (gloo raises after the process group's timeout, which is the hang timeout):
  the same verdict and exit code, from the main thread.
* failure: an exception in this rank. Its own error names this rank first, at once. A dropped peer connection names
  the peer: the rank records what it saw, waits two beats so that every live rank writes a newer record, and the
  ranks that stayed silent are the ones that died first (a SIGKILL, a crash without a trace, a lost node). The
  exception is then raised as before (traceback, exit 1).

Only the first verdict of an attempt is published (``failure.json`` + one ``error`` event); every rank prints its own.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import Optional

from trainer.monitor.hang import RankBeacon
from trainer.monitor.liveness import (classify_exception, diagnose_failure, diagnose_hang, peer_address, publish,
                                      ranks_at, read_records, read_verdict, settle_seconds, short_message, silent_after)
from trainer.rundir import EXIT_HUNG


class Failures:
    """One per rank: owns the rank's beacon and turns hangs and exceptions into a published verdict."""

    def __init__(self, trainer, attempt: str, world: int):
        self.tr = trainer
        self._lock = threading.Lock()
        self.ending = False
        self.beacon = RankBeacon(trainer.run_dir, trainer.rank, world, attempt,
                                 trainer.cfg.run.hang_timeout_minutes * 60, on_hang=self.on_hang)

    def start(self) -> RankBeacon:
        return self.beacon.start()

    def _claim(self) -> bool:
        with self._lock:
            first, self.ending = not self.ending, True
        return first

    def _records(self) -> dict:
        return read_records(self.tr.run_dir, attempt=self.beacon.record["attempt"])

    def _say(self, text: str) -> None:
        rec = self.beacon.record
        print(f"error: [rank {rec['rank']} on {rec['host']}] {text}", file=sys.stderr, flush=True)

    def _alert(self, title: str, text: str) -> None:
        """The logging rank's alert (log line, events.jsonl, W&B), bounded so a slow W&B cannot delay the exit."""
        metrics = getattr(self.tr, "metrics", None)
        if self.tr.rank != 0 or metrics is None:
            return
        t = threading.Thread(target=metrics.alert, args=(title, text, "ERROR"), daemon=True)
        t.start()
        t.join(timeout=10)

    # ------------------------------------------------------------------ hangs
    def on_hang(self, beacon: RankBeacon) -> None:
        """Beacon thread: this rank made no progress for the hang timeout."""
        if self._claim():
            self.hang("watchdog: no progress on this rank")

    def hang(self, how: str) -> None:
        """Publish the hang verdict and end this process with EXIT_HUNG (never returns)."""
        try:
            b = self.beacon
            known = read_verdict(self.tr.run_dir)
            if known is not None:  # another rank ended the job first (e.g. this one was stopped, then continued)
                b.beat(state="hung")
                self._say(f"ending ({how}); the job's verdict, from rank {known.get('detected_by')}: {known['message']}")
                return
            verdict = diagnose_hang(self._records(), b.record["world"], time.time(), b.hang_seconds, b.interval,
                                    b.record)
            b.beat(state="hung")
            published = publish(self.tr.run_dir, verdict, step=self.tr.state.step)
            self._say(f"HANG ({how}): {verdict['message']}"
                      + ("" if published else " [another rank published the job's verdict first]"))
            self._alert("hung", verdict["message"])
            monitor = getattr(self.tr, "monitor", None)
            if monitor is not None and monitor.watchdog is not None:
                monitor.watchdog.stop("hung")
            if self.tr.rank == 0 and self.tr.lease is not None and not self.tr.lease_lost:
                self.tr.lease.release()  # the whole attempt ends here: the next launch need not wait for the lease
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_HUNG)

    # ------------------------------------------------------------------ exceptions
    def handle(self, exc: BaseException) -> Optional[str]:
        """Main thread, for an exception out of training: publishes the verdict (a collective timeout ends the
        process as a hang). Returns the verdict's message for the caller's alert, or None."""
        kind = classify_exception(exc)
        if kind == "timeout":
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            if not self._claim():
                time.sleep(120)  # the beacon thread is ending the process already
            self.hang(f"collective timed out: {short_message(exc)}")
        if not self._claim():
            time.sleep(120)  # the beacon thread found a hang first and is ending the process
        b = self.beacon
        seen = time.time()
        b.fail("peer" if kind == "peer" else "error", short_message(exc))
        suspects: list[int] = []
        if kind == "peer":  # the dropped connection's address names the peer; else (or several ranks there) wait
            records = self._records()
            suspects = [r for r in ranks_at(records, peer_address(str(exc))) if r != b.record["rank"]
                        and not (records[r].get("failure") or {}).get("kind")]
            silent_before = None if len(suspects) == 1 else self._settle(seen)
            suspects = suspects if len(suspects) == 1 else []
        else:  # its own error: this rank is the cause; only ranks already clearly silent failed before it
            silent_before = seen - silent_after(b.interval)
        verdict = diagnose_failure(self._records(), b.record["world"], time.time(), silent_before, b.interval, b.record,
                                   suspects)
        publish(self.tr.run_dir, verdict, step=self.tr.state.step)
        published = read_verdict(self.tr.run_dir) or verdict
        self._say(f"FAILED: first failure: {published['message']}")
        return published["message"]

    def _settle(self, seen: float) -> float:
        """Wait (a beat and some, see liveness.settle_seconds) until every other rank wrote a record newer than
        ``seen`` or a failure of its own; the ones that did not are the ones that died."""
        deadline = seen + settle_seconds(self.beacon.interval)
        world, me = self.beacon.record["world"], self.beacon.record["rank"]
        while time.time() < deadline:
            records = self._records()
            if all(float(records.get(r, {}).get("time", 0)) > seen or (records.get(r) or {}).get("failure")
                   for r in range(world) if r != me):
                break
            time.sleep(0.2)
        return seen
