"""Side-by-side train-step throughput: our DiT vs diffusers' DiTTransformer2DModel, same config and weights.

One train step = forward + MSE loss against a target + backward + AdamW step, at latent 32x32, batch 8,
in fp32 and under bf16 autocast (fp32 master weights). Steps of the two models are interleaved after a
warmup and the median is reported, so drifting machine speed hits both alike. MFU is model FLOPs
(models/flops.py, 3x forward per training sample) over the matmul peak measured in the same run.

    python benchmarks/bench_model_step.py                      # DiT-S/2
    python benchmarks/bench_model_step.py --model DiT-B/2 --repeats 6
    python benchmarks/bench_model_step.py --compile             # + both models with per-block torch.compile

Both models step torch's fused AdamW (the trainer's default, train.fused_adamw).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DiTArgs  # noqa: E402
from models.convert import align_diffusers_timestep_embedding, diffusers_config, official_to_diffusers  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device = torch.device("cpu"), repeats: int = 10) -> float:
    """Best-of-``repeats`` square matmul rate: the denominator of MFU (2048² on CPU, 8192² on a GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def build_pair(name: str, input_size: int, args: DiTArgs | None = None):
    """Our DiT (the preset ``name``, or ``args``) and diffusers' DiTTransformer2DModel holding the same weights."""
    torch.manual_seed(0)
    ours = (args or DiTArgs.from_preset(name, input_size=input_size)).build()
    with torch.no_grad():  # nonzero adaLN/head so both models compute a real function
        for key, p in ours.named_parameters():
            if key != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel(**diffusers_config(ours.config))
    theirs.load_state_dict(official_to_diffusers(ours.state_dict(), ours.config), strict=True)
    align_diffusers_timestep_embedding(theirs)
    return ours.train(), theirs.train()


class TrainStep:
    """A closure that runs one optimizer step of a model on fixed inputs."""

    def __init__(self, model, is_diffusers: bool, batch, precision: str):
        self.model = model
        self.is_diffusers = is_diffusers
        self.x, self.t, self.y, self.target = batch
        # the trainer's default optimizer (train.fused_adamw): torch's one-pass AdamW, the same for both models
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        self.precision = precision

    def __call__(self) -> float:
        device_type = self.x.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        with autocast:
            out = self.model(self.x, self.t, self.y)
            if self.is_diffusers:
                out = out.sample
            loss = torch.nn.functional.mse_loss(out.float(), self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also waits for a GPU to finish the step


def time_steps(steps: dict[str, TrainStep], warmup: int, repeats: int) -> dict[str, list[float]]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda[:k]")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models with every transformer block torch.compile'd (train.compile)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_model_step_<model>.json)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:  # fp32 matmuls as fp32 (no TF32), so "fp32" means the same on both kinds of device
        torch.backends.cuda.matmul.allow_tf32 = False

    peaks = {"fp32": matmul_peak_gflops(torch.float32, device), "bf16": matmul_peak_gflops(torch.bfloat16, device)}
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"matmul peak ({device}, {where}): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    ours, theirs = (m.to(device) for m in build_pair(args.model, args.input_size))
    models = {"ours": (ours, False), "diffusers": (theirs, True)}
    if args.compile:  # separate copies with the same weights; per-block compile for both (trainer/engine/compile.py)
        ours_c, theirs_c = (m.to(device) for m in build_pair(args.model, args.input_size))
        for block in list(ours_c.blocks) + list(theirs_c.transformer_blocks):
            block.compile()
        models.update({"ours+compile": (ours_c, False), "diffusers+compile": (theirs_c, True)})
    flops = ours.flops_per_sample(train=True)
    g = torch.Generator().manual_seed(0)
    n, c, s = args.batch, ours.in_channels, args.input_size
    batch = tuple(v.to(device) for v in (
        torch.randn(n, c, s, s, generator=g), torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, 1000, (n,), generator=g), torch.randn(n, ours.out_channels, s, s, generator=g)))

    rows = []
    for precision in args.precisions.split(","):
        steps = {name: TrainStep(model, is_diffusers, batch, precision) for name, (model, is_diffusers) in models.items()}
        times = time_steps(steps, args.warmup, args.repeats)
        medians = {name: statistics.median(v) for name, v in times.items()}
        for name in steps:
            sps = n / medians[name]
            rows.append(dict(model=args.model, impl=name, precision=precision, step_s=medians[name],
                             samples_per_s=sps, mfu=flops * sps / (peaks[precision] * 1e9),
                             all_step_s=times[name]))
        pairs = [("ours", "diffusers")]
        if args.compile:
            pairs += [("ours+compile", "diffusers+compile"), ("ours+compile", "ours")]
        for fast, slow in pairs:
            # adjacent steps see the same machine load: the median of their ratios is the most load-robust
            # comparison on a shared machine
            paired = statistics.median(d / o for o, d in zip(times[fast], times[slow]))
            best = min(times[slow]) / min(times[fast])
            rows.append(dict(model=args.model, impl=f"ratio {fast}/{slow}", precision=precision,
                             speedup=medians[slow] / medians[fast], speedup_paired=paired, speedup_best=best))

    print(f"\n{args.model} train step, latent {s}x{s}, batch {n}, {flops / 3 / 1e9:.2f} GFLOP fwd/sample, "
          f"{args.repeats} interleaved repeats (median)")
    print(f"{'precision':<10}{'impl':<34}{'step s':>9}{'samples/s':>11}{'MFU':>8}")
    for row in rows:
        if "speedup" in row:
            print(f"{row['precision']:<10}{row['impl']:<34}{row['speedup']:>9.3f}x  (speed ratio of medians; "
                  f"paired median {row['speedup_paired']:.3f}x, best-of {row['speedup_best']:.3f}x)")
        else:
            print(f"{row['precision']:<10}{row['impl']:<34}{row['step_s']:>9.3f}{row['samples_per_s']:>11.2f}"
                  f"{100 * row['mfu']:>7.1f}%")

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"bench_model_step_{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        benchmark="bench_model_step", model=args.model, input_size=s, batch=n, threads=args.threads,
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        train_flops_per_sample=flops, peak_gflops=peaks, rows=rows, torch=torch.__version__,
        machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        command=" ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    ), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
