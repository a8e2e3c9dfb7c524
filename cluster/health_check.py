"""Pre-flight checks for a Slurm job, run before any rank starts; a clear error and exit 1, never a hang.

``python -m cluster.health_check node --run-dir DIR --gpus N``
    once per node (``srun --ntasks-per-node=1``): the GPUs Slurm granted are visible to torch and as
    many as requested (no GPU requested: fine on CPU), and the shared run directory is writable from
    this node (write + fsync + read back a temp file).
``python -m cluster.health_check job --world-size W --config C --ds_config D -- key=value ...``
    once per job: the trainer's own ``--validate_only`` with ``WORLD_SIZE=W`` (config keys, shard sets
    readable with matching shapes, world size consistent with the parallel layout).

Every check is bounded by a timeout (a hung NFS mount or driver must not hang the job).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import uuid
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.rundir import launch_dir  # noqa: E402  (torch-free)

HOST = socket.gethostname()


def fail(msg: str) -> int:
    print(f"error: [health {HOST}] {msg}", file=sys.stderr, flush=True)
    return 1


def visible_gpu_count(timeout: float = 120.0) -> int:
    """torch.cuda.device_count() in a child process, so a wedged driver times out instead of hanging."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torch could not query CUDA: {proc.stderr.strip()[-500:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def check_gpus(expected: int, count_fn=visible_gpu_count) -> Optional[str]:
    """None when fine; otherwise the problem. expected=0 means no GPU was requested (CPU ranks)."""
    if expected <= 0:
        return None
    try:
        found = count_fn()
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as exc:
        return f"cannot count GPUs: {exc}"
    if found != expected:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return (f"Slurm granted {expected} GPU(s) on this node but torch sees {found} "
                f"(CUDA_VISIBLE_DEVICES={cvd}); check the driver / the --gres request")
    return None


def check_writable(directory: str) -> Optional[str]:
    """Write, fsync and read back a temp file in ``directory`` (created if missing)."""
    try:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f".health-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        payload = f"{HOST} {uuid.uuid4().hex}\n"
        with open(path, "w") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        with open(path) as f:
            back = f.read()
        os.remove(path)
    except OSError as exc:
        return f"run dir {directory} is not writable from this node: {exc}"
    if back != payload:
        return f"run dir {directory}: a file written and fsynced read back different content (broken shared storage?)"
    return None


def run_node(args) -> int:
    problem = check_gpus(args.gpus) or check_writable(launch_dir(args.run_dir))
    if problem:
        return fail(problem)
    print(f"[health {HOST}] ok: {args.gpus or 'no'} GPU(s) requested and visible, {args.run_dir} writable", flush=True)
    return 0


def run_job(args) -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(k, None)
    env["WORLD_SIZE"] = str(args.world_size)
    env["RANK"] = "0"  # with WORLD_SIZE set, keeps the Slurm mapping from overriding the world size
    cmd = [sys.executable, os.path.join(repo, "trainer", "main.py"), "--validate_only", "--config", args.config,
           "--ds_config", args.ds_config, *args.overrides]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return fail(f"trainer validation did not finish in {args.timeout:.0f}s (shards on a hung filesystem?)")
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)  # the trainer's own one-line 'error: ...' naming the key or file
        return fail(f"trainer validation failed (exit {proc.returncode}) for world size {args.world_size}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    node = sub.add_parser("node", help="per-node checks: GPUs, shared run dir")
    node.add_argument("--run-dir", required=True)
    node.add_argument("--gpus", type=int, default=None, help="GPUs expected on this node (default: from Slurm)")
    job = sub.add_parser("job", help="per-job check: trainer --validate_only with the job's world size")
    job.add_argument("--world-size", type=int, required=True)
    job.add_argument("--config", required=True)
    job.add_argument("--ds_config", default="zero2.json")
    job.add_argument("--timeout", type=float, default=600.0)
    job.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.what == "node":
        if args.gpus is None:
            from cluster.launch import gpus_on_node

            args.gpus = gpus_on_node(os.environ)
        return run_node(args)
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
