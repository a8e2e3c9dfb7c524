"""One optimizer step under pipeline parallelism: ``engine.train_batch`` over the step's micro-batches.

DeepSpeed's pipeline engine pulls ``gradient_accumulation_steps`` items from the iterator on the first
stage (inputs) and on the last stage (labels); each item is ((x_t, t, y, force_drop), (x_start, noise, t)).
Noise, timesteps and label dropout come from ``Trainer.step_randomness`` (per sample, from its global position),
the same call the non-pipeline micro-step makes, so PP = 2 equals one process. Both stages that read data derive
the same numbers from the same stream position; middle stages never read.

The loss is computed on the last stage (trainer/engine/pipeline.py's PipelineLoss) and broadcast over the
pipeline group, so every rank returns this data-parallel replica's loss/mse/vb and the loop's
cross-rank mean (and metrics.jsonl on rank 0) is the last stage's number.

Non-finite steps: the pipeline engine runs forward, backward and the optimizer step inside ``train_batch``, so the
plain step's per-micro-step check (before backward) has no place to run. Instead the engine's optimizer step is
wrapped for the call: every rank checks what it holds (the last stage its loss sums, every stage its gradients),
the ranks agree with one all-reduce, and a flagged step runs with the inner optimizer's step as a no-op
(nan_guard.py) and is reported to the monitor as skipped. DeepSpeed zeroes the gradients after the step either way.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from trainer.monitor.nan_guard import local_nonfinite, optimizer_update_skipped



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
    with guarded_step(trainer):
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


@contextlib.contextmanager
def guarded_step(trainer):
    """Inside the block, the pipeline engine's optimizer step is skipped on every rank when any rank sees a
    non-finite loss or gradient (see the module docstring). ``_take_model_step`` is DeepSpeed's single entry to the
    update at the end of every ``train_batch`` schedule (all stages run it); the instance attribute shadows it."""
    engine, par = trainer.par.engine, trainer.par

    def step(*args, **kwargs):
        sums = par.loss.sums if engine.is_last_stage() else None
        flags = torch.tensor([float(f) for f in local_nonfinite(sums, engine.module.parameters())],
                             device=trainer.device)  # (2,): loss, gradients
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grads_bad = (bool(v > 0) for v in flags.tolist())
        skip = loss_bad or grads_bad
        if skip:
            trainer.monitor.mark_nonfinite("loss" if loss_bad else "gradients")
        with optimizer_update_skipped(engine, skip):
            return original(*args, **kwargs)

    original = engine._take_model_step
    engine._take_model_step = step
    try:
        yield
    finally:
        del engine._take_model_step
