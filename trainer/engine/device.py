"""Which device a rank computes on, and how fp32 matmuls run there.

GPU choice. DeepSpeed takes the raw ``LOCAL_RANK`` as the CUDA device index in several places (the engine's
``set_device``, the NCCL ``device_id`` at process-group start, ``PipelineModule``, ``zero.Init``), so the
trainer must pick the same index or the two disagree on where tensors live. That works when every rank of a
node sees all of the node's GPUs (``deepspeed --num_gpus``, ``torchrun``, ``srun --gpus-per-node``). Two
other set-ups are common:

* one visible GPU per task (``srun --gpus-per-task=1``, ``--gpu-bind``): the rank's only GPU is index 0, and
  ``LOCAL_RANK`` ≥ 1 would be an invalid device ordinal. The rank's ``LOCAL_RANK`` is then rewritten to 0
  before DeepSpeed reads it, so both pick ``cuda:0`` (the node-local rank is kept in ``DIT_NODE_LOCAL_RANK``);
* fewer visible GPUs than ranks on the node: two ranks would silently share a GPU. That fails here, before
  any process group starts, with the counts and what to change.

Whether two ranks of one host ended up on the same physical GPU anyway (one GPU visible to two ranks) is
checked after the process group starts by comparing GPU UUIDs (``check_distinct_gpus``).

TF32. torch ≥ 1.12 runs fp32 matmuls in full fp32 by default; on Ampere and newer GPUs TF32 tensor cores are
~7× faster, and the reference DiT training script turns them on. ``train.tf32`` (default true) does so for
CUDA runs; the MFU peak is then the device's TF32 peak (``math_mode``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


class DeviceMappingError(RuntimeError):
    """Ranks cannot be mapped one-to-one onto the visible GPUs; the message says what to change."""


@dataclass(frozen=True)
class CudaPlacement:
    index: int  # the CUDA device index this rank uses (and DeepSpeed with it)
    env: dict = field(default_factory=dict)  # environment updates that make DeepSpeed agree


def plan_cuda_device(local_rank: int, local_world: int, visible: int, launcher_hint: str = "") -> CudaPlacement:
    """The device index of node-local rank ``local_rank`` of ``local_world`` ranks seeing ``visible`` GPUs.

    Pure (no CUDA call), so every rule is testable without a GPU. Raises ``DeviceMappingError``."""
    if visible < 1:
        raise DeviceMappingError("CUDA is available but no GPU is visible to this process (CUDA_VISIBLE_DEVICES="
                                 f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}); check the allocation")
    if local_rank < 0 or local_world < 1 or local_rank >= local_world:
        raise DeviceMappingError(f"LOCAL_RANK={local_rank} is not a rank of LOCAL_WORLD_SIZE={local_world}; the "
                                 "launcher's environment is inconsistent")
    if visible == 1 and local_world > 1:
        # one GPU per task (Slurm --gpus-per-task / --gpu-bind, or a CUDA_VISIBLE_DEVICES per rank): index 0;
        # DeepSpeed reads LOCAL_RANK as the index, so it is rewritten for this process.
        env = {"LOCAL_RANK": "0", "DIT_NODE_LOCAL_RANK": str(local_rank)}
        if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
            env["OMPI_COMM_WORLD_LOCAL_RANK"] = "0"  # DeepSpeed asserts the two agree
        return CudaPlacement(0, env)
    if local_world > visible:
        raise DeviceMappingError(
            f"{local_world} ranks on this node but only {visible} GPUs visible to each (LOCAL_RANK={local_rank}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): ranks would share GPUs. "
            f"Start at most {visible} ranks per node (deepspeed --num_gpus {visible}, torchrun --nproc_per_node "
            f"{visible}, srun --ntasks-per-node={visible}) or make every GPU of the node visible"
            + (f" ({launcher_hint})" if launcher_hint else ""))
    return CudaPlacement(local_rank)


def local_world_size(environ=os.environ) -> int | None:
    """Ranks on this node, from whichever launcher started the process (torchrun, deepspeed, srun via
    trainer/engine/launch_env.py, mpirun); None when no launcher says (WORLD_SIZE may span nodes)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def pick_device() -> torch.device:
    """CUDA when present (one GPU per rank, the index DeepSpeed uses too), else CPU; never assume one.

    Must run before the process group starts (NCCL binds the device then)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    placement = plan_cuda_device(local_rank, max(local_world_size() or 1, local_rank + 1), torch.cuda.device_count())
    os.environ.update(placement.env)
    torch.cuda.set_device(placement.index)
    return torch.device("cuda", placement.index)


def check_distinct_gpus(device: torch.device) -> None:
    """Collective, after the process group starts: no two ranks of one host on the same physical GPU."""
    import socket

    import torch.distributed as dist

    if device.type != "cuda" or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid), dist.get_rank())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    message = shared_gpu_problem(everyone)
    if message:
        raise DeviceMappingError(message)


def shared_gpu_problem(ranks: list[tuple[str, str, int]]) -> str:
    """'' when every (host, GPU uuid) pair belongs to one rank, else a message naming the ranks that share."""
    seen: dict[tuple[str, str], list[int]] = {}
    for host, uuid, rank in ranks:
        seen.setdefault((host, uuid), []).append(rank)
    shared = {k: v for k, v in seen.items() if len(v) > 1}
    if not shared:
        return ""
    parts = [f"ranks {v} share GPU {uuid} on {host}" for (host, uuid), v in sorted(shared.items())]
    return ("; ".join(parts) + ": one rank per GPU is required. Give each task its own GPU (srun --gpus-per-task=1 "
            "or --gpu-bind=single:1) or start fewer ranks per node")


# --------------------------------------------------------------------------- fp32 matmul precision


def tf32_in_effect(precision: str, tf32: bool, device_type: str, capability: tuple[int, int] = (0, 0)) -> bool:
    """Whether fp32 matmuls run on TF32 tensor cores: CUDA, ``train.tf32``, and an Ampere or newer GPU (8.0+).

    Set for every precision: bf16/fp16 autocast runs keep some fp32 matmuls (outside autocast), which take it too.
    """
    return bool(tf32) and device_type == "cuda" and tuple(capability) >= (8, 0)


def configure_matmul_precision(precision: str, tf32: bool, device: torch.device) -> str:
    """Set torch's TF32 switches for this process; returns the math mode the model's matmuls run in
    ('bf16', 'fp16', 'tf32' or 'fp32'), which selects the MFU peak (trainer/monitor/telemetry.py)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    on = tf32_in_effect(precision, tf32, device.type, capability)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    return math_mode(precision, device)


def math_mode(precision: str, device: torch.device) -> str:
    """The math the model's matmuls run in, read from torch's switches now in effect (not from the config)."""
    if precision in ("bf16", "fp16"):
        return precision
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


# --------------------------------------------------------------------------- host -> device copies


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the GPU.

    A blocking host → device copy waits for every kernel queued before it; from pageable memory even a
    ``non_blocking`` copy may stage through the driver synchronously. Pinned memory plus ``non_blocking``
    is a DMA that overlaps the running step. On CPU this is a plain ``to``."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)  # on CPU the flag changes nothing: one code path everywhere
