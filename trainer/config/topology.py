"""The parallel layout of a run: how the world is split into tensor, pipeline, expert and data groups.

One validated object derives every size from (world, tensor, pipeline, expert) so that the config
check, the engine builder and the planner agree; an invalid layout fails here, before any worker
allocates memory, with a message that says what to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message says what to change."""


@dataclass(frozen=True)
class Topology:
    world: int
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1

    @property
    def data(self) -> int:
        """Data-parallel size: ranks that see different data."""
        return self.world // (self.tensor * self.pipeline)

    def validate(
        self,
        *,
        zero_stage: int = 0,
        num_heads: Optional[int] = None,
        hidden_size: Optional[int] = None,
        depth: Optional[int] = None,
        num_experts: int = 0,
    ) -> "Topology":
        for name in ("world", "tensor", "pipeline", "expert"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name if name != 'world' else 'world size'} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tensor * self.pipeline
        if self.world % model_parallel:
            raise LayoutError(
                f"world size {self.world} is not divisible by parallel.tensor × parallel.pipeline = "
                f"{self.tensor} × {self.pipeline} = {model_parallel}; use a world size that is a multiple of {model_parallel} "
                f"or lower parallel.tensor/parallel.pipeline"
            )
        if self.pipeline > 1 and zero_stage > 1:
            raise LayoutError(
                f"ZeRO stage {zero_stage} cannot be combined with parallel.pipeline={self.pipeline}: DeepSpeed's pipeline "
                f"engine accepts ZeRO-0/1 only; use --ds_config zero1.json or parallel.pipeline=1"
            )
        if self.tensor > 1 and num_heads is not None and num_heads % self.tensor:
            raise LayoutError(
                f"model num_heads={num_heads} is not divisible by parallel.tensor={self.tensor}; "
                f"choose a tensor size that divides the head count"
            )
        if self.tensor > 1 and hidden_size is not None and hidden_size % self.tensor:
            raise LayoutError(
                f"model hidden_size={hidden_size} is not divisible by parallel.tensor={self.tensor}"
            )
        if depth is not None and self.pipeline > depth:
            raise LayoutError(
                f"parallel.pipeline={self.pipeline} stages exceed the model depth {depth}; use at most {depth} stages"
            )
        if num_experts > 0 and (self.tensor > 1 or self.pipeline > 1):
            raise LayoutError(
                f"an MoE model (model.moe.num_experts={num_experts}) runs with data and expert parallelism only; "
                f"set parallel.tensor=1 and parallel.pipeline=1 (got tensor {self.tensor}, pipeline {self.pipeline}), "
                f"or model.moe.num_experts=0"
            )
        if zero_stage > 2 and (self.tensor > 1 or num_experts > 0):
            raise LayoutError(
                f"ZeRO stage {zero_stage} is not supported with "
                + (f"parallel.tensor={self.tensor}" if self.tensor > 1 else f"MoE (model.moe.num_experts={num_experts})")
                + "; use --ds_config zero1.json or zero2.json"
            )
        if self.expert > 1:
            if num_experts <= 0:
                raise LayoutError(
                    f"parallel.expert={self.expert} needs an MoE model; set model.moe.num_experts > 0 or parallel.expert=1"
                )
            if num_experts % self.expert:
                raise LayoutError(
                    f"model.moe.num_experts={num_experts} is not divisible by parallel.expert={self.expert}"
                )
            if self.data % self.expert:
                raise LayoutError(
                    f"parallel.expert={self.expert} must divide the data-parallel size {self.data} "
                    f"(world {self.world} / (tensor {self.tensor} × pipeline {self.pipeline}))"
                )
        return self

    # ------------------------------------------------------------------ rank coordinates and groups
    # Ranks are laid out like DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model; model
    # fastest): rank = pipe · (data · tensor) + data · tensor + tensor_rank. The pipeline engine builds its
    # grid in this order, so the tensor/data groups derived here are the ones it uses too.

    def coords(self, rank: int) -> "Coords":
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside world {self.world}")
        data = self.data
        return Coords(pipe=rank // (data * self.tensor), data=(rank // self.tensor) % data, tensor=rank % self.tensor,
                      expert=((rank // self.tensor) % data) % self.expert)

    def rank_of(self, pipe: int = 0, data: int = 0, tensor: int = 0) -> int:
        return pipe * self.data * self.tensor + data * self.tensor + tensor

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind, as sorted rank lists (the same on every rank).

        tensor: ranks sharing (pipe, data); pipeline: sharing (data, tensor); data: sharing (pipe, tensor);
        model: sharing data (all stages and tensor slices of one replica); expert: consecutive data ranks
        (expert-parallel groups, as DeepSpeed's MoE builds them when tensor = pipeline = 1).
        """
        p, d, t = self.pipeline, self.data, self.tensor
        if kind == "tensor":
            return [[self.rank_of(i, j, k) for k in range(t)] for i in range(p) for j in range(d)]
        if kind == "pipeline":
            return [[self.rank_of(i, j, k) for i in range(p)] for j in range(d) for k in range(t)]
        if kind == "data":
            return [[self.rank_of(i, j, k) for j in range(d)] for i in range(p) for k in range(t)]
        if kind == "model":
            return [sorted(self.rank_of(i, j, k) for i in range(p) for k in range(t)) for j in range(d)]
        if kind == "expert":
            return [[self.rank_of(0, j, 0) for j in range(g, g + self.expert)] for g in range(0, d, self.expert)]
        raise ValueError(f"unknown group kind {kind!r}; expected tensor, pipeline, data, model or expert")

    def group_of(self, kind: str, rank: int) -> list[int]:
        for g in self.groups(kind):
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is in no {kind} group")

    def describe(self) -> str:
        return (f"world {self.world} = data {self.data} × tensor {self.tensor} × pipeline {self.pipeline}"
                + (f", expert {self.expert}" if self.expert > 1 else ""))


@dataclass(frozen=True)
class Coords:
    pipe: int
    data: int
    tensor: int
    expert: int = 0
