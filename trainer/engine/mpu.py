"""The ``mpu`` DeepSpeed asks for, with process groups derived from ``Topology``.

fairscale's ``initialize_model_parallel`` is not used: its rank order (data, pipe, model) differs from
DeepSpeed's pipeline grid (pipe, data, model) once pipeline > 1. The groups are built here from
``Topology`` (DeepSpeed's order) and installed into fairscale's module globals, so fairscale's layers,
DeepSpeed's engine and the data loader agree on who is in which group.
"""
from __future__ import annotations

import torch.distributed as dist

from trainer.config.topology import Coords, Topology


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
