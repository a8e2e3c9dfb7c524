"""One writer per run directory: a lease in ``run.dir/lease.json``, safe on NFS and Lustre without ``flock``.

Why not ``flock``/``fcntl``: on NFS they depend on the lock daemon and client mount options, on Lustre on the
``flock`` mount option; a lock silently held by nobody (or granted twice) is worse than none. The lease uses only
operations that are atomic on the server on every POSIX shared file system in use: exclusive create
(``O_CREAT | O_EXCL``), ``mkdir`` and ``rename``.

* ``lease.json`` is written once, by exclusive create, and never rewritten: ``token`` (random), ``host``,
  ``pid``, Slurm job id and restart count, start time. Whoever created it holds the run directory.
* Liveness is the heartbeat (``heartbeat.json``, rewritten every ``log.heartbeat_seconds`` by the holder's
  watchdog thread, carrying ``lease_token``); before each heartbeat the holder re-reads ``lease.json`` and, if
  the token is no longer its own (it was taken over), stops writing and ends the run (fencing).
* Taking over happens under a ``mkdir`` lock (``lease.takeover``), so two launchers that both find a dead
  holder cannot both win: inside the lock the taker re-reads ``lease.json``, checks it is still the holder it
  judged dead, renames it aside (kept as ``lease.<token>.taken`` for the record) and creates its own by
  exclusive create. A taker that dies inside the lock leaves a lock older than ``LOCK_STALE_SECONDS``, which the
  next taker removes.
* A holder is gone when (a) it is the same Slurm job at an earlier restart (a requeue: Slurm killed every task
  of the old attempt, so it takes its own lease back at once), (b) it ran on this host and its pid is dead, or
  (c) its heartbeat (or, before the first one, its start) is older than ``timeout`` seconds. Clocks of the
  writer and the reader are compared, so cluster nodes need synchronised clocks (NTP), as Slurm itself does.

Torch-free: the launcher and ``trainer.status`` read it on login nodes.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from typing import Callable, Mapping, Optional

from trainer.rundir import HEARTBEAT, LEASE, read_json

LOCK_NAME = "lease.takeover"
LOCK_STALE_SECONDS = 60.0


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory; the message names it and how to take over."""


def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None


def process_start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux): with the pid it names one process, even after the
    pid is reused."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def identity(environ: Mapping[str, str] = os.environ) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
            "slurm_job_id": environ.get("SLURM_JOB_ID", ""),
            "slurm_restart": int(environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def pid_alive(pid: int, start_time: Optional[int] = None) -> bool:
    """Whether process ``pid`` (started at ``start_time``, when known) still runs on this host. A zombie (killed,
    not yet reaped: common in containers whose init does not reap) and a reused pid count as dead."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # exists but not ours, or unparsable: do not assume it is dead
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (not Linux): os.kill is all we have
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or len(fields) <= 19 or int(fields[19]) == int(start_time)


def describe(holder: dict, now: float, beat: Optional[float] = None) -> str:
    job = f", Slurm job {holder['slurm_job_id']} attempt {holder.get('slurm_restart', 0)}" if holder.get(
        "slurm_job_id") else ""
    seen = f"; last heartbeat {now - beat:.0f} s ago" if beat is not None else ""
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}{seen}")


def last_beat(run_dir: str, holder: dict) -> float:
    """The holder's latest sign of life: its heartbeat if the heartbeat carries its token, else its start."""
    beat = read_json(os.path.join(run_dir, HEARTBEAT)) or {}
    if beat.get("lease_token") == holder.get("token") and isinstance(beat.get("time"), (int, float)):
        return max(float(beat["time"]), float(holder.get("started", 0)))
    return float(holder.get("started", 0))


def holder_gone(run_dir: str, holder: dict, me: dict, timeout: float, now: float) -> Optional[str]:
    """Why ``holder`` no longer holds the run directory (None: it may still be alive)."""
    if me.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"] and \
            int(holder.get("slurm_restart", 0)) < int(me.get("slurm_restart", 0)):
        return f"same Slurm job {me['slurm_job_id']} requeued (attempt {holder.get('slurm_restart', 0)} -> " \
               f"{me['slurm_restart']})"
    if holder.get("host") == me.get("host") and not pid_alive(holder.get("pid", -1), holder.get("pid_start")):
        return f"its process {holder.get('pid')} on {holder.get('host')} is gone"
    beat = last_beat(run_dir, holder)
    if now - beat > timeout:
        return f"no heartbeat for {now - beat:.0f} s (lease timeout {timeout:.0f} s)"
    return None


class Lease:
    def __init__(self, run_dir: str, timeout: float, clock: Callable[[], float] = time.time,
                 me: Optional[dict] = None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LEASE)
        self.timeout = float(timeout)
        self.clock = clock
        self.me = dict(me or identity())
        self.token = ""
        self.record: dict = {}

    # ------------------------------------------------------------------ acquire
    def _create(self) -> bool:
        record = dict(self.me, token=secrets.token_hex(16), started=self.clock())
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        # Read back: on a misbehaving client cache the exclusive create is the server's word, the content ours.
        if (read_json(self.path) or {}).get("token") != record["token"]:
            return False
        self.token, self.record = record["token"], record
        return True

    def _read_holder(self, tries: int = 20) -> Optional[dict]:
        """The current holder; None if there is no lease. Waits out a holder that is still writing it."""
        for _ in range(tries):
            if not os.path.exists(self.path):
                return None
            holder = read_json(self.path)
            if holder and "token" in holder:
                return holder
            time.sleep(0.05)
        try:  # unreadable for a second: a writer that died between create and write
            age = self.clock() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return None
        return {"token": "", "host": "?", "pid": -1, "started": self.clock() - age}

    def _lock(self) -> bool:
        lock = os.path.join(self.run_dir, LOCK_NAME)
        try:
            os.mkdir(lock)
            return True
        except FileExistsError:
            try:
                if self.clock() - os.path.getmtime(lock) > LOCK_STALE_SECONDS:
                    shutil.rmtree(lock, ignore_errors=True)  # a taker died inside the lock
            except FileNotFoundError:
                pass
            return False

    def _unlock(self) -> None:
        shutil.rmtree(os.path.join(self.run_dir, LOCK_NAME), ignore_errors=True)

    def acquire(self, force: bool = False) -> Optional[dict]:
        """Take the lease. Returns None, or ``{"previous": holder, "reason": why}`` after a takeover.

        Raises RunDirBusy naming the live holder and how to take over."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(50):
            if self._create():
                return None
            holder = self._read_holder()
            if holder is None:
                continue  # released meanwhile
            now = self.clock()
            reason = "forced (--takeover)" if force else holder_gone(self.run_dir, holder, self.me, self.timeout, now)
            if reason is None:
                raise RunDirBusy(
                    f"run directory {self.run_dir} is in use by another run: {describe(holder, now, last_beat(self.run_dir, holder))}. "
                    f"Two writers would corrupt its metrics and checkpoints. Wait for that run to end or stop it; if it "
                    f"is dead, this launch takes over by itself once its heartbeat is {self.timeout:.0f} s old "
                    f"(run.lease_timeout_minutes), or pass --takeover to take over now.")
            if not self._lock():
                time.sleep(0.1)
                continue
            try:
                current = self._read_holder(tries=1)
                if current is not None and current.get("token") == holder.get("token"):
                    aside = os.path.join(self.run_dir, f"lease.{holder.get('token') or 'unreadable'}.taken")
                    try:
                        os.replace(self.path, aside)
                    except FileNotFoundError:
                        pass
                    if self._create():
                        return {"previous": holder, "reason": reason}
            finally:
                self._unlock()
        raise RunDirBusy(f"could not take the lease of {self.run_dir} after 50 attempts (heavy contention)")

    # ------------------------------------------------------------------ while held
    def still_ours(self) -> bool:
        """False once another launch took the lease over (the caller must stop writing)."""
        holder = read_json(self.path)
        if holder is None and os.path.exists(self.path):
            return True  # being read mid-replace: decide at the next heartbeat
        return bool(holder) and holder.get("token") == self.token

    def release(self) -> None:
        """Give the run directory up (clean exits); a lease already taken over is left alone."""
        if self.token and self.still_ours():
            try:
                os.replace(self.path, os.path.join(self.run_dir, f"lease.{self.token}.released"))
                os.unlink(os.path.join(self.run_dir, f"lease.{self.token}.released"))
            except FileNotFoundError:
                pass
        self.token = ""


def read_lease(run_dir: str) -> Optional[dict]:
    return read_json(os.path.join(run_dir, LEASE))
