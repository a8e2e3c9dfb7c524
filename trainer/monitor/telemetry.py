"""Metric computations for monitoring: MFU, peak FLOP/s, memory, ETA, loss by timestep quartile, MoE load.

The training loop only calls into this module; the arithmetic lives here so that it can be tested
without a training run.

MFU (model FLOPs utilisation), per device::

    model FLOPs per sample  F = model.flops_per_sample(train=True)   (models/flops.py: 3 x forward,
                                                                        2 FLOPs per multiply-add)
    achieved FLOP/s per device = F * samples_per_sec / world_size
    MFU = achieved FLOP/s per device / peak FLOP/s per device

Samples skipped by a non-finite step still count (the work was done). Peak FLOP/s come from
``log.peak_tflops`` when set; otherwise from ``GPU_PEAK_TFLOPS`` (dense, no sparsity) by
``torch.cuda.get_device_name``; on CPU from a short matmul measured at start-up with the rank's
own thread count (so MFU on CPU is relative to what this process can actually get from a GEMM).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Optional

import torch

# Dense peak TFLOP/s per device: (bf16/fp16 tensor core, TF32 tensor core or None without TF32, plain fp32).
# Sources: NVIDIA/AMD data sheets (SXM/OAM parts; PCIe parts are lower and matched first). Which column
# applies is the math the matmuls run in (trainer/engine/device.py ``math_mode``): an fp32 run with
# ``train.tf32`` on an Ampere+ GPU is measured against the TF32 peak, without it against the fp32 one.
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.0, 494.0, 67.0)),
    ("H200", (989.0, 494.0, 67.0)),
    ("H800", (989.0, 494.0, 67.0)),
    ("GH200", (989.0, 494.0, 67.0)),
    ("B200", (2250.0, 1100.0, 80.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("RTX 4090", (165.0, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("V100", (125.0, None, 15.7)),
    ("T4", (65.0, None, 8.1)),
    ("MI300X", (1307.0, 654.0, 163.4)),
    ("MI250X", (383.0, None, 95.7)),
]
MATH_MODES = ("bf16", "fp16", "tf32", "fp32")


def gpu_peak_tflops(name: str, math: str) -> Optional[float]:
    """Table lookup by device name (first matching entry) for the math in effect ('bf16', 'fp16', 'tf32',
    'fp32'; a precision name 'fp32' means plain fp32); None for an unknown device. 'tf32' on a GPU without
    TF32 units is its fp32 peak (the switch does nothing there)."""
    if math not in MATH_MODES:
        raise ValueError(f"unknown math mode {math!r}; expected one of {MATH_MODES}")
    for key, (half, tf32, single) in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            if math in ("bf16", "fp16"):
                return half
            return tf32 if math == "tf32" and tf32 is not None else single
    return None


def measure_matmul_tflops(precision: str = "fp32", n: int = 512, min_seconds: float = 0.2,
                          device: torch.device | str = "cpu") -> float:
    """Measured n x n matmul throughput in TFLOP/s (2 n^3 FLOPs per product), best of a few timings.
    fp32 ('fp32' or 'tf32') runs with torch's TF32 switches as they are now, i.e. as the model's matmuls do."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    best, reps, spent = 0.0, 1, 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n ** 3 * reps / max(dt, 1e-9) / 1e12)
        reps *= 2
    return best


def peak_tflops(configured: float, device: torch.device, math: str) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from) for the math the matmuls run in (``math_mode``)."""
    if configured and configured > 0:
        return float(configured), "config log.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak_tflops(name, math)
        if found is not None:
            return found, f"table ({name}, {math})"
        return measure_matmul_tflops(math, n=4096, device=device), f"measured {math} matmul on {name}"
    return measure_matmul_tflops(math), f"measured {math} matmul on CPU, {torch.get_num_threads()} threads"


def mfu(flops_per_sample: float, samples_per_sec: float, world_size: int, peak_tflops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1] (see the module docstring)."""
    if peak_tflops_per_device <= 0 or world_size <= 0:
        return float("nan")
    return flops_per_sample * samples_per_sec / world_size / (peak_tflops_per_device * 1e12)


def memory_stats(device: torch.device) -> dict:
    """GPU: allocated / reserved / peak allocated (GB). CPU: resident set size now and peak (GB)."""
    out = {}
    if device.type == "cuda":
        out["mem_allocated_gb"] = torch.cuda.memory_allocated(device) / 2 ** 30
        out["mem_reserved_gb"] = torch.cuda.memory_reserved(device) / 2 ** 30
        out["mem_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    out["rss_gb"] = current_rss_bytes() / 2 ** 30
    out["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30  # ru_maxrss is KiB
    return out


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def eta_seconds(step: int, total_steps: int, seconds_per_step: float) -> float:
    if seconds_per_step <= 0 or not seconds_per_step == seconds_per_step:
        return float("nan")
    return max(0, total_steps - step) * seconds_per_step


# --------------------------------------------------------------------------- loss by timestep quartile
QUARTILES = 4


def timestep_range(objective) -> float:
    """Upper end of the training timestep range: T for discrete diffusion (t in 0..T-1), 1 for flow (t in [0, 1])."""
    return float(getattr(objective, "num_timesteps", 1.0))


def timestep_bin_sums(t: torch.Tensor, per_sample_loss: torch.Tensor, t_max: float, bins: int = QUARTILES) -> torch.Tensor:
    """(2 * bins,) float64 on t's device: per-bin sum of losses, then per-bin counts. Bin k holds t in
    [k, k+1) * t_max / bins. Computed where the step ran, so accumulating it never waits for the GPU."""
    t = t.detach().double().reshape(-1)  # (N,)
    loss = per_sample_loss.detach().double().reshape(-1)  # (N,), on t's device (both come from the step)
    idx = torch.clamp((t / t_max * bins).floor().long(), 0, bins - 1)
    sums = torch.zeros(bins, dtype=torch.float64, device=t.device).index_add_(0, idx, loss)
    counts = torch.zeros(bins, dtype=torch.float64, device=t.device).index_add_(0, idx, torch.ones_like(loss))
    return torch.cat([sums, counts])


def quartile_means(sums_counts: torch.Tensor, bins: int = QUARTILES) -> dict:
    """{'loss_q0': ..., 'loss_q3': ...} (q0 = the least noisy quarter of timesteps); NaN for an empty bin."""
    sums, counts = sums_counts[:bins], sums_counts[bins:]
    return {f"loss_q{k}": (float(sums[k] / counts[k]) if counts[k] > 0 else float("nan")) for k in range(bins)}


# --------------------------------------------------------------------------- MoE
def moe_summary(stats: list[dict]) -> dict:
    """Expert load over the MoE blocks of the last forward: share of routed tokens per expert (mean over
    blocks), max load / mean load (1 = perfectly balanced), dropped-token share and balance loss (means)."""
    if not stats:
        return {}
    loads = []
    for s in stats:
        c = torch.as_tensor(s["expert_counts"], dtype=torch.float64)
        loads.append(c / c.sum().clamp_min(1.0))
    load = torch.stack(loads).mean(0)
    out = {f"moe_load_e{i}": float(v) for i, v in enumerate(load)}
    out["moe_max_load"] = float(max(float(ld.max()) * len(ld) for ld in loads))
    out["moe_drop_rate"] = sum(float(s["dropped_fraction"]) for s in stats) / len(stats)
    out["moe_balance_loss"] = sum(float(s["balance_loss"]) for s in stats) / len(stats)
    return out


# --------------------------------------------------------------------------- step-time split
class PhaseTimer:
    """Seconds per step spent in forward, backward, optimizer step and the loop's own collectives.

    ``sync`` is the host time in the trainer's explicit collectives (NaN agreement, metric reduction), measured
    every step. ZeRO's gradient reduce-scatter runs inside backward and its parameter all-gather inside the
    optimizer step, so those are part of ``bwd_time`` / ``opt_time``; set ``wall_clock_breakdown`` in the
    DeepSpeed JSON for DeepSpeed's own finer split.

    On CUDA the phases are timed with CUDA events, recorded on the steps ``active()`` names (the log steps) and
    read when the record is taken, so timing never makes the host wait for the GPU on other steps (a
    ``torch.cuda.synchronize`` around each phase would drain the queue three times per micro-step). The
    reported fwd/bwd/opt times are those of the timed steps. On CPU, where reading the clock costs nothing,
    every step is timed.

    ``active()`` returns the number of the step being run when it is to be timed, else None.
    """

    PHASES = ("fwd", "bwd", "opt", "sync")

    def __init__(self, device: torch.device, active=None):
        self.cuda = device.type == "cuda"
        self.active = active if (active is not None and self.cuda) else (lambda: -1)
        self.totals = {p: 0.0 for p in self.PHASES}
        self._pending: list = []  # (phase, start event, end event), CUDA
        self._timed_steps: set = set()
        self._t0 = None

    def start(self) -> None:
        step = self.active()
        if step is None:
            self._t0 = None
            return
        self._timed_steps.add(step)
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self._t0 is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((phase, self._t0, end))
        else:
            self.totals[phase] += time.perf_counter() - self._t0
        self._t0 = None

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def take(self, steps: int) -> dict:
        """Per-step means since the last call; reads the CUDA events (one wait, on the log step)."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for phase, start, end in self._pending:
                self.totals[phase] += start.elapsed_time(end) / 1000.0
        timed = len(self._timed_steps) if self.cuda else steps
        out = {f"{p}_time": v / max(steps if p == "sync" else timed, 1) for p, v in self.totals.items()}
        self.totals = {p: 0.0 for p in self.PHASES}
        self._pending, self._timed_steps = [], set()
        return out
