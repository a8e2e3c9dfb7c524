"""The training loop's monitoring companion: one object the loop calls at a few points.

    setup     Monitor(trainer).start()          peak FLOP/s, watchdog thread, 'started' event
    micro     inject_fault / nonfinite / timesteps / timer.start+stop
    step      begin_step() ... end_step() -> skipped?   (applied or not, NaN counting, LR position, heartbeat)
    log       fields(stage) -> extra metrics (collective: every rank calls it), after_log(record) -> spike verdict
    rollback  take_verdict() (read by trainer/loop/rollback.py), after_rollback()
    end       close(state) / error(exc)

The maths is in trainer/monitor/telemetry.py; NaN agreement and applied-step decisions in nan_guard.py, the spike
and blow-up detector in divergence.py, the heartbeat in watchdog.py, test hooks in faults.py.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist

from trainer.engine.device import math_mode
from trainer.monitor import telemetry
from trainer.monitor.divergence import DivergenceDetector, sustain_records
from trainer.monitor.faults import (FAULT_LOSS_SCALE_ENV, ActivationFault, fault_nan_steps, fault_spec, perturb_spec,
                                    perturb_weights)
from trainer.monitor.nan_guard import NanGuard, realign_lr, step_applied
from trainer.monitor.watchdog import Watchdog

__all__ = ["Monitor"]


class Monitor:
    def __init__(self, trainer):
        self.tr = trainer
        cfg = trainer.cfg
        self.logging = trainer._is_logging_rank()
        self.device = trainer.device
        self.timer = telemetry.PhaseTimer(trainer.device, active=self._log_step_running)
        self.nan = NanGuard(cfg.train.max_nan_steps)
        self.fault_steps = fault_nan_steps()
        self.activation_fault = ActivationFault.from_env(trainer.engine.module, trainer.rank)
        self.loss_scale_fault = fault_spec(FAULT_LOSS_SCALE_ENV)
        self.perturb_fault = perturb_spec()
        self.scale_loss = False
        self.t_max = telemetry.timestep_range(trainer.objective)
        # loss sums by timestep quartile, kept on the device and read on log steps only
        self.qsums = torch.zeros(2 * telemetry.QUARTILES, dtype=torch.float64, device=trainer.device)
        self.qpending = torch.zeros_like(self.qsums)  # this step's, until it is known to be applied
        self.loss_flag = None  # device bool: a micro-step of this step had a NaN/Inf loss (decide_skip reads it)
        self.detector = DivergenceDetector(cfg.log.spike_factor, cfg.log.spike_budget, cfg.log.every,
                                           sustain_records(cfg.train.blowup_steps, cfg.log.every))
        self.verdict, self.logged = None, False
        self.fp16 = cfg.train.precision == "fp16"
        self.lr_position = None
        self.step_skipped, self.nonfinite_what = False, "gradients"
        self.skipped_since_log = 0
        self._overflows_logged = 0  # fp16 overflow skips already reported
        self.sec_per_step = None  # smoothed, for the ETA
        self.peak, self.peak_source = float("nan"), "not measured"
        self.math = trainer.cfg.train.precision
        self._flops = {}
        self.watchdog = None

    def start(self) -> "Monitor":
        cfg = self.tr.cfg
        if self.logging:
            try:  # the peak of the math in effect: TF32 only when torch's switch is on (train.tf32, CUDA)
                self.math = math_mode(cfg.train.precision, self.device)
                self.peak, self.peak_source = telemetry.peak_tflops(cfg.log.peak_tflops, self.device, self.math)
            except Exception as exc:  # noqa: BLE001
                self.peak_source = f"unavailable ({exc})"
            print(f"[monitor] peak {self.peak:.3f} TFLOP/s per device ({self.peak_source})", flush=True)
            self.tr.metrics.event({"event": "started", "step": self.tr.state.step, "pid": os.getpid(),
                                   "host": socket.gethostname(),
                                   "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                                   "peak_tflops": self.peak, "peak_source": self.peak_source, "math": self.math})
            # The heartbeat is always written (status and the lease rely on it); the stall alert is optional.
            stall = cfg.log.stall_minutes * 60
            interval = cfg.log.heartbeat_seconds if stall <= 0 else min(cfg.log.heartbeat_seconds, stall / 4)
            self.watchdog = Watchdog(self.tr.run_dir, stall, interval, self.tr.metrics.alert, lease=self.tr.lease,
                                     on_lease_lost=self._lease_lost)
            self.watchdog.step = self.tr.state.step
            self.watchdog.start()
        scaling = getattr(getattr(self.tr, "par", None), "loss_scaling", None)
        if scaling is not None:  # resumed: overflow skips before the checkpoint were reported by the last run
            self._overflows_logged = scaling.stats()["overflow_steps"]
        return self

    def _lease_lost(self) -> None:
        self.tr.lease_lost = True  # read by the loop at the next step boundary (agreed across ranks there)

    # ------------------------------------------------------------------ micro-steps
    def phase(self, name: str, micro=None) -> None:
        """Start timing a phase of the micro-step and tell this rank's liveness beacon where the rank is."""
        self.timer.start()
        beacon = getattr(self.tr, "beacon", None)
        if beacon is not None:
            beacon.enter(name, micro)

    def inject_fault(self, loss: torch.Tensor, micro: int) -> torch.Tensor:
        """The loss-level test hooks (trainer/monitor/faults.py); the activation hook sits in the network."""
        if self.scale_loss:
            loss = loss * self.loss_scale_fault.factor
        if self.fault_steps and micro == 0 and self.tr.rank == 0 and self.tr.state.step + 1 in self.fault_steps:
            return loss + float("nan")
        return loss

    def note_loss(self, total: torch.Tensor) -> None:
        """Fold "this micro-step's loss is NaN/Inf" into the step's device flag: no host wait (decide_skip reads it)."""
        bad = ~torch.isfinite(total.detach()).all()
        self.loss_flag = bad if self.loss_flag is None else self.loss_flag | bad

    def decide_skip(self) -> bool:
        """Collective, at the optimizer boundary before ``engine.step``: True when the step has to be skipped (a loss
        was NaN/Inf on some rank in some micro-step). The step's one host wait outside log steps."""
        if self.loss_flag is not None:
            t0 = time.perf_counter()
            if self.nan.agree(self.loss_flag):
                self.step_skipped, self.nonfinite_what = True, "loss"
            self.timer.add("sync", time.perf_counter() - t0)
        return self.step_skipped

    def mark_nonfinite(self, what: str) -> None:
        """The pipeline step's guard found a non-finite ``what`` (loss / gradients; agreed across ranks): skip."""
        self.step_skipped, self.nonfinite_what = True, what

    def timesteps(self, t: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        if per_sample_loss.ndim == 0 or per_sample_loss.shape[0] != t.shape[0]:
            return
        if self.scale_loss:  # the loss-scale test hook scales what the quartiles see too (faults.py)
            per_sample_loss = per_sample_loss * self.loss_scale_fault.factor
        self.qpending += telemetry.timestep_bin_sums(t, per_sample_loss.float(), self.t_max)  # counted if applied

    def _log_step_running(self):
        """The number of the step being run if the loop will log it (CUDA phase timing runs then), else None."""
        tr = self.tr
        step = tr.state.step + 1  # the loop counts a step when it ends
        if step % tr.cfg.log.every == 0 or any(step == st.end_step for st in tr.stages):
            return step
        return None

    # ------------------------------------------------------------------ steps
    def begin_step(self) -> None:
        self.step_skipped, self.nonfinite_what = False, "gradients"
        self.loss_flag = None
        self.qpending.zero_()
        state, tr = self.tr.state, self.tr
        self.lr_position = getattr(getattr(tr, "scheduler", None), "last_step", None)
        batch = tr.stages[min(state.stage, len(tr.stages) - 1)].global_batch
        if self.activation_fault is not None:
            self.activation_fault.begin_step(state.step + 1, state.data_position, batch)
        self.scale_loss = (self.loss_scale_fault is not None and
                           self.loss_scale_fault.hits_step(state.step + 1, state.data_position, batch))
        if self.perturb_fault is not None:
            perturb_weights([tr.ema._local(p) for p in tr.ema.params], state.step + 1, self.perturb_fault)

    def end_step(self) -> bool:
        """After the trainer counted the step. Returns True when the step was not applied (then no EMA update).

        Applied: the loop's own non-finite check did not no-op it and DeepSpeed did not skip it
        (``engine.was_step_applied()``: NaN gradients with a finite loss, fp16 overflow). The LR schedule stays at the
        number of applied steps either way (nan_guard.py). An fp16 loss-scale overflow is routine (the scaler
        searching its scale), so it does not count towards ``train.max_nan_steps``."""
        state = self.tr.state
        own = self.step_skipped
        skipped = own or not step_applied(self.tr.engine)
        nonfinite = own or (skipped and not self.fp16)
        self.nan.update(nonfinite)
        if not skipped:  # a skipped step's losses are not in the timestep quartiles
            self.qsums += self.qpending
        if self.lr_position is not None:
            realign_lr(getattr(self.tr, "scheduler", None), self.lr_position + (0 if skipped else 1))
        if skipped:
            state.nan_skipped += 1
            self.skipped_since_log += 1
            if self.logging and nonfinite:
                loss = own and self.nonfinite_what == "loss"
                what = "loss is NaN/Inf" if loss else "gradients are NaN/Inf" + ("" if own else " (DeepSpeed skipped it)")
                self.tr.metrics.alert("non-finite loss" if loss else "non-finite gradients",
                                      f"step {state.step}: {what}; step skipped ({self.nan.in_row} in a row, "
                                      f"{state.nan_skipped} in total, act at {self.nan.max_in_row})", "WARN")
        if self.watchdog is not None:
            self.watchdog.beat(state.step)
        if getattr(self.tr, "beacon", None) is not None:
            self.tr.beacon.progress(state.step)
        return skipped

    @property
    def should_stop(self) -> bool:
        return self.nan.should_stop

    # ------------------------------------------------------------------ logging
    def flops_per_sample(self, latent_size: int) -> float:
        if latent_size not in self._flops:
            with torch.device("meta"):
                model = self.tr.arch.with_input_size(latent_size).build()
            self._flops[latent_size] = float(model.flops_per_sample(train=True))
        return self._flops[latent_size]

    def fields(self, stage, samples_per_sec: float, step_time: float, steps: int) -> dict:
        """Extra metrics for one log record. Collective (one all-reduce): every rank calls it."""
        tr = self.tr
        loader = getattr(tr, "loader", None)
        elastic = hasattr(loader, "samples_per_epoch")  # its counts describe the shard set: the same on every rank
        skipped_samples = 0.0 if elastic else float(getattr(loader, "skipped_samples", 0) or 0)
        local = torch.cat([self.qsums, torch.tensor([skipped_samples], dtype=torch.float64, device=self.device)])
        world = dist.get_world_size() if dist.is_initialized() else 1
        t0 = time.perf_counter()
        if world > 1:
            dist.all_reduce(local)
        local = local.cpu()  # the one read of the quartile sums, on the log step
        self.timer.add("sync", time.perf_counter() - t0)
        self.qsums.zero_()
        out = telemetry.quartile_means(local[:-1])
        out["data_skipped_samples"] = int(local[-1])  # summed over ranks (each data-parallel rank reads its own)
        if elastic:
            stats = loader.stats()
            out["data_skipped_samples"] = int(stats["skipped_samples"])
            out["data_short_shards"] = int(stats["short_shards"])
            out["data_missing_samples"] = int(stats["missing_samples"])
            out["samples_per_epoch"] = int(stats["samples_per_epoch"])
            position = tr.state.data_position
            out["epoch"] = position // stats["samples_per_epoch"]  # the epoch of the next sample
            out["epoch_progress"] = position / stats["samples_per_epoch"]
        out.update(self.timer.take(steps))
        out["images_per_sec"] = samples_per_sec
        out["samples_per_sec_per_device"] = samples_per_sec / world
        latent = tr.shard_sets[stage.index].latent_shape[1]
        f = self.flops_per_sample(latent)
        out["model_tflops_per_sample"] = f / 1e12
        out["tflops_per_device"] = f * samples_per_sec / world / 1e12
        out["peak_tflops"] = self.peak
        out["mfu"] = telemetry.mfu(f, samples_per_sec, world, self.peak)
        out.update(telemetry.memory_stats(self.device))
        out["skipped"] = self.skipped_since_log
        out["skipped_steps"] = tr.state.nan_skipped
        self.skipped_since_log = 0
        out.update(self.loss_scale_fields())
        self.sec_per_step = step_time if self.sec_per_step is None else 0.7 * self.sec_per_step + 0.3 * step_time
        total = tr.stages[-1].end_step
        out["total_steps"] = total
        out["progress"] = tr.state.step / max(total, 1)
        out["eta_sec"] = telemetry.eta_seconds(tr.state.step, total, self.sec_per_step)
        if tr.arch.moe is not None and hasattr(tr.model, "moe_stats"):
            try:
                out.update(telemetry.moe_summary(tr.model.moe_stats()))
            except Exception as exc:  # noqa: BLE001
                print(f"[monitor] WARNING: MoE stats unavailable: {exc}", file=sys.stderr)
        return out

    def loss_scale_fields(self) -> dict:
        """fp16: the loss scale and the optimizer steps skipped on overflow (since the last record, in total)."""
        scaling = getattr(getattr(self.tr, "par", None), "loss_scaling", None)
        if scaling is None:
            return {}
        stats = scaling.stats()
        since = stats["overflow_steps"] - self._overflows_logged
        self._overflows_logged = stats["overflow_steps"]
        return {"loss_scale": stats["loss_scale"], "overflow_skipped": since,
                "overflow_skipped_steps": stats["overflow_steps"]}

    def after_log(self, record: dict) -> None:
        """Every rank: the record's losses are all-reduced, so every rank's detector sees the same numbers (the
        rollback decision is still agreed by a collective in trainer/loop/rollback.py); the logging rank alerts."""
        self.verdict = v = self.detector.update(record)
        self.logged = True
        if v is not None and v.alert and self.logging:
            self.tr.metrics.alert("loss spike", f"step {v.step}: loss {v.statistic:.1f}x its timestep-matched baseline "
                                  f"(threshold {v.threshold:.1f}x; this record alone {v.raw:.1f}x)", "WARN")

    def take_verdict(self) -> tuple:
        """(was this step logged, its spike verdict or None), consumed once. Every rank logs the same steps."""
        out = (self.logged, self.verdict)
        self.logged, self.verdict = False, None
        return out

    def after_rollback(self) -> None:
        """The loop restored an earlier checkpoint: the streak and the excursion are over; baselines are kept."""
        self.nan.in_row = 0
        self.detector.reset_excursion()
        self.verdict, self.logged = None, False
        self.step_skipped = False
        self.skipped_since_log = 0

    # ------------------------------------------------------------------ end
    def nan_stop(self) -> None:
        if self.logging:
            st = self.tr.state
            msg = (f"{self.nan.in_row} non-finite steps in a row (train.max_nan_steps={self.nan.max_in_row}) at step "
                   f"{st.step}; stopped with a checkpoint of the last good weights (skipped steps change nothing)")
            self.tr.metrics.alert("stopped: non-finite loss", msg, "ERROR")
            self.tr.metrics.event({"event": "error", "step": st.step, "kind": "nan_stop", "message": msg})

    def error(self, exc: BaseException, published: Optional[str] = None) -> None:
        """The logging rank's record of a crash. ``published``: the job's failure verdict (the first failing rank
        named), already in events.jsonl as its one 'error' event (trainer/monitor/liveness.py): only alerted."""
        if not self.logging:
            return
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            if published is not None:
                self.tr.metrics.alert("crashed", f"first failure: {published}"[:500], "ERROR")
                return
            self.tr.metrics.event({"event": "error", "step": self.tr.state.step, "kind": type(exc).__name__,
                                   "message": msg[-2000:]})
            self.tr.metrics.alert("crashed", msg[-500:], "ERROR")
        except Exception:  # noqa: BLE001
            pass

    def close(self, state: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stop(state)
            self.watchdog = None
        beacon = getattr(self.tr, "beacon", None)
        if beacon is not None and state != "crashed":  # a crash keeps the record its failure handler wrote
            beacon.stop("done" if state == "finished" else state)
