"""One optimizer step under pipeline parallelism: ``engine.train_batch`` over the step's micro-batches.

DeepSpeed's pipeline engine pulls ``gradient_accumulation_steps`` items from the iterator on the first
stage (inputs) and on the last stage (labels); each item is ((x_t, t, y, force_drop), (x_start, noise, t)).
Noise, timesteps and label dropout come from ``Trainer.step_randomness`` (per sample, from its global position),
the same call the non-pipeline micro-step makes, so PP = 2 equals one process. Both stages that read data derive
the same numbers from the same stream position; middle stages never read.

The loss is computed on the last stage (trainer/engine/pipeline.py's PipelineLoss) and broadcast over the
pipeline group, so every rank returns this data-parallel replica's loss/mse/vb and the loop's
cross-rank mean (and metrics.jsonl on rank 0) is the last stage's number.
"""
from __future__ import annotations

import torch
import torch.distributed as dist



def micro_batches(trainer, it, gas: int):
    for micro in range(gas):
        batch = trainer.next_batch(it)
        x, y = batch
        t, noise, drop = trainer.step_randomness(batch, micro)
        x_t, t_model = trainer.objective.model_inputs(x, t, noise)
        yield (x_t, t_model, y, drop), (x, noise, t)


def train_batch(trainer, it, gas: int) -> dict:
    par = trainer.par
    engine = par.engine
    par.loss.reset()
    engine.train_batch(data_iter=micro_batches(trainer, it, gas))
    grid = engine.grid
    last = grid.stage_to_global(grid.pipe_parallel_size - 1)
    if grid.is_last_stage:
        values = (par.loss.sums / max(par.loss.count, 1)).float()
    else:
        values = torch.zeros(3, dtype=torch.float32)
    values = values.to(trainer.device)
    if grid.pipe_parallel_size > 1:
        dist.broadcast(values, src=last, group=grid.get_pipe_parallel_group())
    loss, mse, vb = values.tolist()
    return {"loss": loss, "mse": mse, "vb": vb}
