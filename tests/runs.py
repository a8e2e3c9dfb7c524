"""Launch real training runs (1 process, or N CPU ranks through the deepspeed launcher / torchrun)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from trainer.engine.distributed import free_port
from trainer.rundir import read_metrics  # noqa: F401  (re-exported for the tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(nprocs: int, overrides: list[str], *, config="configs/tiny.yaml", ds_config="zero2.json",
              launcher="deepspeed") -> list[str]:
    script = os.path.join(REPO, "trainer", "main.py")
    args = ["--config", os.path.join(REPO, config), "--ds_config", ds_config, *overrides]
    if launcher == "python" or nprocs == 1 and launcher != "deepspeed":
        return [sys.executable, script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                "--master_port", str(free_port()), script, *args]
    return ["deepspeed", "--num_gpus", str(nprocs), "--master_port", str(free_port()), script, *args]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def run_training(nprocs: int, overrides: list[str], *, timeout: float = 900, check: bool = True,
                 extra_env: dict | None = None, **kw):
    cmd = train_cmd(nprocs, overrides, **kw)
    proc = subprocess.run(cmd, cwd=REPO, env=dict(_env(), **(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start_training(nprocs: int, overrides: list[str], *, extra_env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = train_cmd(nprocs, overrides, **kw)
    env = dict(_env(), **(extra_env or {}))
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def start_and_kill_after_checkpoint(nprocs: int, overrides: list[str], run_dir: str, step: int, **kw) -> str:
    """Start a run that pauses right after publishing its step-``step`` checkpoint, SIGKILL every process
    of it there (launcher and ranks), and return its output. The pause (trainer/monitor/faults.py's test hook)
    makes the kill land at that point however fast the run is."""
    proc = start_training(nprocs, overrides, extra_env={"DIT_FAULT_PAUSE_AFTER_CHECKPOINT": f"{step}:120"}, **kw)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    tag = f"step{step:08d}"
    try:
        wait_for(lambda: os.path.exists(latest) and open(latest).read().strip() == tag or proc.poll() is not None,
                 300, f"the {tag} checkpoint")
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()[-3000:]}"
    finally:
        out = kill_group(proc)
    return out


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> str:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    out, _ = proc.communicate(timeout=60)
    return out


def losses_by_step(run_dir: str) -> dict[int, float]:
    """Last logged loss of each step (a resumed run may log a step twice; the later one wins)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def copy_until(src: str, dst: str, step: int) -> str:
    """A copy of run ``src`` as it was right after its step-``step`` checkpoint (later checkpoints removed)."""
    shutil.copytree(src, dst)
    ck = os.path.join(dst, "checkpoints")
    for name in os.listdir(ck):
        if name.startswith("step") and int(name[4:]) > step:
            shutil.rmtree(os.path.join(ck, name))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write(f"step{step:08d}\n")
    return dst


def resume_copy(src_checkpoint: str, run_dir: str, **state_changes) -> str:
    """A fresh run directory holding only ``src_checkpoint`` (as its newest), with ``trainer_state.json`` fields
    changed (e.g. ``data_position``: the run resumed there skips the samples in between) and COMPLETE.json re-sealed,
    so the trainer's checksum check accepts the edit. Returns the copied checkpoint's path."""
    from trainer.state import integrity

    tag = os.path.basename(src_checkpoint.rstrip("/"))
    dst = os.path.join(run_dir, "checkpoints", tag)
    shutil.copytree(src_checkpoint, dst)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(tag + "\n")
    state_file = os.path.join(dst, "trainer_state.json")
    state = json.load(open(state_file))
    state.update(state_changes)
    with open(state_file, "w") as f:
        json.dump(state, f, indent=2)
    integrity.seal(dst)
    return dst


def _flat_tensors(obj, prefix=""):
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat_tensors(v, f"{prefix}[{i}]")


def checkpoint_tensors(path: str) -> dict:
    """Every tensor in every ``.pt`` file of a checkpoint but the RNG states, keyed 'file:path.in.file': weights,
    ZeRO fp32 partitions, AdamW moments and step counts, EMA (plain or sharded). DeepSpeed's own files are pickles
    (tests only: the trainer never unpickles)."""
    import torch

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt") and not name.startswith("rng_"):
            obj = torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
            out.update({f"{name}:{k}": v for k, v in _flat_tensors(obj)})
    return out


def lr_position(path: str) -> int:
    """The LR schedule position (applied optimizer steps) a checkpoint holds."""
    import torch

    name = next(n for n in sorted(os.listdir(path)) if n.endswith("mp_rank_00_model_states.pt"))  # ZeRO-3: zero_pp_rank_0_...
    sd = torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
    return int(sd["lr_scheduler"]["last_step"])
