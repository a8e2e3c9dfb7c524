"""The launch record in ``RUN_DIR/launch/``: the captured environment (secrets dropped), hostfile, attempt history.

Torch-free; written by cluster/launch.py once per job attempt, read by ``trainer.status``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import sys
from typing import Iterable, Mapping

from trainer.rundir import LAUNCH_HISTORY, launch_dir

# Environment captured into RUN_DIR/launch/env-*.txt: what decides how the ranks were started.
CAPTURE_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "MASTER_", "NCCL_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "TORCH_",
                    "DS_", "DEEPSPEED_", "PYTORCH_", "WANDB_", "FI_", "UCX_", "GLOO_")
CAPTURE_NAMES = ("CONFIG", "DS_CONFIG", "RUN_DIR", "OVERRIDES", "LAUNCHER", "SRUN_ARGS", "HEALTH_CHECK", "REPO_DIR",
                 "VENV", "ENV_SETUP", "CONDA_PREFIX", "VIRTUAL_ENV", "PYTHONPATH", "PATH", "LD_LIBRARY_PATH",
                 "HOSTNAME", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MAX_RESTARTS")
SECRET_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)




def log(msg: str) -> None:
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[launch {stamp}] {msg}", file=sys.stderr, flush=True)


class LaunchError(RuntimeError):
    """The allocation or the launch settings cannot work; the message says why."""


def is_secret(name: str) -> bool:
    return bool(SECRET_RE.search(name))


def capture_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The launch-relevant variables, never secrets (any name matching KEY/TOKEN/SECRET/PASSWORD)."""
    out = {}
    for name, value in environ.items():
        if is_secret(name):
            continue
        if name in CAPTURE_NAMES or name.startswith(CAPTURE_PREFIXES):
            out[name] = value
    return dict(sorted(out.items()))


def format_env(env: Mapping[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())


def make_hostfile(nodes: Iterable[str], slots: int) -> str:
    """DeepSpeed hostfile: one ``host slots=N`` line per node, in Slurm's node order."""
    lines = [f"{host} slots={slots}" for host in nodes]
    if not lines:
        raise LaunchError("no nodes for the hostfile")
    if slots < 1:
        raise LaunchError(f"slots per node must be >= 1, got {slots}")
    return "\n".join(lines) + "\n"


def append_history(run_dir: str, record: dict) -> None:
    path = os.path.join(launch_dir(run_dir), LAUNCH_HISTORY)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        log(f"warning: cannot append to {path}: {exc}")
