"""Pre-flight checks for a Slurm job, run before any rank starts; a clear error and exit 1, never a hang.

``python -m cluster.health_check node --run-dir DIR --gpus N [--record FOLDER]``
    once per node (``srun --ntasks-per-node=1``): the GPUs Slurm granted are visible to torch and as
    many as requested (no GPU requested: fine on CPU), and the shared run directory is writable from
    this node (write + fsync + read back a temp file). With ``--record``, the node also writes what it
    runs into ``FOLDER/<node>.json``: Python, torch, DeepSpeed and the project (the version of the
    package ``import`` resolves to on this node, read from the metadata installed beside it, and a
    fingerprint of the project's source as this node sees it). The launcher then compares the nodes
    (``compare_nodes``): a node that differs from the others fails the job before any rank starts,
    named with the difference; a node that wrote no record cannot write the run directory.
``python -m cluster.health_check job --world-size W --config C --ds_config D -- key=value ...``
    once per job: the trainer's own ``--validate_only`` with ``WORLD_SIZE=W`` (config keys, shard sets
    readable with matching shapes, world size consistent with the parallel layout).

Every check is bounded by a timeout (a hung NFS mount or driver must not hang the job).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import socket
import subprocess
import sys
import uuid
from collections import Counter
from typing import Mapping, Optional

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


PROJECT_PACKAGES = ("trainer", "models", "data_pipeline", "cluster")
COMPARED = ("python", "torch", "deepspeed", "project")


def installed_version(name: str) -> tuple[str, str]:
    """(version, package folder) of what ``import name`` resolves to here, without importing it: the version is
    the metadata installed beside the package (``<site>/<name>-<version>.dist-info``), else any installed one."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return "not installed", "-"
    folder = os.path.dirname(spec.origin)
    for meta in sorted(glob.glob(os.path.join(os.path.dirname(folder), f"{name}-*.dist-info", "METADATA"))):
        with open(meta, errors="replace") as f:
            m = re.search(r"^Version:\s*(\S+)", f.read(), re.M)
        if m:
            return m.group(1), folder
    try:
        return importlib.metadata.version(name) + " (metadata not beside the package)", folder
    except importlib.metadata.PackageNotFoundError:
        return "unknown (no metadata)", folder


def source_fingerprint(root: str) -> str:
    """sha256 over the project's Python sources under ``root`` (relative path + bytes), first 12 hex digits."""
    h = hashlib.sha256()
    for package in PROJECT_PACKAGES:
        for path in sorted(glob.glob(os.path.join(root, package, "**", "*.py"), recursive=True)):
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def node_versions() -> dict:
    spec = importlib.util.find_spec("trainer")
    root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else "?"
    try:
        project = importlib.metadata.version("dit-deepspeed")
    except importlib.metadata.PackageNotFoundError:
        project = "not installed"
    torch_version, torch_path = installed_version("torch")
    ds_version, ds_path = installed_version("deepspeed")
    return {"python": f"{platform.python_implementation()} {platform.python_version()}", "torch": torch_version,
            "deepspeed": ds_version, "project": f"{project} source {source_fingerprint(root) if root != '?' else '?'}",
            "paths": {"python": sys.executable, "torch": torch_path, "deepspeed": ds_path, "project": root}}


def compare_nodes(records: Mapping[str, dict], nodes: list[str]) -> list[str]:
    """Problems (empty: all equal), each naming the node: a missing record, or a value that differs from the one
    most nodes have (ties go to the first node, where rank 0 runs)."""
    problems = [f"node {n}: no pre-flight record (could it write the run directory?)" for n in nodes if n not in records]
    present = [n for n in nodes if n in records]
    for key in COMPARED:
        values = {n: records[n].get(key) for n in present}
        counts = Counter(values.values())
        if len(counts) <= 1:
            continue
        top = max(counts.values())
        reference = next(values[n] for n in present if counts[values[n]] == top)
        ref_nodes = ",".join(n for n in present if values[n] == reference)
        for n in present:
            if values[n] != reference:
                where = (records[n].get("paths") or {}).get(key, "?")
                problems.append(f"node {n}: {key} {values[n]} from {where} (node {ref_nodes}: {reference})")
    return problems


def read_records(folder: str) -> dict[str, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                rec = json.load(f)
            out[rec["host"]] = rec
        except (OSError, ValueError, KeyError):
            continue
    return out


def run_node(args) -> int:
    problem = check_gpus(args.gpus) or check_writable(launch_dir(args.run_dir))
    if problem:
        return fail(problem)
    if args.record:
        record = dict(node_versions(), host=HOST, gpus=args.gpus)
        try:
            os.makedirs(args.record, exist_ok=True)
            with open(os.path.join(args.record, f"{HOST}.json"), "w") as f:
                json.dump(record, f)
        except OSError as exc:
            return fail(f"cannot write the pre-flight record into {args.record}: {exc}")
        print(f"[health {HOST}] {record['python']}, torch {record['torch']}, deepspeed {record['deepspeed']}, "
              f"project {record['project']}", flush=True)
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
    node.add_argument("--record", default=None, help="folder for this node's versions record (<node>.json)")
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
