"""Pipeline-parallel pieces: the last stage's loss and the ``PipelineModule`` with the DiT's layer bounds.

The loss is computed on the last stage; labels = (x_start, noise, t), so the objective recomputes its
target exactly as the first stage built its input (``objective.model_inputs``), and takes the model output
from the pipeline instead of calling a model. A step is ``engine.train_batch`` (trainer/loop/pipeline_step.py).
"""
from __future__ import annotations

import torch


class PipelineLoss:
    """Last-stage loss: the objective's loss on the pipeline's output; keeps mse/vb sums for logging.

    labels = (x_start, noise, t): the objective recomputes x_t from them exactly as the first stage did,
    and takes the model output from the pipeline instead of calling a model.
    """

    def __init__(self, objective):
        self.objective = objective
        self.reset()

    def reset(self):
        self.sums = None  # (3,) float64 loss, mse, vb sums, on the loss's device (no host copy per micro-batch)
        self.count = 0

    def __call__(self, output, labels):
        x_start, noise, t = labels
        out = self.objective.training_losses(lambda *a, **k: output, x_start, t, noise=noise)
        loss = out["loss"].float().mean()
        parts = torch.stack([loss.detach(), out["mse"].float().mean().detach(),
                             out["vb"].float().mean().detach()]).double()  # (3,)
        self.sums = parts if self.sums is None else self.sums + parts
        self.count += 1
        return loss


def pipeline_module_class():
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
