"""What one training step's end means: srun's per-task lines and the ranks' own verdict → finished, preempted, hung
(exit 7) or failed, naming the rank that failed first.

srun reports task ends in the order it learns of them, which is not the order they failed: when a rank on node2 is
SIGKILLed, its peer on node1 loses the connection and exits at once, and srun may report node1's task first. The
ranks' verdict (``run.dir/failure.json``, trainer/monitor/liveness.py) orders them by time of death or first error,
from every rank's liveness record; srun's lines add how each task ended. Without a verdict, srun's order is used.

Torch-free; used by cluster/launch.py after every srun / deepspeed step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from trainer.rundir import EXIT_HUNG, EXIT_PREEMPTED


TASK_LINE = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$")


def _task_ids(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif item:
            out.append(int(item))
    return out


@dataclass
class TaskEnd:
    task: int
    node: str
    what: str  # "Exited with exit code 3", "Killed", "Terminated", ...

    @property
    def code(self) -> Optional[int]:
        m = re.search(r"exit code (\d+)", self.what)
        return int(m.group(1)) if m else None


def parse_srun_line(line: str) -> list[TaskEnd]:
    m = TASK_LINE.search(line.strip())
    if not m:
        return []
    return [TaskEnd(t, m.group("node"), m.group("what").strip()) for t in _task_ids(m.group("tasks"))]


@dataclass
class Outcome:
    status: str  # finished | preempted | failed
    exit_code: int
    message: str
    failed_tasks: list[TaskEnd] = field(default_factory=list)


def _srun_end(entry: dict, ends: list[TaskEnd], launcher: str) -> Optional[TaskEnd]:
    """srun's report of the task that ran ``entry``'s rank (srun: task = rank; deepspeed: the node's launcher)."""
    if launcher == "srun":
        return next((e for e in ends if e.task == entry.get("rank")), None)
    return next((e for e in ends if e.node == entry.get("host")), None)


def from_verdict(verdict: dict, ends: list[TaskEnd], launcher: str, returncode: int) -> Outcome:
    """The outcome in the verdict's order: the rank that failed (or got stuck) first, then the ones that followed."""
    entries = verdict.get("ranks") or []
    first = [e for e in entries if e.get("role") == "first"] or entries[:1]
    rest = [e for e in entries if e not in first]

    hang = verdict.get("kind") == "hang"

    def how(entry: dict, first_rank: bool = False) -> str:
        end = _srun_end(entry, ends, launcher)
        if end is None or (hang and first_rank):  # a stuck rank's own end is only the teardown's doing
            return entry["what"]
        return f"{end.what} ({entry['what']})"

    names = "; ".join(f"rank {e['rank']} on {e['host']}: {how(e, True)}" for e in first)
    if rest:
        names += "; after it: " + ", ".join(f"rank {e['rank']} on {e['host']} ({how(e)})" for e in rest[:16])
    tasks = [TaskEnd(int(e["rank"]), str(e["host"]), how(e, e in first)) for e in first + rest]
    if hang:
        return Outcome("hung", EXIT_HUNG, f"training HUNG, no progress for {verdict.get('timeout_seconds', 0):.0f} s "
                                          f"(run.hang_timeout_minutes): {names}", tasks)
    srun_first = [_srun_end(e, ends, launcher) for e in first]
    code = next((e.code for e in srun_first if e is not None and e.code), None) or \
        next((e.code for e in ends if e.code not in (None, 0, EXIT_PREEMPTED)), None) or (returncode if returncode > 0 else 1)
    return Outcome("failed", code, f"training FAILED: {names}", tasks)


def classify(returncode: int, ends: list[TaskEnd], launcher: str = "srun", verdict: Optional[dict] = None,
             killed: Optional[str] = None) -> Outcome:
    """Decide what one training step's end means, from srun's exit status and per-task lines, and the ranks' verdict.

    srun's ``--kill-on-bad-exit`` ends the remaining tasks as soon as one exits non-zero, which
    includes a rank that exits 75 after the (collective, barrier-closed) preemption checkpoint; those
    collateral ends are not failures. Any other code, or a task killed when none exited 75, is.
    A rank that exits 7 (EXIT_HUNG) found the job hung. ``killed``: why the launcher killed the step.
    """
    unit = "rank" if launcher == "srun" else "node launcher"
    if returncode == 0 and killed is None:
        return Outcome("finished", 0, "training finished")
    codes = [e.code for e in ends if e.code is not None]
    bad = [e for e in ends if e.code is not None and e.code not in (0, EXIT_PREEMPTED)]
    preempted = EXIT_PREEMPTED in codes or (returncode == EXIT_PREEMPTED and not bad)
    if preempted and not bad and killed is None:
        return Outcome("preempted", EXIT_PREEMPTED, "ranks checkpointed and exited 75 (preempted)")
    if verdict is not None and verdict.get("ranks"):
        out = from_verdict(verdict, ends, launcher, returncode)
        if killed:
            out.message += f" [{killed}: the launcher killed the step]"
        return out
    if EXIT_HUNG in codes or returncode == EXIT_HUNG:
        who = ", ".join(f"{unit} {e.task} on {e.node}" for e in ends if e.code == EXIT_HUNG) or "a rank"
        return Outcome("hung", EXIT_HUNG, f"training HUNG: {who} found no progress for run.hang_timeout_minutes "
                                          f"(no verdict in run.dir/failure.json)", bad)
    if killed:
        return Outcome("failed", returncode if returncode > 0 else 1, f"training FAILED: {killed}; the launcher "
                                                                       f"killed the step", bad)
    if not bad:
        bad = [e for e in ends if e.code is None]  # killed by a signal (OOM killer, segfault, ...)
    if bad:
        # srun reports ends in the order it saw them: the first bad one is the cause; the others
        # usually followed from it (peers losing their connection, srun's --kill-on-bad-exit).
        first, rest = bad[0], [e for e in ends if e is not bad[0] and e.code != 0]
        names = f"{unit} {first.task} on {first.node}: {first.what}"
        if rest:
            names += "; after it: " + ", ".join(f"{unit} {e.task} ({e.what})" for e in rest)
        code = first.code or next((e.code for e in bad if e.code), None) or (returncode if returncode > 0 else 1)
        return Outcome("failed", code, f"training FAILED: {names}", bad)
    code = returncode if returncode > 0 else 1
    how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return Outcome("failed", code, f"training FAILED: srun ended with {how} (no per-task report)")
