"""torch.distributed environment derived from Slurm variables, for `srun` one-task-per-GPU launches.

`deepspeed` and `torchrun` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT themselves; a task
started by `srun` only has SLURM_* variables. Deriving the torch ones here lets `trainer/main.py`
run unchanged under either launcher.
"""
from __future__ import annotations

import os
import subprocess
from typing import Mapping, Optional


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list (``node[01-04],gpu7`` → ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback parser for the common forms when scontrol is not on PATH.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def port_for_job(job_id: str, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id, so all tasks of one job agree without talking."""
    try:
        return base + int(job_id) % span
    except ValueError:
        return base + 29


def torch_env_from_slurm(environ: Mapping[str, str]) -> Optional[dict]:
    """The torch.distributed variables for an `srun` task, or None when not under `srun`/already set."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return None
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return None
    env = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1").split("(")[0]),
    }
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(port_for_job(environ.get("SLURM_JOB_ID", "0")))
    return env


def apply_slurm_env() -> bool:
    """Fill os.environ from Slurm when launched by `srun`; returns True when it did."""
    env = torch_env_from_slurm(os.environ)
    if env is None:
        return False
    os.environ.update(env)
    return True
