"""The training loop: stages → micro-batches → DeepSpeed steps → EMA, metrics, checkpoints, samples.

The loop owns no model maths: noise, timesteps and losses come from the objective, the network from
``models``. What it owns is order and bookkeeping, so that a run stopped anywhere and resumed
produces exactly the numbers an uninterrupted run would.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from trainer import rundir
from trainer.config.model import architecture
from trainer.config.resume import layout_record
from trainer.config.schema import RunConfig, save_config
from trainer.config.shards import ShardSet
from trainer.config.stages import Stage, stage_at
from trainer.config.topology import Topology
from trainer.engine.distributed import all_reduce_max_flags, barrier, shutdown
from trainer.engine.device import to_device_async
from trainer.engine.lr_schedule import StageLRScheduler
from trainer.engine.objective import build_objective_from_config
from trainer.engine.optimizer import optimizer_config, param_groups
from trainer.loop.data import make_stream
from trainer.loop.failures import Failures
from trainer.loop.grids import ema_sample_grid
from trainer.loop.ownership import report_run_dir_events, rewind_metrics, take_run_dir
from trainer.loop.preemption import PreemptionFlag
from trainer.loop.restore import restore_checkpoint
from trainer.loop.rollback import RESTORED, Recovery
from trainer.loop.seeding import per_sample_randomness, rng_state, seed_everything, step_generator
from trainer.loop.evaluation import InTrainingEvaluation
from trainer.loop.validation import Validation
from trainer.monitor.faults import fault_pause_after_checkpoint
from trainer.monitor.metrics import Metrics, build_metrics
from trainer.monitor.monitor import Monitor
from trainer.monitor.nan_guard import optimizer_update_skipped
from trainer.rundir import EXIT_PREEMPTED, EXIT_RUN_DIR_BUSY
from trainer.state import checkpoint as ckpt
from trainer.state.lease import RunDirBusy
from trainer.state.parallel_ema import make_ema


def log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[trainer] {msg}", flush=True)


class Trainer:
    def __init__(self, cfg: RunConfig, ds: dict, stages: list[Stage], shard_sets: list[ShardSet], topo: Topology,
                 device: torch.device, takeover: bool = False):
        self.cfg, self.ds, self.stages, self.shard_sets, self.topo, self.device = cfg, ds, stages, shard_sets, topo, device
        self.rank = dist.get_rank()
        self.run_dir = cfg.run.dir
        self.ckpt_dir = rundir.checkpoints_dir(self.run_dir)
        self.state = ckpt.TrainerState()
        self.preempt = PreemptionFlag()
        self.metrics = Metrics([])
        self.last_log_time = time.time()
        self.steps_since_log = 0
        self.samples_since_log = 0
        self.data_time = 0.0
        self.takeover = takeover
        self.lease, self.lease_taken, self.lease_lost = None, None, False
        self.failures, self.beacon = None, None
        self.skipped_checkpoints: list[dict] = []

    # ------------------------------------------------------------------ set-up
    @property
    def dp_rank(self) -> int:
        return self.topo.coords(self.rank).data  # DeepSpeed's rank order (pipe, data, tensor): trainer/config/topology.py

    def _is_logging_rank(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        cfg = self.cfg
        # One writer per run directory: decided before anything is built or written (trainer/state/lease.py).
        self.lease, self.lease_taken, attempt = take_run_dir(self.run_dir, cfg.run.lease_timeout_minutes * 60,
                                                             self.takeover, self.rank)
        self.failures = Failures(self, attempt, dist.get_world_size())  # liveness record + hang watchdog, every rank
        self.beacon = self.failures.start()
        first = self.shard_sets[0]
        channels, size, _ = first.latent_shape
        self.arch = architecture(cfg, in_channels=channels, input_size=size, num_classes=first.num_classes)
        seed_everything(cfg.run.seed)
        model = self.arch.build(grad_checkpoint=cfg.model.grad_checkpoint)
        if cfg.train.compile:
            from trainer.engine.compile import compile_blocks

            log0(f"train.compile: {compile_blocks(model)} DiT blocks compiled with torch.compile (first steps compile)")
        self.objective = build_objective_from_config(cfg, self.arch.learn_sigma)
        ds = dict(self.ds)
        ds["optimizer"] = optimizer_config(cfg)
        self.ds = ds
        stages = self.stages
        schedule, min_lr = cfg.train.lr_schedule, cfg.train.min_lr
        from trainer.engine.parallelize import build_engine  # TP / PP / DeepSpeed-MoE per the topology; plain DP as before

        self.beacon.enter("engine")

        self.par = build_engine(model, arch=self.arch, topo=self.topo, ds=ds, objective=self.objective,
                                param_groups=lambda m: param_groups(m, cfg.train.weight_decay),
                                lr_scheduler=lambda opt: StageLRScheduler(opt, stages, schedule, min_lr),
                                grad_checkpoint=cfg.model.grad_checkpoint,
                                pipeline_partition=cfg.parallel.pipeline_partition)
        self.engine, self.optimizer, self.scheduler = self.par.engine, self.par.optimizer, self.par.scheduler
        self.model = self.engine.module
        self.ema = make_ema(self.par, cfg.train.ema_decay)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
            save_config(cfg, rundir.path(self.run_dir, rundir.CONFIG))
            from trainer.config.ds_json import save_ds_config

            save_ds_config(ds, rundir.path(self.run_dir, rundir.DS_CONFIG))
        barrier()
        self.beacon.enter("resume")
        self._resume_or_init()
        self.beacon.progress(self.state.step, "monitor", arm=False)
        self.metrics = self._build_metrics()
        report_run_dir_events(self.metrics, self.skipped_checkpoints, self.lease_taken, self.state.step)
        self.monitor = Monitor(self).start()  # trainer/monitor/monitor.py: MFU, NaN skipping, alerts, heartbeat
        self.recovery = Recovery(self)  # trainer/loop/rollback.py: divergence -> rollback, recorded data skips
        self.validation = Validation(self)  # trainer/loop/validation.py: held-out loss, raw and EMA, fixed t and noise
        self.evaluation = InTrainingEvaluation(self)  # trainer/loop/evaluation.py: FID of the EMA every log.eval_every

    def _build_metrics(self) -> Metrics:
        return build_metrics(self.cfg, self.run_dir, self.state, self._is_logging_rank())

    def _resume_or_init(self) -> None:
        # Newest checkpoint whose every file matches its checksum, hashed in parallel over the ranks; corrupt or
        # incomplete newer ones are skipped with the file named (and reported in events.jsonl below).
        path, self.skipped_checkpoints = ckpt.find_verified(self.ckpt_dir)
        if path is not None:
            saved = restore_checkpoint(self, path)  # trainer/loop/restore.py: the path rollbacks take too
            self.state = saved
            log0(f"resumed from {path} at step {saved.step} (stage {saved.stage})")
        elif self.cfg.checkpoint.init_from:
            src = self.cfg.checkpoint.init_from.rstrip("/")
            problem = ckpt.verify_checkpoint(src, deep=True)
            if problem:
                raise RuntimeError(f"checkpoint.init_from: {problem}")
            self.engine.load_checkpoint(os.path.dirname(src), tag=os.path.basename(src), load_module_only=True,
                                        load_optimizer_states=False, load_lr_scheduler_states=False)
            self.ema.copy_from_model()
            log0(f"initialised weights from {src} (optimizer and step start fresh)")
        self.state.model_config = self.arch.to_dict()
        if self.rank == 0:
            rewind_metrics(self.run_dir, self.state.step)

    def _stage_for_state(self, state: ckpt.TrainerState) -> Stage:
        return self.stages[min(state.stage, len(self.stages) - 1)]

    # ------------------------------------------------------------------ stages
    def _set_stage_shape(self, stage: Stage) -> None:
        """Token grid, position table and DeepSpeed batch sizes for ``stage``."""
        size = self.shard_sets[stage.index].latent_shape[1]
        if self.engine.zero_optimization_stage() == 3:
            # The pos_embed parameter is partitioned under ZeRO-3 and cannot change shape; the model then
            # computes (and caches) the table for the new grid on the fly, with the same values.
            self.model.pe_interpolate = bool(self.cfg.pe_interpolation)
        else:
            self.model.set_input_size(size, interpolate=self.cfg.pe_interpolation)
        self.arch = self.arch.with_input_size(size)
        self.state.model_config = self.arch.to_dict()
        self.engine.set_train_micro_batch_size(stage.micro_batch)
        self.engine.set_train_batch_size(stage.global_batch)

    def _enter_stage(self, stage: Stage):
        self.beacon.enter("stage")
        self._set_stage_shape(stage)
        if self.state.stage != stage.index:
            self.state.stage = stage.index
            self.state.data_batches = 0
            self.state.data_position = 0
        self.recovery.enter_stage(stage)  # LR at the stage's start at least; past recorded skip windows
        shards = self.shard_sets[stage.index]
        log0(f"stage {stage.index}: {stage.resolution} px (latent {shards.latent_shape}), steps "
             f"{stage.start_step}..{stage.end_step}, global batch {stage.global_batch}, micro {stage.micro_batch}, "
             f"data position {self.state.data_position}")
        d = self.cfg.data
        self.loader = make_stream(shards, resampled=d.resampled, global_batch=stage.global_batch,
                                  micro_batch=stage.micro_batch, dp_rank=self.dp_rank, dp_size=self.topo.data,
                                  seed=self.cfg.run.seed + 7919 * stage.index, num_workers=d.num_workers,
                                  shuffle_buffer=d.shuffle_buffer, shuffle_block=d.shuffle_block,
                                  start_position=self.state.data_position, start_batch=self.state.data_batches,
                                  pin_memory=self.device.type == "cuda")
        return iter(self.loader)

    # ------------------------------------------------------------------ one step
    def next_batch(self, it):
        """The loader's next (latents, labels), with the wait counted as data time."""
        self.beacon.enter("data")
        t0 = time.perf_counter()
        batch = next(it)
        self.data_time += time.perf_counter() - t0
        return batch

    def step_randomness(self, batch, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps (N,), noise (N, C, H, W), label-drop flags (N,)) on CPU for one micro-batch, shared by the plain
        and the pipeline step. Elastic stream: per sample, from (seed, stage, global position) — the same on any
        layout. Resampled stream: from (seed, data-parallel rank, step, micro-step)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch.latents
        positions = getattr(batch, "positions", None)
        if positions is not None:
            return per_sample_randomness(self.cfg.run.seed, self.state.stage, positions, x.shape, self.objective,
                                         self.arch.class_dropout_prob)
        shape, n = x.shape, x.shape[0]
        g = step_generator(self.cfg.run.seed, self.dp_rank, self.state.step, micro)
        t = self.objective.sample_timesteps(n, generator=g)
        noise = torch.randn(shape, generator=g)
        drop = (torch.rand(n, generator=g) < self.arch.class_dropout_prob).long()
        return t, noise, drop

    def _micro_step(self, batch, micro: int, last: bool) -> dict:
        # pinned + non_blocking on CUDA: the host never waits for the GPU here (trainer/engine/device.py)
        t, noise, drop = (to_device_async(v, self.device) for v in self.step_randomness(batch, micro))
        x, y = batch
        x = to_device_async(x, self.device)  # (N, C, H, W)
        y = to_device_async(y, self.device)  # (N,)
        timer = self.monitor.timer
        self.monitor.phase("forward", micro)
        out = self.objective.training_losses(self.engine, x, t, model_kwargs={"y": y, "force_drop_ids": drop},
                                             noise=noise)
        timer.stop("fwd")
        loss = self.monitor.inject_fault(out["loss"].float().mean(), micro)
        total = loss
        if self.arch.moe is not None:
            total = total + self.model.moe_aux_loss()  # already weighted by model.moe.aux_loss_coef
        self.monitor.note_loss(total)  # a device flag; agreed across ranks once, at the boundary (nan_guard.py)
        self.monitor.timesteps(t, out["loss"])
        self.monitor.phase("backward")
        self.engine.backward(total)  # backward/step run on a skipped step too: DeepSpeed's counters stay consistent
        timer.stop("bwd")
        self.monitor.phase("optimizer")
        skip = self.monitor.decide_skip() if last else False  # collective: the whole step is skipped on every rank
        with optimizer_update_skipped(self.engine, skip):
            self.engine.step()
        timer.stop("opt")
        return {"loss": loss.detach(), "mse": out["mse"].float().mean().detach(),
                "vb": out["vb"].float().mean().detach()}

    def _train_step(self, it, stage: Stage) -> dict:
        gas = stage.global_batch // (stage.micro_batch * self.topo.data)
        self.step_lr = self.scheduler.get_last_lr()[0]  # the lr this step trains with
        sums = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        self.monitor.begin_step()
        if self.par.pipeline:  # DeepSpeed's pipeline schedule runs all micro-batches (trainer/loop/pipeline_step.py)
            from trainer.loop.pipeline_step import train_batch

            sums = {k: v * gas for k, v in train_batch(self, it, gas).items()}
        for micro in range(0 if self.par.pipeline else gas):
            parts = self._micro_step(self.next_batch(it), micro, last=micro == gas - 1)
            for k in sums:
                sums[k] = sums[k] + parts[k]
        self.state.data_batches += gas
        self.state.data_position += stage.global_batch  # elastic: global batch k is [p0 + kG, p0 + (k+1)G)
        self.state.step += 1
        self.state.samples_seen += stage.global_batch
        skipped = self.monitor.end_step()  # a skipped (non-finite) step changed no weights: no EMA update either
        if self.state.step % self.cfg.train.ema_every == 0 and not skipped:
            self.ema.update()
        return {k: v / gas for k, v in sums.items()}

    # ------------------------------------------------------------------ bookkeeping
    def _mean_across_ranks(self, values: dict) -> dict:
        keys = sorted(values)
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).reshape(()) for k in keys]).to(self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
            t /= dist.get_world_size()
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _log(self, parts: dict, stage: Stage) -> None:
        means = self._mean_across_ranks(parts)
        now = time.time()
        elapsed = max(now - self.last_log_time, 1e-9)
        record = {
            "step": self.state.step,
            "loss": means["loss"], "mse": means["mse"], "vb": means["vb"],
            "lr": self.step_lr,
            "grad_norm": _as_float(self.engine.get_global_grad_norm()),
            "samples_per_sec": self.samples_since_log / elapsed,
            "step_time": elapsed / max(self.steps_since_log, 1),
            "data_time": self.data_time / max(self.steps_since_log, 1),
            "resolution": stage.resolution, "stage": stage.index,
            "tokens": self.arch.tokens,
            "samples_seen": self.state.samples_seen,
            "time": now,
        }
        record.update(self.monitor.fields(stage, record["samples_per_sec"], record["step_time"],
                                          self.steps_since_log))  # collective: MFU, memory, ETA, quartiles...
        self.metrics.log(record)
        self.monitor.after_log(record)
        if self.rank == 0 and (self.state.step % (self.cfg.log.every * 10) == 0 or self.state.step == 1):
            log0(f"step {self.state.step}/{self.stages[-1].end_step} loss {record['loss']:.4f} "
                 f"lr {record['lr']:.2e} {record['samples_per_sec']:.1f} samples/s")
        self.last_log_time, self.steps_since_log, self.samples_since_log, self.data_time = now, 0, 0, 0.0

    def save(self) -> str:
        stage = self.stages[min(self.state.stage, len(self.stages) - 1)]
        self.state.layout = layout_record(self.topo, self.ds, stage)  # checked before a later launch resumes it
        self.beacon.enter("checkpoint")
        path = ckpt.save_checkpoint(self.engine, self.ema, self.state, self.ckpt_dir, self.cfg.checkpoint.keep_last,
                                    rng_state(), ema_writer_ranks=self.par.ema_writer_ranks,
                                    extra_save=self.par.save_extra)
        log0(f"checkpoint {path}")
        self.beacon.progress(self.state.step, "checkpoint")
        fault_pause_after_checkpoint(self.state.step)
        return path

    def sample(self, stage: Stage, name: Optional[str] = None) -> Optional[str]:
        """EMA sample grid at the stage's resolution (collective under ZeRO-3; rank 0 samples)."""
        self.beacon.enter("sample")
        return ema_sample_grid(self, stage, name)

    # ------------------------------------------------------------------ main loop
    def train(self) -> int:
        """Returns the process exit status (0 done, EXIT_PREEMPTED checkpointed for requeue, EXIT_NAN_STOP /
        EXIT_DIVERGED stopped on a divergence: trainer/loop/rollback.py)."""
        self.last_log_time = time.time()
        while self.state.step < self.stages[-1].end_step:
            stage = stage_at(self.stages, self.state.step)
            it = self._enter_stage(stage)
            self.validation.at_start(stage)  # prints its cost; evaluates the initial weights of a fresh run
            while self.state.step < stage.end_step:
                if self.recovery.skip_due():  # a skip window recorded by a rollback begins here
                    it = self._enter_stage(stage)
                parts = self._train_step(it, stage)
                self.steps_since_log += 1
                self.samples_since_log += stage.global_batch
                step = self.state.step
                if step % self.cfg.log.every == 0 or step == stage.end_step:
                    self._log(parts, stage)
                outcome = self.recovery.after_step()  # divergence: roll back (all ranks agree) or stop
                if outcome == RESTORED:
                    break  # re-enter the restored step's stage, past the skipped data
                if outcome is not None:
                    return outcome
                self.validation.after_step(stage)
                self.evaluation.after_step(stage)
                saved = False
                if step % stage.checkpoint_every == 0 or step == stage.end_step:
                    self.save()
                    saved = True
                if stage.sample_every and step % stage.sample_every == 0 and step != self.stages[-1].end_step:
                    self.sample(stage)
                preempted, lease_lost = all_reduce_max_flags([self.preempt.requested, self.lease_lost], self.device)
                if lease_lost:  # another launch owns run.dir now: write nothing more, not even a checkpoint
                    log0(f"run directory {self.run_dir} was taken over by another launch; stopping without writing")
                    return EXIT_RUN_DIR_BUSY
                if preempted:
                    if not saved:
                        self.save()
                    log0(f"preempted ({self.preempt.signal_name or 'signal on another rank'}) at step {step}; "
                         f"checkpoint saved, exiting with {EXIT_PREEMPTED} for requeue")
                    self.metrics.alert("preempted", f"checkpointed at step {step}", "INFO")
                    self.monitor.close("preempted")
                    self.metrics.close()
                    barrier()  # no rank exits (and gets its peers killed by srun) before W&B has flushed
                    return EXIT_PREEMPTED
        self.sample(self.stages[-1], name="final.png")
        finished = {"step": self.state.step, "event": "finished"}
        if self.cfg.train.compile:
            from trainer.engine.compile import compile_report

            finished["compile"] = compile_report()
            log0(f"train.compile: {finished['compile']['graphs']} graphs compiled, "
                 f"{finished['compile']['graph_breaks']} graph breaks")
        self.metrics.event(finished)
        self.monitor.close("finished")
        self.metrics.close()
        log0(f"finished {self.state.step} steps; outputs in {os.path.abspath(self.run_dir)}")
        return 0


def _as_float(v) -> float:
    if v is None:
        return float("nan")
    return float(v.item() if hasattr(v, "item") else v)


def run_training(cfg: RunConfig, ds: dict, stages, shard_sets, topo, device, takeover: bool = False) -> int:
    trainer = Trainer(cfg, ds, stages, shard_sets, topo, device, takeover=takeover)
    try:
        try:
            trainer.setup()
        except RunDirBusy as exc:  # raised on every rank together, before anything was written
            if trainer.rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            shutdown()
            return EXIT_RUN_DIR_BUSY
        code = trainer.train()
        if trainer.lease is not None and code != EXIT_RUN_DIR_BUSY:
            trainer.lease.release()  # a clean end (finished, preempted, NaN stop): the next launch need not wait
        shutdown()  # every exit code of train() is reached by all ranks together
        return code
    except Exception as exc:
        # The first failure of the job, named from every rank's liveness record (a collective timeout ends here as a
        # hang, exit 7); then an 'error' event and alert for the status tool, then the real traceback.
        message = trainer.failures.handle(exc) if trainer.failures is not None else None
        monitor = getattr(trainer, "monitor", None)
        if monitor is not None:
            monitor.error(exc, published=message)
            monitor.close("crashed")
        if trainer.lease is not None and not trainer.lease_lost:
            trainer.lease.release()
        raise
    finally:
        trainer.preempt.restore()
        sys.stdout.flush()
