"""Apply the run's parallel layout to a plain, seeded DiT and build the DeepSpeed engine for it.

torchtitan's habit: the model (models/) is plain PyTorch; each parallelism is one ``apply_*`` step here, and
``build_engine`` picks the steps the ``Topology`` asks for:

* ``apply_data_parallel``   tensor = pipeline = 1, dense: ``deepspeed.initialize`` on the DiT (ZeRO-1/2/3);
* ``apply_expert_parallel`` MoE (model.moe.num_experts > 0): MoE FFNs become DeepSpeed's ``deepspeed.moe.layer.MoE``
  with ``ep_size = parallel.expert`` (also for EP = 1, so EP = 1 and EP = 2 compare like for like), optimizer
  groups split with ``split_params_into_different_moe_groups_for_optimizer``;
* ``apply_tensor_parallel`` tensor > 1: fairscale column/row-parallel layers (models/parallel/tensor.py) under an
  ``mpu`` whose groups follow ``Topology.groups`` (trainer/engine/mpu.py);
* ``apply_pipeline``        pipeline > 1 (with or without tensor > 1): a ``PipelineModule`` over the DiT's layer
  specs (models/parallel/pipeline.py) on DeepSpeed's ``PipeModelDataParallelTopology``; the loss is computed on
  the last stage (trainer/engine/pipeline.py) and a step is ``engine.train_batch`` (trainer/loop/pipeline_step.py).

Every rank first builds the full model with the run seed (done by the caller), then keeps its slice,
so every layout starts from the single-process weights exactly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from models.args import DiTArgs
from trainer.engine.mpu import ModelParallelUnit
from trainer.engine.pipeline import PipelineLoss, pipeline_module_class
from trainer.config.topology import Coords, Topology

# Written by every rank of a ZeRO-1/2 checkpoint (ParallelEngine.optimizer_map), read by trainer/state/reshard.py.
OPTIMIZER_MAP = "optim_map_rank{rank:05d}.json"


@dataclass
class ParallelEngine:
    engine: object
    optimizer: object
    scheduler: object
    topo: Topology
    coords: Coords
    pipeline: bool = False
    name_map: dict = field(default_factory=dict)  # local param name -> official
    split: dict = field(default_factory=dict)  # official name -> tensor split
    moe_layers: int = 0
    loss: Optional[PipelineLoss] = None
    mpu: Optional[ModelParallelUnit] = None

    @property
    def model_parallel(self) -> bool:
        """True when ranks hold different pieces of the model (tensor, pipeline or expert parallel MoE)."""
        return self.topo.tensor > 1 or self.topo.pipeline > 1 or self.moe_layers > 0

    def layout(self) -> dict:
        c = self.coords
        return {"pipe": c.pipe, "data": c.data, "tensor": c.tensor, "expert": c.expert, "world": self.topo.world,
                "tensor_size": self.topo.tensor, "pipeline_size": self.topo.pipeline, "expert_size": self.topo.expert}

    @property
    def loss_scaling(self):
        """fp16 runs: the loss-scale driver (``stats()`` for metrics); None otherwise."""
        return getattr(self.engine, "dit_loss_scaling", None)

    @property
    def ema_writer_ranks(self) -> Optional[set]:
        return set(range(self.topo.world)) if self.model_parallel else None

    def local_weights(self) -> dict:
        """This rank's trainable weights under official names (+ split spec), for model_rank*.pt."""
        tensors = {self.name_map[n]: p.detach().float().cpu().clone()
                   for n, p in self.engine.module.named_parameters() if p.requires_grad}
        return {"layout": self.layout(), "split": {n: h for n, h in self.split.items() if n in tensors},
                "tensors": tensors}

    def save_extra(self, tmp_path: str) -> None:
        """Checkpoint hook (every rank): the trained weights in a form export reads without unpickling, and under
        ZeRO-1/2 the optimizer map a layout conversion reads (``optimizer_map``).

        Model-parallel layouts: data-rank-0 ranks write their slices under official names. ZeRO-3 keeps no full
        weights anywhere: every rank writes its fp32 partition of each parameter, which trainer/state/consolidate.py
        concatenates like the EMA's, instead of DeepSpeed's zero_to_fp32 (which unpickles its optimizer files)."""
        if self.engine.zero_optimization_stage() in (1, 2):
            with open(os.path.join(tmp_path, OPTIMIZER_MAP.format(rank=dist.get_rank())), "w") as f:
                json.dump(self.optimizer_map(tmp_path), f)
        if self.model_parallel and self.coords.data == 0:
            torch.save(self.local_weights(), os.path.join(tmp_path, f"model_rank{dist.get_rank():05d}.pt"))
        elif not self.model_parallel and self.engine.zero_optimization_stage() == 3:
            tensors = {n: p.ds_tensor.detach().float().clone()
                       for n, p in self.engine.module.named_parameters() if p.requires_grad}
            torch.save({"sharded": True, "tensors": tensors},
                       os.path.join(tmp_path, f"weights_rank{dist.get_rank():05d}.pt"))

    def optimizer_map(self, tmp_path: str) -> dict:
        """What a layout conversion needs to read this rank's ZeRO-1/2 optimizer file without this engine
        (trainer/state/reshard.py): the file's name, each parameter group's partition index and count (dense groups
        are cut over the data-parallel group, expert groups over the expert-data-parallel group), and the local
        parameter names with their official names, shapes and tensor-parallel split."""
        opt = self.engine.optimizer
        ckpt_file = self.engine._get_zero_ckpt_name(os.path.dirname(tmp_path), os.path.basename(tmp_path))
        groups = [{"partition_index": dist.get_rank(group=opt.real_dp_process_group[g]),
                   "partition_count": int(opt.partition_count[g])} for g in range(len(opt.bit16_groups))]
        params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        return {"format": 1, "rank": dist.get_rank(), "optimizer_file": os.path.basename(ckpt_file),
                "layout": self.layout(), "groups": groups,
                "names": {n: self.name_map[n] for n in params}, "shapes": {n: list(p.shape) for n, p in params.items()},
                "split": {self.name_map[n]: self.split[self.name_map[n]] for n in params if self.name_map[n] in self.split}}


def _identity_name_map(module) -> dict:
    return {n: n for n, _ in module.named_parameters()}


def initialize_engine(**kwargs):
    """``deepspeed.initialize``, then drop ZeRO's redundant fp32 master clone (trainer/engine/zero_master.py) and,
    for fp16, put the loss scale where ZeRO's clipping and overflow skips see it (trainer/engine/loss_scale.py).

    Every engine of the trainer (and the benchmarks that measure it) is built here.
    """
    import deepspeed

    from trainer.engine.zero_master import alias_fp32_master_partitions

    from trainer.engine.loss_scale import install_fp16_loss_scaling

    engine, optimizer, loader, scheduler = deepspeed.initialize(**kwargs)
    freed = alias_fp32_master_partitions(optimizer)
    if freed and dist.get_rank() == 0:
        print(f"[trainer] ZeRO fp32 master partitions share the weights' memory: {freed / 2**20:.1f} MiB freed "
              "on rank 0", flush=True)
    engine.dit_loss_scaling = install_fp16_loss_scaling(engine)  # fp16 only (trainer/engine/loss_scale.py)
    return engine, optimizer, loader, scheduler


# --------------------------------------------------------------------------- the apply_* steps


def apply_data_parallel(model, *, topo: Topology, coords: Coords, ds: dict, param_groups: Callable,
                        lr_scheduler: Callable) -> ParallelEngine:
    engine, optimizer, _, scheduler = initialize_engine(model=model, model_parameters=param_groups(model),
                                                           config=ds, lr_scheduler=lr_scheduler)
    return ParallelEngine(engine, optimizer, scheduler, topo, coords, False, _identity_name_map(engine.module))


def apply_expert_parallel(model, *, arch: DiTArgs, topo: Topology, coords: Coords, ds: dict, param_groups: Callable,
                          lr_scheduler: Callable) -> ParallelEngine:
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from models.parallel.moe import moe_name_map, use_deepspeed_moe

    moe_layers = use_deepspeed_moe(model, topo.expert, coords.expert)
    groups = param_groups(model)
    for i, g in enumerate(groups):
        g.setdefault("name", f"group{i}")
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    engine, optimizer, _, scheduler = initialize_engine(model=model, model_parameters=groups, config=ds,
                                                           lr_scheduler=lr_scheduler)
    num_local = arch.moe.num_experts // topo.expert
    name_map = moe_name_map([n for n, _ in engine.module.named_parameters()], num_local, coords.expert)
    return ParallelEngine(engine, optimizer, scheduler, topo, coords, False, name_map, {}, moe_layers)


def apply_tensor_parallel(model, *, topo: Topology, coords: Coords) -> dict:
    """Swap the DiT's attention/MLP linears for fairscale column/row-parallel slices in place.

    Returns official name -> how tensor ranks split it (for the EMA, export and checkpoints)."""
    from models.parallel.tensor import tensor_parallelize

    return tensor_parallelize(model, coords.tensor, topo.tensor)


def apply_pipeline(model, *, arch: DiTArgs, topo: Topology, coords: Coords, ds: dict, objective, param_groups: Callable,
                   lr_scheduler: Callable, grad_checkpoint: int, pipeline_partition: str, split: dict,
                   mpu: ModelParallelUnit, rank: int) -> ParallelEngine:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from models.parallel.pipeline import (DiTSource, dit_layer_specs, layer_parameter_counts, partition_bounds,
                                          pipeline_name_map)

    bounds = partition_bounds(layer_parameter_counts(model), topo.pipeline, pipeline_partition)
    source = DiTSource(model)
    loss = PipelineLoss(objective)
    module = pipeline_module_class()(
        dit_layer_specs(source, grad_checkpoint), bounds,
        topology=PipeModelDataParallelTopology(num_pp=topo.pipeline, num_mp=topo.tensor, num_dp=topo.data),
        loss_fn=loss, partition_method="parameters", activation_checkpoint_interval=0, dynamic_shape=True)
    source.release()
    grid = module._grid
    if grid.get_data_parallel_id() != coords.data or grid.get_stage_id() != coords.pipe or \
            grid.get_slice_parallel_rank() != coords.tensor:
        raise RuntimeError(f"rank {rank}: DeepSpeed's pipeline grid (stage {grid.get_stage_id()}, data "
                           f"{grid.get_data_parallel_id()}, tensor {grid.get_slice_parallel_rank()}) disagrees with "
                           f"the topology {coords}")
    # The carried conditioning vector needs its gradient sent back: no activation partitioning over TP.
    ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    engine, optimizer, _, scheduler = initialize_engine(model=module, model_parameters=param_groups(module),
                                                           config=ds, lr_scheduler=lr_scheduler)
    name_map = pipeline_name_map([n for n, _ in module.named_parameters()], arch.depth)
    return ParallelEngine(engine, optimizer, scheduler, topo, coords, True, name_map, split, 0, loss, mpu)


def build_engine(model, *, arch: DiTArgs, topo: Topology, ds: dict, objective, param_groups: Callable,
                 lr_scheduler: Callable, grad_checkpoint: int = 0, pipeline_partition: str = "parameters",
                 rank: Optional[int] = None) -> ParallelEngine:
    """``model``: the full plain DiT, built with the run seed on every rank. Collective."""
    rank = dist.get_rank() if rank is None else rank
    coords = topo.coords(rank)
    ds = dict(ds)
    common = dict(topo=topo, coords=coords, ds=ds, param_groups=param_groups, lr_scheduler=lr_scheduler)
    if arch.moe is not None:
        return apply_expert_parallel(model, arch=arch, **common)
    if topo.tensor == 1 and topo.pipeline == 1:
        return apply_data_parallel(model, **common)
    mpu = ModelParallelUnit(topo, rank)
    mpu.install_fairscale()
    split = apply_tensor_parallel(model, topo=topo, coords=coords) if topo.tensor > 1 else {}
    if topo.pipeline == 1:
        engine, optimizer, _, scheduler = initialize_engine(model=model, model_parameters=param_groups(model),
                                                               config=ds, mpu=mpu, lr_scheduler=lr_scheduler)
        return ParallelEngine(engine, optimizer, scheduler, topo, coords, False, _identity_name_map(engine.module),
                              split, mpu=mpu)
    return apply_pipeline(model, arch=arch, objective=objective, grad_checkpoint=grad_checkpoint,
                          pipeline_partition=pipeline_partition, split=split, mpu=mpu, rank=rank, **common)
