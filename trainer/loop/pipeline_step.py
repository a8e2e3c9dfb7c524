"""One optimizer step under pipeline parallelism: ``engine.train_batch`` over the step's micro-batches.

DeepSpeed's pipeline engine pulls ``gradient_accumulation_steps`` items from the iterator on the first
stage (inputs) and on the last stage (labels); each item is ((x_t, t, y, force_drop), (x_start, noise, t)).
Noise, timesteps and label dropout come from ``Trainer.step_randomness`` (a generator of seed, data-parallel
rank, step and micro-step), the same call the non-pipeline micro-step makes, so PP = 2 equals one process. Both stages
that read data derive the same numbers from the same loader position; middle stages never read.

The loss is computed on the last stage (trainer/engine/pipeline.py's PipelineLoss) and broadcast over the
pipeline group, so every rank returns this data-parallel replica's loss/mse/vb and the loop's
cross-rank mean (and metrics.jsonl on rank 0) is the last stage's number.
"""
from __future__ import annotations

import torch
import torch.distributed as dist



def micro_batches(trainer, it, gas: int):
    for micro in range(gas):
        x, y = trainer.next_batch(it)
        t, noise, drop = trainer.step_randomness(x.shape, micro)
        x_t, t_model = trainer.objective.model_inputs(x, t, noise)
        yield (x_t, t_model, y, drop), (x, noise, t)


def train_batch(trainer, it, gas: int) -> dict:
    par = trainer.par
    engine = par.engine
    par.loss.reset()
    engine.train_batch(data_iter=micro_batches(trainer, it, gas))
    grid = engine.grid
    last = grid.stage_to_global(grid.pipe_parallel_size - 1)
    if grid.is_last_stage and par.loss.sums is not None:
        values = (par.loss.sums / max(par.loss.count, 1)).float().to(trainer.device)  # (3,) loss, mse, vb
    else:
        values = torch.zeros(3, dtype=torch.float32, device=trainer.device)
    if grid.pipe_parallel_size > 1:
        dist.broadcast(values, src=last, group=grid.get_pipe_parallel_group())
    loss, mse, vb = values.unbind()  # stay on the device: read on log steps only
    return {"loss": loss, "mse": mse, "vb": vb}
