"""Which rank failed or hung first: every rank's liveness record, and the verdict built from them. Torch-free.

Every rank (not only the logging one) rewrites ``run.dir/ranks/rank-NNNNN.json`` every ``beat_interval`` seconds from
a daemon thread (trainer/monitor/hang.py): host, pid, the attempt it belongs to, and its progress: the step,
micro-step and phase (``data``, ``forward``, ``backward``, ``optimizer``, ``checkpoint``, ...) it entered last and
when. A rank that stops beating is stopped, frozen, killed or on a lost node; a rank that beats but whose progress is
older than its peers' is stuck outside a collective (the others then wait for it inside one).

When a rank detects a hang (its own progress older than ``run.hang_timeout_minutes``, or a collective timed out) or
a failure (its own exception, or a peer's connection dropping), it builds a *verdict* from these records: the ranks
in the order they failed, the first one first, each with its node and what it was doing. The first verdict of an
attempt is published once (``failure.json``, by an atomic exclusive link) together with one ``error`` event in
``events.jsonl``; ``cluster/launch.py`` and ``trainer.status`` read it from there.

Times come from each writer's clock, so nodes need synchronised clocks (NTP), as Slurm and the lease already do.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Iterable, Mapping, Optional

from trainer.rundir import EVENTS, atomic_write_text, failure_path, rank_path, ranks_dir, read_json

# Where a rank can be. The record's ``step`` counts completed steps: IN_STEP phases belong to the step being computed
# (step + 1, per micro-step), BETWEEN phases come after step ``step`` (and set-up before the first), in this order.
IN_STEP = ("data", "forward", "backward", "optimizer")
BETWEEN = ("step", "log", "checkpoint", "sample", "setup", "engine", "resume", "monitor", "stage")
COLLECTIVE_MARKERS = ("gloo", "nccl", "c10d", "processgroup", "distributed")
TIMEOUT_MARKERS = ("timed out", "timeout", "watchdog caught collective")
PEER_MARKERS = ("connection reset", "connection closed", "closed by peer", "broken pipe", "connection refused",
                "no route to host", "network is unreachable", "remote process exited", "socket closed", "end of file",
                "ncclremoteerror")
ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d+)")


def beat_interval(hang_seconds: float) -> float:
    """Seconds between two liveness records of a rank: a twentieth of the hang timeout, within [1, 5] s (short
    enough that a rank that lost a peer learns who is still alive well within Slurm's KillWait)."""
    return min(5.0, max(1.0, hang_seconds / 20.0)) if hang_seconds > 0 else 5.0


def settle_seconds(interval: float) -> float:
    """How long a rank that lost a peer waits for the live ranks to write a newer record: a beat and some."""
    return min(2.5 * interval, interval + 3.0)


def silent_after(interval: float) -> float:
    """A rank whose newest record is older than this is not alive (three missed beats, at least 3 s)."""
    return max(3.0 * interval, 3.0)


# --------------------------------------------------------------------------- records


def write_record(run_dir: str, record: dict) -> None:
    try:
        os.makedirs(ranks_dir(run_dir), exist_ok=True)
        atomic_write_text(rank_path(run_dir, record["rank"]), json.dumps(record), fsync=False)
    except OSError:
        pass  # a full or unreachable disk must not stop training; the record then just ages


def read_records(run_dir: str, attempt: Optional[str] = None, job: Optional[tuple[str, int]] = None) -> dict[int, dict]:
    """{rank: newest record} of one attempt: by its token, or by its (Slurm job id, restart count)."""
    out: dict[int, dict] = {}
    folder = ranks_dir(run_dir)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        rec = read_json(os.path.join(folder, name))
        if not rec or "rank" not in rec:
            continue
        if attempt is not None and rec.get("attempt") != attempt:
            continue
        if job is not None and (str(rec.get("slurm_job_id", "")), int(rec.get("slurm_restart", 0) or 0)) != \
                (str(job[0]), int(job[1])):
            continue
        out[int(rec["rank"])] = rec
    return out


def clear(run_dir: str) -> None:
    """Remove the records and the verdict of earlier attempts (rank 0, holding the lease, before any rank beats)."""
    folder = ranks_dir(run_dir)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
    try:
        os.unlink(failure_path(run_dir))
    except OSError:
        pass


# --------------------------------------------------------------------------- exceptions


def _chain_text(exc: BaseException) -> str:
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def classify_exception(exc: BaseException) -> Optional[str]:
    """``timeout`` (a collective waited past its timeout), ``peer`` (a peer's connection dropped: it died, or its
    node did) or None (this rank's own error)."""
    text = _chain_text(exc).lower()
    names = [type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    distributed = any(n.startswith("Dist") for n in names) or any(m in text for m in COLLECTIVE_MARKERS)
    if not distributed:
        return None
    if any(m in text for m in TIMEOUT_MARKERS):
        return "timeout"
    if any(m in text for m in PEER_MARKERS):
        return "peer"
    return None


def peer_address(text: str) -> Optional[str]:
    """The peer address in a gloo error (``Read error [10.231.0.12]:41231: Connection reset by peer``)."""
    m = ADDRESS.search(text)
    return m.group(1).removeprefix("::ffff:") if m else None


def ranks_at(records: Mapping[int, Mapping], address: Optional[str]) -> list[int]:
    """Ranks whose node has ``address`` (each record lists its node's addresses)."""
    return sorted(r for r, rec in records.items() if address and address in (rec.get("addrs") or []))


def short_message(exc: BaseException, limit: int = 300) -> str:
    """The exception's last line, without gloo's source-file prefix and help text."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(". This is typically caused")[0]
    return f"{type(exc).__name__}: {text}"[:limit]


# --------------------------------------------------------------------------- verdicts


def _clock(t: Optional[float]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "?"


def where(rec: Mapping) -> str:
    """Where a rank was at its newest record: ``step 62 backward (micro 1) since 12:00:03`` (inside the step it
    computes), or ``step 61 done (checkpoint) since ...``."""
    step, phase = int(rec.get("step", 0) or 0), rec.get("phase", "?")
    micro = f" (micro {rec['micro']})" if rec.get("micro") else ""
    if phase in IN_STEP:
        at = f"step {step + 1} {phase}{micro}"
    elif phase in ("setup", "engine", "resume", "monitor"):
        at = f"set-up ({phase})" if step == 0 else f"step {step}: set-up ({phase})"
    else:
        at = f"step {step} done ({phase})"
    return f"{at} since {_clock(rec.get('progress_time'))}"


def _order_key(rec: Mapping) -> tuple:
    """How far a rank got: a rank with a smaller key is behind."""
    step, phase = int(rec.get("step", 0) or 0), rec.get("phase", "setup")
    if phase in IN_STEP:
        return step + 1, 0, int(rec.get("micro", 0) or 0), IN_STEP.index(phase)
    if phase in BETWEEN:
        return step, 1, 0, BETWEEN.index(phase)
    return step, 2, 0, 0


def _entry(rank: int, rec: Optional[Mapping], role: str, what: str, since: Optional[float]) -> dict:
    return {"rank": rank, "host": (rec or {}).get("host", "?"), "pid": (rec or {}).get("pid"), "role": role,
            "what": what, "since": since}


def _base(kind: str, records: Mapping[int, Mapping], detector: Mapping, now: float) -> dict:
    return {"kind": kind, "time": now, "detected_by": detector.get("rank"), "attempt": detector.get("attempt"),
            "slurm_job_id": detector.get("slurm_job_id", ""), "slurm_restart": detector.get("slurm_restart", 0),
            "world": detector.get("world", len(records))}


def diagnose_hang(records: Mapping[int, Mapping], world: int, now: float, timeout: float, interval: float,
                  detector: Mapping) -> dict:
    """Who is stuck: ranks with no sign of life first (stopped, frozen, dead, node lost), else the ranks behind the
    others (stuck outside a collective: data, compute); then the ranks that wait for them."""
    stale = silent_after(interval)
    first, rest, alive = [], [], []
    for rank in range(world):
        rec = records.get(rank)
        if rec is None:
            first.append(_entry(rank, None, "first", "no liveness record at all (never started, or cannot reach the "
                                                     "run directory)", None))
        elif now - float(rec.get("time", 0)) > stale:
            first.append(_entry(rank, rec, "first", f"no sign of life for {now - float(rec['time']):.0f} s (process "
                                                    f"stopped, frozen or killed, or its node lost); last record: "
                                                    f"{where(rec)}", float(rec["time"])))
        else:
            alive.append(rec)
    first.sort(key=lambda e: e["since"] or 0.0)
    if not first and alive:
        lowest = min(_order_key(r) for r in alive)
        if any(_order_key(r) != lowest for r in alive):
            for rec in alive:
                if _order_key(rec) == lowest:
                    first.append(_entry(int(rec["rank"]), rec, "first",
                                        f"behind the others, no progress for {now - rec['progress_time']:.0f} s at "
                                        f"{where(rec)}", rec["progress_time"]))
        else:  # every rank waits at the same point: a collective that never completes
            for rec in sorted(alive, key=lambda r: r["rank"]):
                first.append(_entry(int(rec["rank"]), rec, "first",
                                    f"every rank waits at {where(rec)}: a collective that never completes "
                                    f"(interconnect or communication library), no rank behind", rec["progress_time"]))
    named = {e["rank"] for e in first}
    for rec in sorted(alive, key=lambda r: r["rank"]):
        if int(rec["rank"]) not in named:
            rest.append(_entry(int(rec["rank"]), rec, "then", f"waiting at {where(rec)}", rec.get("progress_time")))
    verdict = _base("hang", records, detector, now)
    verdict.update(timeout_seconds=timeout, ranks=first + rest)
    verdict["message"] = describe(verdict)
    return verdict


def diagnose_failure(records: Mapping[int, Mapping], world: int, now: float, silent_before: Optional[float],
                     interval: float, detector: Mapping, suspects: Iterable[int] = ()) -> dict:
    """Which rank failed first, after a rank's own error or a dropped peer: ranks that raised an error of their own,
    and ranks without a failure of their own whose newest record is older than ``silent_before`` (killed, crashed
    without a trace, node lost), ordered by time; then the ranks that saw it (peer connection dropped, timeout) and
    the ones still running. ``silent_before``: the moment the peer was lost, once every live rank has had time to
    write a newer record (trainer/loop/failures.py waits for that). ``suspects``: the rank a dropped connection led
    to, when its address names exactly one rank (then nobody waits)."""
    first, rest, suspects = [], [], set(suspects)
    for rank in range(world):
        rec = records.get(rank)
        failure = (rec or {}).get("failure") or {}
        if failure.get("kind") == "error":
            first.append(_entry(rank, rec, "first", failure.get("message", "raised an error"), failure.get("time")))
        elif rec is None:
            first.append(_entry(rank, None, "first", "no liveness record at all", None))
        elif not failure and rank in suspects:
            first.append(_entry(rank, rec, "first", f"its connections dropped, no error of its own (killed, crashed "
                                                    f"without a trace, or its node lost); last record: {where(rec)} at "
                                                    f"{_clock(rec.get('time'))}", float(rec["time"])))
        elif not failure and silent_before is not None and float(rec.get("time", 0)) < silent_before:
            first.append(_entry(rank, rec, "first", f"no sign of life since {_clock(rec.get('time'))} (killed, "
                                                    f"crashed without a trace, or its node lost); last record: {where(rec)}",
                                float(rec["time"])))
        elif failure:
            rest.append(_entry(rank, rec, "then", failure.get("message", failure.get("kind", "?")), failure.get("time")))
        else:
            rest.append(_entry(rank, rec, "then", f"still running at {where(rec)}", float(rec.get("time", now))))
    if not first:  # nobody died and nobody raised: the connection itself broke; the detector's report comes first
        first = [dict(e, role="first") for e in rest if e["rank"] == detector.get("rank")]
        rest = [e for e in rest if e["rank"] != detector.get("rank")]
    first.sort(key=lambda e: e["since"] or 0.0)
    rest.sort(key=lambda e: (e["since"] or now, e["rank"]))
    verdict = _base("failure", records, detector, now)
    verdict.update(ranks=first + rest)
    verdict["message"] = describe(verdict)
    return verdict


def describe(verdict: Mapping) -> str:
    """``rank 1 on node2 <what>; then rank 0 on node1 (<what>), ...``: the first failure first."""
    ranks = verdict.get("ranks") or []
    first = [e for e in ranks if e.get("role") == "first"]
    rest = [e for e in ranks if e.get("role") != "first"]
    head = "; ".join(f"rank {e['rank']} on {e['host']}: {e['what']}" for e in first) or "no rank identified"
    if verdict.get("kind") == "hang":
        head = f"no progress for {verdict.get('timeout_seconds', 0):.0f} s (run.hang_timeout_minutes): {head}"
    if rest:
        head += "; then " + ", ".join(f"rank {e['rank']} on {e['host']} ({e['what']})" for e in rest[:16])
        if len(rest) > 16:
            head += f", and {len(rest) - 16} more"
    return head


def publish(run_dir: str, verdict: dict, step: Optional[int] = None) -> bool:
    """Publish the attempt's first verdict: ``failure.json`` by an exclusive link (a reader never sees it half
    written, and a second detector loses), then one ``error`` event. False when another rank published first."""
    target = failure_path(run_dir)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(verdict))
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError:
        return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    first = next((e for e in verdict.get("ranks", []) if e.get("role") == "first"), {})
    event = {"event": "error", "kind": "hang" if verdict["kind"] == "hang" else "rank_failure", "step": step,
             "message": verdict["message"], "first_rank": first.get("rank"), "first_host": first.get("host"),
             "ranks": verdict.get("ranks", []), "time": time.time()}
    try:
        with open(os.path.join(run_dir, EVENTS), "a") as f:
            f.write(json.dumps(event) + "\n")
    except OSError:
        pass
    return True


def read_verdict(run_dir: str, job: Optional[tuple[str, int]] = None) -> Optional[dict]:
    """The published verdict, if it belongs to Slurm job attempt ``job`` = (job id, restart) (any, when None)."""
    verdict = read_json(failure_path(run_dir))
    if not verdict or "ranks" not in verdict:
        return None
    if job is not None and (str(verdict.get("slurm_job_id", "")), int(verdict.get("slurm_restart", 0) or 0)) != \
            (str(job[0]), int(job[1])):
        return None
    return verdict

