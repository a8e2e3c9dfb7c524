"""The training loop's monitoring companion: one object the loop calls at a few points.

    setup     Monitor(trainer).start()          peak FLOP/s, watchdog thread, 'started' event
    micro     inject_fault / nonfinite / timesteps / timer.start+stop
    step      begin_step() ... end_step() -> skipped?   (NaN counting, scheduler realignment, heartbeat)
    log       fields(stage) -> extra metrics (collective: every rank calls it), after_log(record)
    end       close(state) / error(exc)

The maths is in trainer/monitor/telemetry.py; NaN agreement in nan_guard.py, spikes in spikes.py, the heartbeat
in watchdog.py, test hooks in faults.py.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

from trainer.engine.device import math_mode
from trainer.monitor import telemetry
from trainer.monitor.faults import fault_nan_steps
from trainer.monitor.nan_guard import NanGuard
from trainer.monitor.spikes import LossSpikeDetector
from trainer.monitor.watchdog import Watchdog

__all__ = ["Monitor"]


class Monitor:
    def __init__(self, trainer):
        self.tr = trainer
        cfg = trainer.cfg
        self.logging = trainer._is_logging_rank()
        self.device = trainer.device
        self.timer = telemetry.PhaseTimer(trainer.device, active=self._log_step_running)
        self.nan = NanGuard(cfg.train.max_nan_steps, trainer.device)
        self.fault_steps = fault_nan_steps()
        self.t_max = telemetry.timestep_range(trainer.objective)
        # loss sums by timestep quartile, kept on the device and read on log steps only
        self.qsums = torch.zeros(2 * telemetry.QUARTILES, dtype=torch.float64, device=trainer.device)
        self.spike = LossSpikeDetector(cfg.log.spike_factor)
        self.step_skipped = False
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
    def inject_fault(self, loss: torch.Tensor, micro: int) -> torch.Tensor:
        if self.fault_steps and micro == 0 and self.tr.rank == 0 and self.tr.state.step + 1 in self.fault_steps:
            return loss + float("nan")
        return loss

    def nonfinite(self, total: torch.Tensor) -> bool:
        """Collective. True when this step has to be skipped (its loss is NaN/Inf on some rank)."""
        t0 = time.perf_counter()
        if self.nan.any_nonfinite(total):
            self.step_skipped = True
        self.timer.add("sync", time.perf_counter() - t0)
        return self.step_skipped

    def timesteps(self, t: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        if per_sample_loss.ndim == 0 or per_sample_loss.shape[0] != t.shape[0]:
            return
        if not self.step_skipped:
            self.qsums += telemetry.timestep_bin_sums(t, per_sample_loss.float(), self.t_max)

    def _log_step_running(self):
        """The number of the step being run if the loop will log it (CUDA phase timing runs then), else None."""
        tr = self.tr
        step = tr.state.step + 1  # the loop counts a step when it ends
        if step % tr.cfg.log.every == 0 or any(step == st.end_step for st in tr.stages):
            return step
        return None

    # ------------------------------------------------------------------ steps
    def begin_step(self) -> None:
        self.step_skipped = False

    def end_step(self) -> bool:
        """After the trainer counted the step. Returns True when the step was skipped."""
        skipped = self.step_skipped
        state = self.tr.state
        self.nan.update(skipped)
        if skipped:
            state.nan_skipped += 1
            self.skipped_since_log += 1
            sched = getattr(self.tr, "scheduler", None)
            # DeepSpeed does not step the LR scheduler when ZeRO took its own overflow path; the schedule is a
            # function of the step count, so put it back in line with the trainer's step counter.
            if sched is not None and getattr(sched, "last_step", state.step) != state.step:
                sched.load_state_dict({"last_step": state.step})
            if self.logging:
                self.tr.metrics.alert("non-finite loss", f"step {state.step}: loss is NaN/Inf; step skipped "
                                      f"({self.nan.in_row} in a row, {state.nan_skipped} in total, stop at "
                                      f"{self.nan.max_in_row})", "WARN")
        if self.watchdog is not None:
            self.watchdog.beat(state.step)
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
        skipped_samples = float(getattr(loader, "skipped_samples", 0) or 0)
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
        if not self.logging:
            return
        loss = record.get("loss")
        if isinstance(loss, float):
            median = self.spike.check(loss)
            if median is not None:
                self.tr.metrics.alert("loss spike", f"step {record.get('step')}: loss {loss:.4g} is "
                                      f"{loss / median:.1f}x the running median {median:.4g}", "WARN")

    # ------------------------------------------------------------------ end
    def nan_stop(self) -> None:
        if self.logging:
            st = self.tr.state
            msg = (f"{self.nan.in_row} non-finite steps in a row (train.max_nan_steps={self.nan.max_in_row}) at step "
                   f"{st.step}; stopped with a checkpoint of the last good weights (skipped steps change nothing)")
            self.tr.metrics.alert("stopped: non-finite loss", msg, "ERROR")
            self.tr.metrics.event({"event": "error", "step": st.step, "kind": "nan_stop", "message": msg})

    def error(self, exc: BaseException) -> None:
        if not self.logging:
            return
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            self.tr.metrics.event({"event": "error", "step": self.tr.state.step, "kind": type(exc).__name__,
                                   "message": msg[-2000:]})
            self.tr.metrics.alert("crashed", msg[-500:], "ERROR")
        except Exception:  # noqa: BLE001
            pass

    def close(self, state: str) -> None:
        if self.watchdog is not None:
            self.watchdog.stop(state)
            self.watchdog = None
