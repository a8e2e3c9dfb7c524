"""Apply the run's parallel layout to a plain, seeded DiT and build the DeepSpeed engine for it.

One entry point, ``build_engine``, for every layout of ``Topology`` (data × tensor × pipeline, expert):

* plain data parallel (tensor = pipeline = 1, dense): ``deepspeed.initialize`` on the DiT, as before;
* MoE (model.moe.num_experts > 0): MoE FFNs become DeepSpeed's ``deepspeed.moe.layer.MoE`` with
  ``ep_size = parallel.expert`` (also for EP = 1, so EP = 1 and EP = 2 compare like for like), optimizer
  groups split with ``split_params_into_different_moe_groups_for_optimizer``;
* tensor parallel (tensor > 1, pipeline = 1): fairscale column/row-parallel layers
  (models/parallel/tensor.py) and an ``mpu`` whose groups follow ``Topology.groups``;
* pipeline parallel (pipeline > 1, with or without tensor > 1): a ``PipelineModule`` over the DiT's layer
  specs (models/parallel/pipeline.py) on DeepSpeed's ``PipeModelDataParallelTopology``; the loss is
  computed on the last stage (``PipelineLoss``) and a step is ``engine.train_batch`` (trainer/pipeline_step.py).

Every rank first builds the full model with the run seed (done by the caller), then keeps its slice,
so every layout starts from the single-process weights exactly.

fairscale's ``initialize_model_parallel`` is not used: its rank order (data, pipe, model) differs from
DeepSpeed's pipeline grid (pipe, data, model) once pipeline > 1. The groups are built here from
``Topology`` (DeepSpeed's order) and installed into fairscale's module globals, so fairscale's layers,
DeepSpeed's engine and the data loader agree on who is in which group.

Model-parallel checkpoints: each rank writes its EMA (``ema_rank*.pt``) and each data-rank-0 rank its
weights (``model_rank*.pt``) under official DiT names with a split spec; ``merge_states`` turns the
files of any layout back into one official state dict (trainer/export.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from trainer.ema import EMA
from trainer.topology import Coords, Topology


# --------------------------------------------------------------------------- process groups / mpu


class ModelParallelUnit:
    """The ``mpu`` DeepSpeed asks for, with groups derived from ``Topology`` (collective to build)."""

    def __init__(self, topo: Topology, rank: int):
        self.topo, self.rank = topo, rank
        self.coords: Coords = topo.coords(rank)
        self._groups, self._ranks = {}, {}
        for kind in ("tensor", "data", "pipeline"):  # same order on every rank: new_group is collective
            for ranks in topo.groups(kind):
                group = dist.new_group(ranks=ranks) if len(ranks) < dist.get_world_size() else dist.group.WORLD
                if rank in ranks:
                    self._groups[kind], self._ranks[kind] = group, ranks

    # tensor ("model" for DeepSpeed's clipping/overflow checks and fairscale)
    def get_model_parallel_rank(self):
        return self.coords.tensor

    def get_model_parallel_world_size(self):
        return self.topo.tensor

    def get_model_parallel_group(self):
        return self._groups["tensor"]

    def get_model_parallel_src_rank(self):
        return self._ranks["tensor"][0]

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.coords.data

    def get_data_parallel_world_size(self):
        return self.topo.data

    def get_data_parallel_group(self):
        return self._groups["data"]

    def get_data_parallel_group_ranks(self):
        return list(self._ranks["data"])

    def get_pipe_parallel_rank(self):
        return self.coords.pipe

    def get_pipe_parallel_world_size(self):
        return self.topo.pipeline

    def get_pipe_parallel_group(self):
        return self._groups["pipeline"]

    def install_fairscale(self) -> None:
        """Point fairscale.nn.model_parallel's globals at these groups (its layers read them)."""
        from fairscale.nn.model_parallel import initialize as fs

        fs._MODEL_PARALLEL_GROUP = self._groups["tensor"]
        fs._DATA_PARALLEL_GROUP = self._groups["data"]
        fs._PIPELINE_PARALLEL_GROUP = self._groups["pipeline"]
        fs._PIPELINE_PARALLEL_RANKS = list(self._ranks["pipeline"])


# --------------------------------------------------------------------------- pipeline pieces


class PipelineLoss:
    """Last-stage loss: the objective's loss on the pipeline's output; keeps mse/vb sums for logging.

    labels = (x_start, noise, t): the objective recomputes x_t from them exactly as the first stage did,
    and takes the model output from the pipeline instead of calling a model.
    """

    def __init__(self, objective):
        self.objective = objective
        self.reset()

    def reset(self):
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss, mse, vb
        self.count = 0

    def __call__(self, output, labels):
        x_start, noise, t = labels
        out = self.objective.training_losses(lambda *a, **k: output, x_start, t, noise=noise)
        loss = out["loss"].float().mean()
        self.sums += torch.stack([loss.detach(), out["mse"].float().mean().detach(),
                                  out["vb"].float().mean().detach()]).double().cpu()
        self.count += 1
        return loss


def model_input(objective, x_start, t, noise) -> torch.Tensor:
    """The x_t the objective feeds its model (diffusion q_sample, flow interpolant), computed by running the
    objective with a model that records its input: one code path for both objectives, no duplicated maths."""
    seen = {}

    def capture(x_t, *args, **kwargs):
        seen["x"] = x_t
        return torch.zeros(x_t.shape[0], x_t.shape[1] * 2, *x_t.shape[2:], dtype=x_t.dtype, device=x_t.device)

    with torch.no_grad():
        try:
            objective.training_losses(capture, x_start, t, noise=noise)
        except Exception:
            if "x" not in seen:
                raise
    return seen["x"].detach()


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class DiTPipelineModule(PipelineModule):
        """PipelineModule with layer boundaries chosen by models.parallel.pipeline.partition_bounds."""

        def __init__(self, layers, bounds, **kwargs):
            self._dit_bounds = list(bounds)
            super().__init__(layers, **kwargs)

        def _partition_layers(self, method="uniform"):
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = list(self._dit_bounds)
            if self.global_rank == 0:
                print(f"[parallelize] pipeline layer bounds {self.parts} (embed=0, blocks 1..{len(self._layer_specs) - 2}, "
                      f"final={len(self._layer_specs) - 1})", flush=True)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

        def set_input_size(self, input_size, interpolate: bool = False) -> None:
            """Progressive resolution: the stage holding the embedder switches its position table."""
            from models.parallel.pipeline import EmbedLayer

            for layer in self.forward_funcs:
                if isinstance(layer, EmbedLayer):
                    layer.set_input_size(input_size, interpolate)

    return DiTPipelineModule


# --------------------------------------------------------------------------- layout-aware EMA


class ParallelEMA(EMA):
    """EMA of this rank's slice, saved and gathered under official DiT names.

    ``name_map``: local parameter name -> official name; ``split``: official name -> how tensor ranks
    split it (models/parallel/tensor.py). Every rank saves its own file, so resume needs no collective.
    """

    def __init__(self, module, decay, name_map: dict, split: dict, layout: dict):
        super().__init__(module, decay)
        self.official = [name_map[n] for n in self.names]
        self.split = {n: split[n] for n in self.official if n in split}
        self.layout = layout
        self.sharded = False

    mismatch_hint = " (was the checkpoint written under another parallel layout?)"

    @property
    def saved_names(self) -> list[str]:
        return self.official

    def local_state(self) -> dict:
        return {**super().local_state(), "layout": self.layout, "split": self.split}

    def full_tensors(self) -> dict:
        """Collective: rank 0 gets the merged official state dict, the others an empty dict."""
        return gather_full_state(self.local_state())


def gather_full_state(local: dict) -> dict:
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    if dist.get_world_size() > 1:
        dist.gather_object({**local, "tensors": {k: v.cpu() for k, v in local["tensors"].items()}}, parts, dst=0)
    else:
        parts = [local]
    return merge_states(parts) if dist.get_rank() == 0 else {}


def merge_states(parts: list[dict]) -> dict:
    """Per-rank {layout, split, tensors} (official names) of one layout -> one full official state dict.

    Replicated tensors (same name on several ranks) are taken once; tensor-parallel slices are merged in
    tensor-rank order; pipeline stages and expert-parallel ranks hold disjoint names.
    """
    from models.parallel.tensor import merge_tensor_slices

    by_name: dict = {}
    how: dict = {}
    for p in parts:
        lay = p.get("layout", {})
        for name, value in p["tensors"].items():
            key = (lay.get("pipe", 0), lay.get("tensor", 0))
            by_name.setdefault(name, {}).setdefault(key, value)  # data-parallel copies: keep the first
            if name in p.get("split", {}):
                how[name] = p["split"][name]
    out = {}
    for name, slices in by_name.items():
        if name in how:
            ordered = [v for (_, tr), v in sorted(slices.items(), key=lambda kv: kv[0][1])]
            out[name] = merge_tensor_slices(ordered, how[name]).clone()
        else:
            out[name] = next(iter(slices.values())).clone()
    return out


# --------------------------------------------------------------------------- the engine


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

    def make_ema(self, decay: float) -> EMA:
        module = self.engine.module
        if not self.model_parallel:
            return EMA(module, decay)
        return ParallelEMA(module, decay, self.name_map, self.split, self.layout())

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
        """Checkpoint hook (every rank): data-rank-0 ranks write their weight slices for export."""
        if self.model_parallel and self.coords.data == 0:
            torch.save(self.local_weights(), os.path.join(tmp_path, f"model_rank{dist.get_rank():05d}.pt"))


def _tp_name_map(module) -> dict:
    return {n: n for n, _ in module.named_parameters()}


def initialize_engine(**kwargs):
    """``deepspeed.initialize``, then drop ZeRO's redundant fp32 master clone (trainer/zero_master.py).

    Every engine of the trainer (and the benchmarks that measure it) is built here.
    """
    import deepspeed

    from trainer.zero_master import alias_fp32_master_partitions

    engine, optimizer, loader, scheduler = deepspeed.initialize(**kwargs)
    freed = alias_fp32_master_partitions(optimizer)
    if freed and dist.get_rank() == 0:
        print(f"[trainer] ZeRO fp32 master partitions share the weights' memory: {freed / 2**20:.1f} MiB freed "
              "on rank 0", flush=True)
    return engine, optimizer, loader, scheduler


def build_engine(model, *, arch: dict, topo: Topology, ds: dict, objective, param_groups: Callable,
                 lr_scheduler: Callable, grad_checkpoint: int = 0, pipeline_partition: str = "parameters",
                 rank: Optional[int] = None) -> ParallelEngine:
    """``model``: the full plain DiT, built with the run seed on every rank. Collective."""
    rank = dist.get_rank() if rank is None else rank
    coords = topo.coords(rank)
    ds = dict(ds)
    moe_layers = 0
    mpu = None
    split: dict = {}
    loss = None

    if "moe" in arch:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        from models.parallel.moe import moe_name_map, use_deepspeed_moe

        moe_layers = use_deepspeed_moe(model, topo.expert, coords.expert)
        groups = param_groups(model)
        for i, g in enumerate(groups):
            g.setdefault("name", f"group{i}")
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        engine, optimizer, _, scheduler = initialize_engine(model=model, model_parameters=groups, config=ds,
                                                               lr_scheduler=lr_scheduler)
        num_local = arch["moe"]["num_experts"] // topo.expert
        name_map = moe_name_map([n for n, _ in engine.module.named_parameters()], num_local, coords.expert)
        return ParallelEngine(engine, optimizer, scheduler, topo, coords, False, name_map, {}, moe_layers)

    if topo.tensor == 1 and topo.pipeline == 1:
        engine, optimizer, _, scheduler = initialize_engine(model=model, model_parameters=param_groups(model),
                                                               config=ds, lr_scheduler=lr_scheduler)
        return ParallelEngine(engine, optimizer, scheduler, topo, coords, False, _tp_name_map(engine.module))

    mpu = ModelParallelUnit(topo, rank)
    mpu.install_fairscale()
    if topo.tensor > 1:
        from models.parallel.tensor import tensor_parallelize

        split = tensor_parallelize(model, coords.tensor, topo.tensor)

    if topo.pipeline == 1:
        engine, optimizer, _, scheduler = initialize_engine(model=model, model_parameters=param_groups(model),
                                                               config=ds, mpu=mpu, lr_scheduler=lr_scheduler)
        return ParallelEngine(engine, optimizer, scheduler, topo, coords, False, _tp_name_map(engine.module), split,
                              mpu=mpu)

    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from models.parallel.pipeline import (DiTSource, dit_layer_specs, layer_parameter_counts, partition_bounds,
                                          pipeline_name_map)

    bounds = partition_bounds(layer_parameter_counts(model), topo.pipeline, pipeline_partition)
    source = DiTSource(model)
    loss = PipelineLoss(objective)
    module = _pipeline_module_class()(
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
    name_map = pipeline_name_map([n for n, _ in module.named_parameters()], arch["depth"])
    return ParallelEngine(engine, optimizer, scheduler, topo, coords, True, name_map, split, 0, loss, mpu)


# --------------------------------------------------------------------------- memory accounting


def state_bytes(engine) -> dict:
    """This rank's bytes of parameters (module) and optimizer state (incl. ZeRO's fp32 partitions)."""
    seen = set()
    params = 0
    param_storages = set()
    for p in engine.module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
            param_storages.add(p.untyped_storage().data_ptr())
    opt = 0
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                opt += v.numel() * v.element_size()
    # ZeRO-1/2's fp32 master partitions: extra memory only where they are not aliased to the parameters
    # (trainer/zero_master.py aliases them in fp32 / bf16-autocast runs)
    for flat in getattr(optimizer, "single_partition_of_fp32_groups", None) or []:
        if torch.is_tensor(flat) and flat.untyped_storage().data_ptr() not in param_storages:
            opt += flat.numel() * flat.element_size()
    return {"param_bytes": params, "optim_bytes": opt, "total_bytes": params + opt}
