"""Process-group start-up for every launcher: deepspeed, torchrun, srun, or one plain process."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.engine.device import check_distinct_gpus, pick_device  # noqa: F401  (pick_device re-exported)


def free_port() -> int:
    """A TCP port free on this host right now (for a local rendezvous: launchers, tests, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> bool:
    """Make RANK/WORLD_SIZE/... present whichever way the process was started.

    Returns True when a launcher (deepspeed, torchrun, srun) provided the rank. A plain process
    keeps a WORLD_SIZE it was given, so ``--validate_only`` can check a layout for a larger job.
    """
    from trainer.engine.launch_env import apply_slurm_env

    apply_slurm_env()
    if "RANK" in os.environ:
        return True
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0"})
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return False


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def set_cpu_threads() -> int:
    """Share the cores among the ranks on this machine unless OMP_NUM_THREADS says otherwise.

    Without this every CPU rank starts one thread per core and N ranks oversubscribe N-fold.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)
    return threads


DEFAULT_COLLECTIVE_TIMEOUT = 30 * 60.0  # seconds, when run.hang_timeout_minutes = 0 (hang watchdog off)


def collective_timeout(backend: str, hang_seconds: float) -> float:
    """The process group's collective timeout for a hang timeout of ``hang_seconds`` (0: watchdog off).

    gloo: exactly the hang timeout. A collective waiting that long raises in the waiting rank, and the loop turns
    that into the same hang verdict as the watchdog (trainer/loop/failures.py). NCCL: a little more. With
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (cluster/nccl.env) NCCL's own watchdog aborts the process at its timeout with
    no Python exception, so the trainer's watchdog, which names the stuck rank, must act first.
    """
    if hang_seconds <= 0:
        return DEFAULT_COLLECTIVE_TIMEOUT
    if backend == "nccl":
        return hang_seconds + max(30.0, 0.1 * hang_seconds)
    return hang_seconds


def init_distributed(hang_seconds: float = 0.0) -> torch.device:
    import deepspeed

    prepare_env()
    device = pick_device()
    if device.type == "cpu":
        set_cpu_threads()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cpu":
            skip_deepspeed_shm_allreduce()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=collective_timeout(backend, hang_seconds)))
        if device.type == "cpu":
            release_deepspeed_shm_names()
    check_distinct_gpus(device)
    host_group(timeout_seconds=collective_timeout("gloo", hang_seconds))
    return device


_HOST_GROUP = None


def host_group(timeout_seconds: float = DEFAULT_COLLECTIVE_TIMEOUT):
    """A gloo group over every rank, for agreeing on host-side values (preemption, lease, stop flags).

    An all-reduce of a CPU tensor over NCCL is impossible and over a CUDA tensor makes the host wait for
    every queued kernel when it reads the result; over gloo the host only waits for its peers while the GPU
    keeps running. Collective the first time (every rank calls ``init_distributed``); None without a group.
    Its timeout is the hang timeout (``collective_timeout``), like the world group's: a rank stuck before a host
    flag agreement must end as a hang, not wait 30 minutes."""
    global _HOST_GROUP
    if _HOST_GROUP is None and dist.is_initialized() and dist.get_world_size() > 1:
        # its own group even when the world is gloo already (CPU runs): host-side agreement then takes the same
        # path on every kind of device, and tools can tell a host collective from a device one by its group
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
    return _HOST_GROUP


def init_local_gloo_rank(rank: int, world: int, port: int) -> None:
    """Start rank ``rank`` of ``world`` CPU processes on this host without a launcher (gloo, DeepSpeed's info
    logging off): how the memory benchmarks and the multi-rank test workers bring up their spawned ranks."""
    import logging

    import deepspeed
    from deepspeed.utils import logger

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logger.setLevel(logging.WARNING)
    skip_deepspeed_shm_allreduce()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    release_deepspeed_shm_names()


def skip_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building and mapping its shared-memory all-reduce op.

    Why: that op serves only DeepSpeed's inference all-reduce (``inference_all_reduce``: AutoTP inference), which
    training never calls (ZeRO, tensor and pipeline parallelism reduce through torch.distributed), yet every CPU
    process group loads it: the first launch on a machine JIT-compiles it (35 s of the demo's 7 min 41 s on a fresh
    machine) and every launch maps a ~69 MB /dev/shm buffer per rank. DeepSpeed builds it only when its table of
    ops that build here says so; marking it absent there before ``init_distributed`` skips both. (If another
    DeepSpeed version builds it anyway, ``release_deepspeed_shm_names`` still frees the buffers.)
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(table, dict):
        table[getattr(builder, "NAME", "deepspeed_shm_comm")] = False


def deepspeed_shm_path(rank: int) -> str:
    """/dev/shm file of DeepSpeed's CPU shared-memory all-reduce buffer for ``rank`` (name format of
    deepspeed/ops/csrc/cpu/comm/shm.cpp: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_deepspeed_shm_names() -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer name once every rank has mapped every buffer.

    DeepSpeed's CPU backend creates a ~69 MB /dev/shm segment per rank when all ranks are local and never
    removes it, so every run (and every killed run) leaks world × 69 MB of RAM until the machine fills up.
    The mappings stay valid after the unlink, and the kernel frees the memory when the last rank exits,
    however it exits.
    """
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has finished DeepSpeed's shm_initialize (which maps all peers' buffers)
    try:
        os.unlink(deepspeed_shm_path(dist.get_rank()))
    except FileNotFoundError:
        pass  # no shm path in this run (ranks not all local, or another DeepSpeed version's naming)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_state(tensors: dict, device: torch.device) -> dict:
    """Collective: rank 0's ``tensors`` on every rank, on ``device``, one tensor in flight at a time."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: v.to(device) for k, v in tensors.items()}
    box = [[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    out = {}
    for name, shape, dtype in box[0]:
        t = tensors[name].to(device) if dist.get_rank() == 0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        out[name] = t
    return out


def shutdown() -> None:
    """Tear the process group down after a clean finish: every rank leaves together, and gloo/NCCL threads
    are joined before interpreter teardown (left to exit-time destructors, one rank occasionally aborted with
    "terminate called without an active exception" after a complete run, failing the job)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_max_flags(flags: list, device: torch.device | None = None) -> list[bool]:
    """Each flag True on every rank if any rank raised it (preemption, lease lost, stop request): one collective
    over the host (gloo) group, so checking every step never makes the host wait for the GPU. ``device`` is
    unused (kept for callers written before the host group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)  # host memory on every kind of device
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return [v > 0 for v in t.tolist()]
