"""Drop DeepSpeed ZeRO's second fp32 copy of the weights when the parameters already are fp32.

ZeRO-1/2 keep a "master" fp32 partition beside the (normally 16-bit) parameters: the optimizer updates the
master and DeepSpeed copies it back into the parameter partition after every step. This trainer's bf16 is
torch autocast over fp32 parameters (trainer/config/ds_json.py), so in fp32, bf16 and fp16 runs the master and the
parameter partition have the same dtype and, after every step, the same values: the master is a second
copy of 4 bytes × (parameters ÷ data-parallel ranks) per rank, and its copy-back one more pass per step.

``alias_fp32_master_partitions`` points each master at the storage of the rank's own parameter partition,
so the optimizer updates the parameters in place, DeepSpeed's copy-back becomes a copy of a tensor onto
itself (which torch skips), and the clone is freed. It applies only where that is exact: DeepSpeed's
ZeRO-1/2 optimizer, no CPU offload (the master lives in host memory there), same dtype, device and shape.
fp16 runs are autocast over fp32 parameters as well (trainer/engine/loss_scale.py): a loss-scale overflow skips
the whole optimizer step, so the aliased master, like the weights, stays untouched.

ZeRO-3 means to do this itself: ``_create_fp32_partitions`` reuses the parameter partition "when torch
autocast is enabled", and its copy-back is written for that alias. Its test compares a ``torch.device`` with
the accelerator's device *name* (a string), which is never equal, so DeepSpeed 0.19 clones anyway (on GPUs as
well). ``alias_fp32_master_partitions`` completes it for sub-groups that are neither offloaded nor swapped.
"""
from __future__ import annotations

import warnings

import torch.distributed as dist


def alias_fp32_master_partitions(optimizer) -> int:
    """Alias every eligible master partition to its parameter partition; returns the bytes freed (0: none).

    Call right after ``deepspeed.initialize``, before the first step and before loading a checkpoint:
    DeepSpeed's fp32 checkpoint load then writes into the parameters, which is what resume needs.
    This reads DeepSpeed internals; a DeepSpeed whose optimizer lacks them keeps its clone, with a warning.
    """
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:  # a DeepSpeed without these optimizers: nothing to alias
        return 0
    try:
        if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
            return _alias_stage3(optimizer)
        if isinstance(optimizer, DeepSpeedZeroOptimizer):
            return _alias_stage1_and_2(optimizer)
    except AttributeError as exc:
        import deepspeed

        warnings.warn(f"DeepSpeed {deepspeed.__version__}'s ZeRO optimizer lacks {exc.name or exc!s}: keeping its "
                      "fp32 master clone (4 bytes/param/rank more memory; training is unaffected)", stacklevel=2)
    return 0


def _alias_stage1_and_2(optimizer) -> int:
    """ZeRO-1/2: each group's fp32 master partition onto the rank's partition of the flat parameter buffer."""
    if optimizer.cpu_offload:
        return 0
    freed = 0
    for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
        own = optimizer.parallel_partitioned_bit16_groups[i][dist.get_rank(group=optimizer.real_dp_process_group[i])]
        if (own.dtype, own.device, own.shape) != (master.dtype, master.device, master.shape):
            continue
        if master.data_ptr() == own.data_ptr():
            continue  # already aliased
        freed += master.numel() * master.element_size()
        master.data = own.data  # same tensor object: the optimizer's param_groups and state keys stay valid
    if freed:
        # each parameter's high-precision mapping (safe_get_full_fp32_param, universal checkpoints) holds
        # views of the old master: rebuild them over the aliased storage, as DeepSpeed does after offload
        optimizer._link_all_hp_params()
    return freed


def _alias_stage3(optimizer) -> int:
    """ZeRO-3: each sub-group's fp32 flat partition onto the flat parameter partition it is stepped from."""
    if optimizer.offload_optimizer or optimizer.offload_param or getattr(optimizer, "swap_optimizer", False):
        return 0
    freed = 0
    for i, master in enumerate(optimizer.fp32_partitioned_groups_flat):
        own = optimizer.fp16_partitioned_groups_flat[i]
        if own is None or (own.dtype, own.device, own.shape) != (master.dtype, master.device, master.shape):
            continue
        if master.data_ptr() == own.data_ptr():
            continue  # already aliased (a DeepSpeed whose own check works)
        freed += master.numel() * master.element_size()
        master.data = own.data  # the step's copy-back (fp16_partitioned_groups_flat ← fp32) becomes a no-op
    return freed
