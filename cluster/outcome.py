"""What one training step's end means: srun's per-task lines → finished, preempted, or failed naming the rank.

Torch-free; used by cluster/launch.py after every srun / deepspeed step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from trainer.rundir import EXIT_PREEMPTED



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


def classify(returncode: int, ends: list[TaskEnd], launcher: str = "srun") -> Outcome:
    """Decide what one training step's end means, from srun's exit status and its per-task lines.

    srun's ``--kill-on-bad-exit`` ends the remaining tasks as soon as one exits non-zero, which
    includes a rank that exits 75 after the (collective, barrier-closed) preemption checkpoint; those
    collateral ends are not failures. Any other code, or a task killed when none exited 75, is.
    """
    unit = "rank" if launcher == "srun" else "node launcher"
    if returncode == 0:
        return Outcome("finished", 0, "training finished")
    codes = [e.code for e in ends if e.code is not None]
    bad = [e for e in ends if e.code is not None and e.code not in (0, EXIT_PREEMPTED)]
    preempted = EXIT_PREEMPTED in codes or (returncode == EXIT_PREEMPTED and not bad)
    if preempted and not bad:
        return Outcome("preempted", EXIT_PREEMPTED, "ranks checkpointed and exited 75 (preempted)")
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
