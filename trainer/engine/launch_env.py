"""torch.distributed environment derived from Slurm variables, for `srun` one-task-per-GPU launches.

`deepspeed` and `torchrun` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT themselves; a task
started by `srun` only has SLURM_* variables. Deriving the torch ones here lets `trainer/main.py`
run unchanged under either launcher.

Also the small pure helpers the batch-side launcher (`cluster/launch.py`) needs: Slurm host-list
expansion (``node[01-03,7],gpu-a[1-2]``), ``SLURM_TASKS_PER_NODE`` parsing (``2(x3),1``) and the
job-derived rendezvous port. They work without `scontrol` so they can be unit-tested anywhere.
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping, Optional


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` → ``['a[1,2]', 'b']``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm host list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(body: str) -> list[str]:
    """``01-03,7`` → ``['01', '02', '03', '7']`` (zero padding of the lower bound is kept)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        if m:
            lo, hi = m.group(1), m.group(2)
            if int(hi) < int(lo):
                raise ValueError(f"descending range {item!r} in Slurm host list")
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif re.fullmatch(r"\d+", item):
            out.append(item)
        else:
            raise ValueError(f"bad range {item!r} in Slurm host list")
    return out


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + mid + rest for mid in _expand_ranges(m.group(1)) for rest in _expand_one(tail)]


def expand_hostlist(nodelist: str) -> list[str]:
    """All hostnames of a Slurm node list, in Slurm's order, without calling `scontrol`.

    ``node[01-03],gpu7`` → ``['node01', 'node02', 'node03', 'gpu7']``; several bracket groups
    (``rack[1-2]-n[1-2]``) expand as a product, the way `scontrol show hostnames` does.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist or ""):
        hosts.extend(_expand_one(part))
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """Hostnames of a node list: `scontrol show hostnames` when available, else the local parser."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_hostlist(nodelist)


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list (``node[01-04],gpu7`` → ``node01``)."""
    hosts = hostnames(nodelist)
    return hosts[0] if hosts else nodelist


def parse_tasks_per_node(value: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` → one count per node: ``2(x3),1`` → ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE item {item!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def port_for_job(job_id: str, base: int = 20000, span: int = 20000, restart: int = 0) -> int:
    """A port derived from the job id (and restart count), so all tasks of one job agree without talking.

    The restart count shifts the port so a requeued job never races the previous attempt's socket
    lingering in TIME_WAIT on the same node.
    """
    try:
        return base + (int(job_id) * 7 + int(restart)) % span
    except ValueError:
        return base + 29


def torch_env_from_slurm(environ: Mapping[str, str]) -> Optional[dict]:
    """The torch.distributed variables for an `srun` task, or None when not under `srun`/already set."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return None
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return None
    local_world = environ.get("SLURM_NTASKS_PER_NODE")
    if not local_world:
        counts = parse_tasks_per_node(environ.get("SLURM_TASKS_PER_NODE", "1"))
        node = int(environ.get("SLURM_NODEID", "0"))
        local_world = str(counts[node] if node < len(counts) else (counts[0] if counts else 1))
    env = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": local_world,
    }
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(
        port_for_job(environ.get("SLURM_JOB_ID", "0"), restart=int(environ.get("SLURM_RESTART_COUNT", "0") or 0)))
    return env


def apply_slurm_env() -> bool:
    """Fill os.environ from Slurm when launched by `srun`; returns True when it did."""
    env = torch_env_from_slurm(os.environ)
    if env is None:
        return False
    os.environ.update(env)
    return True
