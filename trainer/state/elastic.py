"""Load a universal checkpoint into an engine of any ZeRO stage (1, 2 or 3) and any data-parallel size.

The per-parameter folders of DeepSpeed's universal checkpoint (``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``, full
unpartitioned tensors; trainer/state/convert.py) do not depend on the layout that wrote them, whichever ZeRO family
that was. DeepSpeed 0.19's own universal loaders do: each family reads a *global* ``zero/optimizer_state.pt`` in its
own format (a ZeRO-2 conversion fails in the ZeRO-3 loader with ``KeyError: 'optimizer_state_dict'``, a ZeRO-3 one in
the ZeRO-1/2 loader with "Empty ds_version"). So this module loads the folders itself, through DeepSpeed's
tensor-fragment API, which addresses a parameter's slice of the fp32 master and of the AdamW moments on this rank
under ZeRO-1, 2 and 3 alike:

* ZeRO-1/2: ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (each rank keeps the fragment of the
  full tensor that falls in its flat partition); every rank also holds the full module weights, which are set to
  the same values (``lp = master``, rounded to the parameter dtype as DeepSpeed's own copy-back does).
* ZeRO-3: ``safe_set_local_fp32_param`` / ``safe_set_local_optimizer_state`` with this rank's slice of the
  zero-padded full tensor (DeepSpeed's ``set_full_hp_param`` cannot set the last rank of a parameter whose size is
  not a multiple of the data-parallel size), then the parameter partitions are refreshed from the master and the
  persistent parameters gathered again, as ``engine.load_checkpoint`` does around its own load.
* AdamW's ``step``: torch keeps it per flat partition (``optimizer.state[flat]["step"]``, a 0-d float32 tensor, on
  the partition's device when fused or capturable, else on the CPU); every partition gets a tensor of its own (see
  below). The conversion stores it per parameter (``step.pt``; trainer/state/convert.py adds it for ZeRO-3 sources).
* The LR schedule position, global steps and samples and skipped steps come from the conversion's model-states file
  (DeepSpeed's engine metadata), as the native load restores them; the per-group hyperparameters are the run
  config's (the schedule sets the lr).

A fresh engine has no optimizer state yet (torch creates it at the first step): it is created here in torch's own
format, so the first step after the resume continues it rather than starting over.

Why not DeepSpeed's ZeRO-3 universal loader for a data-parallel change (it loads): it puts one shared ``step`` tensor
into every sub-group's AdamW state, and ZeRO-3 steps the sub-groups one at a time while torch increments ``step`` in
place, so with two parameter groups the count advanced twice per step and the bias correction drifted (5e-4 relative
in the losses by the third step; docs/parallelism.md). Here each partition's step is its own tensor, and the load is
tested bit-exact and continuous (tests/test_elastic_resume.py).
"""
from __future__ import annotations

import os

import torch

from trainer.state.convert import MODEL_STATES, global_adam_step, parameter_state, universal_names

MOMENTS = ("exp_avg", "exp_avg_sq")


def _name(name: str) -> str:
    return name.replace("_orig_mod.", "")  # torch.compile's wrapper prefix, if one side was compiled


def adam_step(universal: str, state: dict) -> torch.Tensor:
    """The AdamW step count of a universal checkpoint (one value: every group steps together)."""
    steps = {float(entry["step"]) for entry in state.values() if "step" in entry}
    if not steps:  # a ZeRO-3 conversion published before convert.py added step.pt: the global state has it
        return global_adam_step(universal)
    if len(steps) != 1:
        raise RuntimeError(f"{universal}: expected one AdamW step count, found {sorted(steps)}")
    return torch.tensor(steps.pop(), dtype=torch.float32)


def _flat_partitions(optimizer) -> list:
    """The base optimizer's flat fp32 partitions (the keys of its state) of a ZeRO-1/2/3 optimizer."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return list(optimizer.fp32_partitioned_groups_flat)
    return list(optimizer.single_partition_of_fp32_groups)


def _group_of(optimizer, index: int) -> dict:
    groups = optimizer.optimizer.param_groups
    mapping = getattr(optimizer, "sub_group_to_group_id", None)  # ZeRO-3 sub-groups
    return groups[mapping[index]] if mapping is not None else groups[index]


def _ensure_adam_state(optimizer, step: torch.Tensor) -> None:
    """AdamW state for every flat partition, in torch's format, with ``step`` set (moments kept if present)."""
    state = optimizer.optimizer.state
    for i, flat in enumerate(_flat_partitions(optimizer)):
        group = _group_of(optimizer, i)
        entry = state[flat]
        for key in MOMENTS:
            if key not in entry:
                entry[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        on_device = group.get("fused") or group.get("capturable")
        entry["step"] = step.to(flat.device if on_device else "cpu").clone()
    if hasattr(optimizer, "bit16_groups"):  # ZeRO-1/2: point each parameter's fragment at the (new) state
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for i, flat in enumerate(_flat_partitions(optimizer)):
            lazy_init_hp_params_optimizer_state(optimizer.bit16_groups[i], flat, state)
        optimizer._hp_optimizer_states_linked = True


def _set_stage3(optimizer, param, values: dict) -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    import torch.distributed as dist

    group = optimizer._get_param_partition_group(param) if hasattr(optimizer, "_get_param_partition_group") \
        else optimizer.dp_process_group
    rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
    n = param.partition_numel()
    for key, value in values.items():
        flat = value.reshape(-1)
        if flat.numel() != param.ds_numel:
            raise RuntimeError(f"{key} of a parameter of {param.ds_numel} elements has {flat.numel()}")
        padded = torch.zeros(n * world, dtype=flat.dtype)
        padded[:flat.numel()] = flat
        local = padded.narrow(0, rank * n, n)
        if key == "fp32":
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, key)


def _set_stage1_2(param, values: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for key, value in values.items():
        value = value.reshape(param.shape)
        if key == "fp32":
            safe_set_full_fp32_param(param, value)
            param.data.copy_(value)  # every ZeRO-1/2 rank holds the full weights: lp = master
        else:
            safe_set_full_optimizer_state(param, value, key)


@torch.no_grad()
def load_universal(engine, universal: str, name_map: dict | None = None, split: dict | None = None,
                   tensor_rank: int = 0, tensor_size: int = 1) -> None:
    """Collective: weights, AdamW moments and step, LR schedule position and engine counters of ``engine`` from the
    universal checkpoint folder ``universal`` (written under any layout; folders named by official DiT names).

    Model-parallel engines: ``name_map`` (local parameter name -> official name: pipeline layer names, DeepSpeed-MoE
    expert names) and ``split`` (official name -> how tensor ranks cut it) select and cut this rank's piece."""
    from models.parallel.tensor import slice_tensor

    name_map, split = name_map or {}, split or {}
    optimizer = engine.optimizer
    zero3 = hasattr(optimizer, "fp32_partitioned_groups_flat")
    # one parameter in host memory at a time: the whole state of DiT-XL/2 is 8 GB, on each of a node's ranks
    names = {_name(n): n for n in universal_names(universal)}
    step = adam_step(universal, {k: parameter_state(universal, n, ("step",)) for k, n in names.items()})
    meta_file = next(os.path.join(universal, n) for n in MODEL_STATES if os.path.isfile(os.path.join(universal, n)))
    meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    if zero3:
        optimizer.checkpoint_event_prologue()  # partitions only (persistent parameters too), as engine loads do
    _ensure_adam_state(optimizer, step)
    loaded = set()
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue  # frozen tensors (the fixed sin-cos table) are rebuilt by the model, not trained
        official = _name(name_map.get(name, name))
        entry = parameter_state(universal, names[official], ("fp32", *MOMENTS)) if official in names else None
        if entry is None or any(k not in entry for k in ("fp32", *MOMENTS)):
            raise RuntimeError(f"{universal} has no complete state for parameter {official}")
        values = {k: slice_tensor(entry[k].float(), split.get(official), tensor_rank, tensor_size)
                  for k in ("fp32", *MOMENTS)}
        _set_stage3(optimizer, param, values) if zero3 else _set_stage1_2(param, values)
        loaded.add(official)
    loaded = _loaded_anywhere(loaded)
    extra = sorted(n for n, folder in names.items()
                   if n not in loaded and os.path.exists(os.path.join(universal, "zero", folder, "exp_avg.pt")))
    if extra:
        raise RuntimeError(f"{universal} holds trained parameters this model lacks: {extra[:5]}")
    if zero3:
        for i, flat in enumerate(optimizer.fp16_partitioned_groups_flat):
            if flat is not None:  # the parameter partitions from the master (a no-op where they share memory)
                flat.data.copy_(optimizer.fp32_partitioned_groups_flat[i].data)
                optimizer._unflatten_partitioned_parameters(i)
        optimizer.checkpoint_event_epilogue()  # gathers the persistent parameters again
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps = int(meta["global_steps"])
    engine.global_samples = int(meta.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(meta["skipped_steps"])


def _loaded_anywhere(loaded: set) -> set:
    """The union of every rank's loaded names (pipeline stages and experts each load a part of the model)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loaded
    from trainer.engine.distributed import host_group

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(loaded), group=host_group())
    return set().union(*map(set, everyone))


def full_state(engine) -> dict:
    """Collective: name -> {"fp32", "exp_avg", "exp_avg_sq"} full tensors as the engine holds them now, plus
    "step" (the AdamW step of every flat partition). For checks."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "bit16_groups") and not getattr(optimizer, "_hp_optimizer_states_linked", False):
        for i, flat in enumerate(_flat_partitions(optimizer)):  # after a native load DeepSpeed links them lazily
            lazy_init_hp_params_optimizer_state(optimizer.bit16_groups[i], flat, optimizer.optimizer.state)
        optimizer._hp_optimizer_states_linked = True
    out = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            out[_name(name)] = {"fp32": safe_get_full_fp32_param(param).detach().cpu().reshape(param.ds_shape
                                if hasattr(param, "ds_shape") else param.shape),
                                **{k: safe_get_full_optimizer_state(param, k).detach().cpu() for k in MOMENTS}}
    steps = [engine.optimizer.optimizer.state[f]["step"] for f in _flat_partitions(engine.optimizer)]
    return {"params": out, "steps": [float(s) for s in steps]}


def gathered_state(engine, name_map: dict | None = None, split: dict | None = None, layout: dict | None = None) -> dict:
    """Collective: ``full_state`` of a model-parallel engine under official names, tensor slices merged, on rank 0
    (the others get {}); "steps" lists every rank's flat partitions' AdamW steps. For checks."""
    import torch.distributed as dist

    from trainer.state.parallel_ema import gather_full_state

    local = full_state(engine)
    name_map, split = name_map or {}, split or {}
    official = {_name(name_map.get(n, n)): n for n in (k for k, p in engine.module.named_parameters() if p.requires_grad)}
    out = {}
    for key in ("fp32", *MOMENTS):
        tensors = {o: local["params"][_name(n)][key].reshape(local["params"][_name(n)]["fp32"].shape)
                   for o, n in official.items()}
        merged, _ = gather_full_state({"layout": layout or {}, "split": {o: split[o] for o in tensors if o in split},
                                       "tensors": tensors})
        out[key] = merged
    steps = [None] * dist.get_world_size() if dist.is_initialized() else [local["steps"]]
    if dist.is_initialized():
        dist.all_gather_object(steps, local["steps"])
    if out["fp32"]:
        return {"params": {n: {k: out[k][n] for k in out} for n in out["fp32"]},
                "steps": [s for per_rank in steps for s in per_rank]}
    return {}
