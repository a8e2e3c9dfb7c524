"""DiT-XL/2 train steps on one GPU: ours vs diffusers' DiTTransformer2DModel, eager and per-block compiled, bf16,
each at the largest batch that fits; writes the record benchmarks/gpu_check.sh commits.

    python benchmarks/bench_gpu_step.py --out benchmarks/results/gpu_H100_2026-01-01.json
    python benchmarks/bench_gpu_step.py --dry-run --out /tmp/gpu_dryrun.json      # CPU, tiny shapes, same code

One step = forward + MSE loss + backward + fused AdamW step under bf16 autocast over fp32 weights
(benchmarks/bench_model_step.py's TrainStep: the two models share weights and a config). The variants run one
after the other (both models and their Adam states do not fit beside each other at large batches); a GPU's
speed does not drift the way a shared CPU's does. The batch is the largest power of two the memory model
(cluster/memory_model.py: 18 bytes per parameter + saved activations) allows, halved while the step runs out
of memory; the compiled variant reuses the eager batch of its model. MFU = model FLOPs (models/flops.py, 3×
forward) × samples/s ÷ the device's dense bf16 peak (trainer/monitor/telemetry.py's table), also given against
an 8192² bf16 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model_step import TrainStep, build_pair as build_model_pair  # noqa: E402

GiB = 2 ** 30


def environment(device: torch.device) -> dict:
    """Device, driver and library versions for the record."""
    import deepspeed
    import diffusers

    env = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "deepspeed": deepspeed.__version__,
           "diffusers": diffusers.__version__, "python": platform.python_version(), "host": platform.node(),
           "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, memory_gib=props.total_memory / GiB,
                   capability=list(torch.cuda.get_device_capability(device)), cudnn=torch.backends.cudnn.version(),
                   device_count=torch.cuda.device_count())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["driver"] = f"nvidia-smi unavailable: {exc}"
    else:
        env.update(device_name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def tests_summary(junit: str | None) -> dict:
    """Pass / fail / skip per test from pytest's junit XML (benchmarks/gpu_check.sh's device-test step)."""
    if not junit or not os.path.exists(junit):
        return {"ran": False}
    cases = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = child.tag
            elif child.tag == "skipped":
                outcome = f"skipped: {child.get('message', '')}"
        cases[name] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    return {"ran": True, "cases": cases, "failed": sum(c["outcome"] in ("failure", "error") for c in cases.values())}


TINY = dict(patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=1000)  # the dry run's DiT


def build_pair(model_name: str, input_size: int, tiny: bool = False):
    """(ours, diffusers' DiTTransformer2DModel) with the same config and weights (non-zero adaLN and head, so both
    compute a real function), on the host: bench_model_step.build_pair, with the dry run's tiny shapes."""
    from models import DiTArgs

    return build_model_pair(model_name, input_size, DiTArgs(input_size=input_size, **TINY) if tiny else None)


def matmul_peak_tflops(device: torch.device, n: int, repeats: int) -> float:
    """Best-of-``repeats`` n × n bf16 matmul rate in TFLOP/s: MFU's second denominator."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def max_batch_estimate(model_name: str, resolution: int, device: torch.device, cap: int) -> int:
    """Largest power of two whose model states + bf16 activations fit in the GPU's memory (4 GiB kept free)."""
    if device.type != "cuda":
        return cap
    from cluster.memory_model import activation_bytes_per_sample, count_params, dit_kwargs

    counts = count_params(dit_kwargs(model_name, resolution))
    states = 18 * counts["trainable"]  # fp32 weights, grads, Adam m and v; bf16 weight copies of autocast
    per_sample = activation_bytes_per_sample(counts, "bf16")["total"]
    free = torch.cuda.get_device_properties(device).total_memory - 4 * GiB - states
    batch = 1
    while batch * 2 * per_sample <= free and batch * 2 <= cap:
        batch *= 2
    return batch


def _batch(n: int, channels: int, out_channels: int, size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    return tuple(v.to(device) for v in (
        torch.randn(n, channels, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, 1000, (n,), generator=g), torch.randn(n, out_channels, size, size, generator=g)))


def time_variant(model, is_diffusers: bool, batch_size: int, input_size: int, device, warmup: int, repeats: int,
                 fixed_batch: bool) -> tuple[int, list[float]]:
    """(batch used, step seconds): the batch halves on out-of-memory unless ``fixed_batch``."""
    while True:
        step = None
        try:
            step = TrainStep(model, is_diffusers, _batch(batch_size, model_in(model), model_out(model), input_size,
                                                         device), "bf16")
            for _ in range(warmup):
                step()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()  # ends with loss.item(): the GPU has finished the step
                times.append(time.perf_counter() - start)
            return batch_size, times
        except torch.OutOfMemoryError:
            for p in model.parameters():  # a step that died in backward leaves gradients behind
                p.grad = None
            if fixed_batch or batch_size == 1:
                raise
        finally:
            del step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch_size //= 2
        print(f"  out of memory: retrying at batch {batch_size}", flush=True)


def model_in(model) -> int:
    return model.config.in_channels if hasattr(model.config, "in_channels") else model.in_channels


def model_out(model) -> int:
    return getattr(model, "out_channels", None) or model.config.out_channels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--budget-seconds", type=float, default=300.0,
                    help="stop starting new variants after this long (the rest are recorded as skipped)")
    ap.add_argument("--tests-junit", default=None, help="pytest junit XML of the device tests, summarised in the record")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, a 2-block DiT (hidden 64) at 64 px, batch 2, one warm-up and two timed steps, eager only")
    ap.add_argument("--out", default=None, help="the record to write (JSON)")
    ap.add_argument("--markdown", default=None, metavar="RECORD",
                    help="print docs/performance.md's GPU table rows from a record this script wrote, and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    if not args.out:
        ap.error("--out is required (or --markdown RECORD)")
    if args.dry_run:
        device = torch.device("cpu")
        args.model, args.resolutions, args.warmup, args.repeats, args.max_batch = "tiny", [64], 1, 2, 2
        args.no_compile = True
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run to walk the script on CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    from trainer.monitor.telemetry import gpu_peak_tflops

    env = environment(device)
    table_peak = gpu_peak_tflops(env["device_name"], "bf16") if device.type == "cuda" else None
    measured_peak = matmul_peak_tflops(device, 256 if args.dry_run else 8192, 3 if args.dry_run else 10)
    print(f"{env['device_name']}: bf16 peak {table_peak} TFLOP/s (table), {measured_peak:.3g} TFLOP/s (measured matmul)")
    rows, started, failed = [], time.time(), 0
    for res in args.resolutions:
        size = res // 8
        batches = {}
        variants = [("ours", False), ("diffusers", False)] + ([] if args.no_compile else
                                                               [("ours", True), ("diffusers", True)])
        sources = dict(zip(("ours", "diffusers"), build_pair(args.model, size, tiny=args.dry_run)))  # same weights
        flops = float(sources["ours"].flops_per_sample(train=True))  # diffusers' copy: same shapes, same FLOPs
        for impl, compiled in variants:
            if time.time() - started > args.budget_seconds:
                rows.append(dict(resolution=res, impl=impl, compiled=compiled, skipped="time budget spent"))
                print(f"{res:>4} px {impl:<10}{' compiled' if compiled else ' eager   '} skipped: time budget spent")
                continue
            model = copy.deepcopy(sources[impl]).to(device)
            if compiled:
                for block in (model.blocks if impl == "ours" else model.transformer_blocks):
                    block.compile()
            start_batch = batches.get(impl) or max_batch_estimate(args.model, res, device, args.max_batch)
            t0 = time.time()
            try:
                batch, times = time_variant(model, impl == "diffusers", start_batch, size, device, args.warmup,
                                            args.repeats, fixed_batch=compiled)
            except Exception as exc:  # noqa: BLE001  (an unattended run records the failure and goes on)
                failed += 1
                rows.append(dict(resolution=res, impl=impl, compiled=compiled,
                                 skipped=f"failed: {type(exc).__name__}: {str(exc)[:300]}"))
                print(f"{res:>4} px {impl:<10} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                del model
                gc.collect()
                continue
            batches[impl] = batch
            step_s = statistics.median(times)
            sps = batch / step_s
            row = dict(resolution=res, impl=impl, compiled=compiled, batch=batch, step_s=step_s, samples_per_s=sps,
                       tflops=flops * sps / 1e12, train_flops_per_sample=flops, all_step_s=times,
                       mfu_table=flops * sps / (table_peak * 1e12) if table_peak else None,
                       mfu_measured=flops * sps / (measured_peak * 1e12), seconds=time.time() - t0)
            if device.type == "cuda":
                row["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
            print(f"{res:>4} px {impl:<10}{' compiled' if compiled else ' eager   '} batch {batch:>4}  "
                  f"{sps:9.1f} samples/s  {row['tflops']:7.1f} TFLOP/s  MFU "
                  f"{100 * (row['mfu_table'] or row['mfu_measured']):5.1f} %", flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ratios = []
    for res in args.resolutions:
        for compiled in (False, True):
            pair = {r["impl"]: r for r in rows if r["resolution"] == res and r["compiled"] == compiled and "step_s" in r}
            if len(pair) == 2:
                ratios.append(dict(resolution=res, compiled=compiled,
                                   ours_over_diffusers=pair["ours"]["samples_per_s"] / pair["diffusers"]["samples_per_s"]))
    record = dict(benchmark="gpu_check", dry_run=args.dry_run, model=args.model, precision="bf16",
                  date=datetime.datetime.now().isoformat(timespec="seconds"), environment=env,
                  peak_tflops_table=table_peak, peak_tflops_measured=measured_peak, rows=rows, ratios=ratios,
                  compile="skipped (dry run)" if args.dry_run else ("off" if args.no_compile else "per block"),
                  device_tests=tests_summary(args.tests_junit), timing_seconds=time.time() - started,
                  command=" ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 1 if failed else 0


def markdown_table(record: dict) -> str:
    """The rows of docs/performance.md's GPU table, from one record (so the document is filled, not retyped)."""
    env = record["environment"]
    lines = [f"<!-- {record['date']}: {env.get('device_name')} · driver {env.get('driver', '-')} · torch {env['torch']} "
             f"(CUDA {env.get('cuda_build')}) · diffusers {env['diffusers']} · {record['command']} -->",
             "| px | implementation | compiled | batch | samples/s | TFLOP/s | MFU (table peak) | MFU (measured matmul) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['resolution']} | {r['impl']} | {'yes' if r['compiled'] else 'no'} | "
                         f"skipped: {r['skipped']} | | | | |")
            continue
        table = f"{100 * r['mfu_table']:.1f} %" if r.get("mfu_table") else "-"
        lines.append(f"| {r['resolution']} | {r['impl']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | "
                     f"{r['samples_per_s']:.1f} | {r['tflops']:.1f} | {table} | {100 * r['mfu_measured']:.1f} % |")
    for q in record["ratios"]:
        lines.append(f"| {q['resolution']} | ours ÷ diffusers | {'yes' if q['compiled'] else 'no'} | | "
                     f"{q['ours_over_diffusers']:.2f}× | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
