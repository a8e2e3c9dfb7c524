"""The real Trainer on one GPU against the bare train step: what the loop around the model costs, and how often it
makes the host wait for the GPU, counted by CUDA itself.

    python benchmarks/bench_gpu_trainer.py --bare benchmarks/results/gpu_NVIDIA_H200_<date>.json \
        --out benchmarks/results/gpu_trainer_NVIDIA_H200_<date>.json
    python benchmarks/bench_gpu_trainer.py --dry-run --out /tmp/gpu_trainer_dryrun.json   # CPU, tiny model, 64 px

Each variant (per-block compiled, eager) is one process that builds the Trainer exactly as trainer/main.py does
(configs/tiny.yaml with DiT-XL/2 at 256 px, bf16, ZeRO-2, one micro-batch of 256 per step, latent shards written
by the demo pipeline with its patch-PCA codec) and trains ``--steps`` steps, logging every 10. Throughput is the
wall time between the starts of steps 11 and ``steps - 9``, log steps included: right after a log step, whose
loss read waits for the GPU, so the window is the GPU's time, not the host's queueing. bench_gpu_step.py's record
(``--bare``) gives the same model's bare step (forward + loss + backward + fused AdamW at the same batch) for the
ratio. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising call warn; each warning is
attributed to the innermost frame outside torch (this repository, DeepSpeed, other) and to its optimizer step.
The dry run walks the same code on CPU with a 2-block model (no CUDA, so no synchronisations to count).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HERE = os.path.abspath(__file__)
SYNC_WARNING = "called a synchronizing CUDA operation"
LOG_EVERY = 10


def overrides(args, data_root: str, run_dir: str, compiled: bool) -> list[str]:
    model = ["model.name=custom", "model.hidden_size=64", "model.depth=2", "model.num_heads=4"] if args.dry_run \
        else [f"model.name={args.model}", "model.hidden_size=null", "model.depth=null", "model.num_heads=null",
              "model.patch_size=null"]  # the preset's architecture, not tiny.yaml's
    return model + [
        f"data.root={data_root}", f"data.resolution={args.resolution}", f"data.num_workers={args.workers}",
        "data.shuffle_buffer=1000", f"run.dir={run_dir}", f"train.max_steps={args.steps}",
        f"train.global_batch={args.batch}", f"train.micro_batch={args.batch}",
        f"train.precision={'fp32' if args.dry_run else 'bf16'}", f"train.compile={str(compiled).lower()}",
        "train.lr=1e-4", "train.warmup_steps=0", "train.ema_decay=0.9999", f"log.every={LOG_EVERY}",
        "log.stall_minutes=0", f"checkpoint.every={args.steps}", "checkpoint.keep_last=1", "sample.steps=2",
        "sample.per_class=1"]


# --------------------------------------------------------------------------- one variant, in its own process

class SyncRecorder:
    """Collects CUDA's synchronisation warnings as (step, origin, site), attributed by tests/host_syncs.py's rule
    (origin "trainer" = this repository, "deepspeed" or "other"), so the CPU and the CUDA counts read alike."""

    def __init__(self):
        self.step = 0
        self.records: list[tuple[int, str, str]] = []
        self._show = warnings.showwarning
        # frames to look past: this file (the step wrapper) and the warnings machinery that calls showwarning
        machinery = warnings._showwarnmsg.__code__.co_filename if hasattr(warnings, "_showwarnmsg") else warnings.__file__
        self._skip = (HERE, os.path.abspath(machinery))

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            from tests.host_syncs import frame_origin

            self.records.append((self.step, *frame_origin(sys._getframe(1), self._skip)))
            return
        self._show(message, category, filename, lineno, file, line)

    def __enter__(self):
        import torch

        warnings.filterwarnings("always", message=SYNC_WARNING)
        warnings.showwarning = self.showwarning
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show


def run_variant(args) -> int:
    import torch

    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.config.schema import load_config
    from trainer.config.validate import validate_run
    from trainer.engine.device import configure_matmul_precision
    from trainer.engine.distributed import free_port, init_distributed
    from trainer.loop.trainer import Trainer
    from trainer.rundir import read_metrics

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    compiled = args.worker == "compiled"
    run_dir = os.path.join(args.work, f"run_{args.worker}")
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), overrides(args, args.data_root, run_dir, compiled))
    ds_raw = load_ds_config("zero2.json")
    stages, shard_sets, topo = validate_run(cfg, ds_raw, 1)
    on_cuda = torch.cuda.is_available()
    ds = fill_ds_config(ds_raw, cfg, global_batch=stages[0].global_batch, micro_batch=stages[0].micro_batch,
                        data_parallel=topo.data, on_cuda=on_cuda)
    device = init_distributed()
    math = configure_matmul_precision(cfg.train.precision, cfg.train.tf32, device)
    trainer = Trainer(cfg, ds, stages, shard_sets, topo, device)
    t0 = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - t0
    starts: dict[int, float] = {}
    recorder = SyncRecorder() if on_cuda else None
    step_fn = trainer._train_step

    def timed_step(*a, **k):
        step = trainer.state.step + 1
        starts[step] = time.perf_counter()
        if recorder is not None:
            recorder.step = step
        return step_fn(*a, **k)

    trainer._train_step = timed_step
    t0 = time.perf_counter()
    if recorder is not None:
        with recorder:
            code = trainer.train()
    else:
        code = trainer.train()
    train_s = time.perf_counter() - t0
    if trainer.lease is not None:
        trainer.lease.release()
    first, last = LOG_EVERY + 1, args.steps - LOG_EVERY + 1  # both right after a log step's loss read
    durations = [starts[s + 1] - starts[s] for s in range(2, args.steps) if s + 1 in starts]
    result = {
        "variant": args.worker, "exit_code": code, "math": math, "device": str(device), "setup_s": setup_s,
        "train_s": train_s, "first_step_s": starts[2] - starts[1] if 2 in starts else None,
        "window": [first, last], "window_steps": last - first,
        "window_step_s": (starts[last] - starts[first]) / (last - first),
        "median_step_s": statistics.median(durations), "step_s": durations,
        "trainer_records": [{k: r.get(k) for k in ("step", "loss", "samples_per_sec", "step_time", "mfu",
                                                   "tflops_per_device", "mem_max_allocated_gb")}
                            for r in read_metrics(run_dir) if "loss" in r],
    }
    result["samples_per_s"] = args.batch / result["window_step_s"]
    if recorder is not None:
        log_steps = {s for s in range(1, args.steps + 1) if s % LOG_EVERY == 0}
        steady = [s for s in range(2, args.steps) if s not in log_steps]  # not the first (compiles) nor the last (saves)
        per_step = {s: Counter(o for st, o, _ in recorder.records if st == s) for s in range(1, args.steps + 1)}
        result["syncs"] = {
            "per_step": {s: dict(c) for s, c in per_step.items()},
            "steady_steps_max": {o: max(per_step[s].get(o, 0) for s in steady)
                                 for o in ("trainer", "deepspeed", "other")},
            "log_steps_max": {o: max(per_step[s].get(o, 0) for s in log_steps if s < args.steps)
                              for o in ("trainer", "deepspeed", "other")},
            "sites_steady": dict(Counter(f"{o}: {site}" for st, o, site in recorder.records if st in steady)),
            "sites_log_steps": dict(Counter(f"{o}: {site}" for st, o, site in recorder.records
                                            if st in log_steps and st < args.steps)),
        }
    with open(os.path.join(args.work, f"{args.worker}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0 if code == 0 else 1


# --------------------------------------------------------------------------- the driver

def bare_step(record_path: str | None, resolution: int, compiled: bool, batch: int) -> dict | None:
    if not record_path:
        return None
    for row in json.loads(Path(record_path).read_text())["rows"]:
        if row.get("impl") == "ours" and row["resolution"] == resolution and row["compiled"] == compiled \
                and row.get("batch") == batch:
            return {"samples_per_s": row["samples_per_s"], "step_s": row["step_s"], "mfu_table": row.get("mfu_table")}
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256, help="samples per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--samples-per-class", type=int, default=600, help="demo latents per class (8 classes)")
    ap.add_argument("--workers", type=int, default=4, help="data.num_workers")
    ap.add_argument("--variants", nargs="+", default=["compiled", "eager"], choices=["compiled", "eager"])
    ap.add_argument("--bare", default=None, help="bench_gpu_step.py's record (gpu_check.sh) for the ratio")
    ap.add_argument("--variant-timeout", type=float, default=300.0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, 2-block model, 64 px, batch 8, 24 steps, eager")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--data-root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.model, args.resolution, args.batch, args.steps, args.samples_per_class = "tiny", 64, 8, 24, 20
        args.workers, args.variants = 0, ["eager"]
    if args.worker:
        return run_variant(args)

    import torch

    from data_pipeline.demo_data import build_demo_data

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run to walk the script on CPU)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bench_gpu_trainer_")
    started = time.time()
    try:
        data_root = os.path.join(work, "data")
        t0 = time.time()
        build_demo_data(data_root, resolutions=(args.resolution,), samples_per_class=args.samples_per_class,
                        vae="pca", val_fraction=None)
        data_s = time.time() - t0
        print(f"latent shards: {8 * args.samples_per_class} samples at {args.resolution} px in {data_s:.1f} s",
              flush=True)
        variants = {}
        for name in args.variants:
            cmd = [sys.executable, HERE, "--worker", name, "--work", work, "--data-root", data_root,
                   "--out", args.out, "--model", args.model, "--resolution", str(args.resolution),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--workers", str(args.workers)]
            if args.dry_run:
                cmd.append("--dry-run")
            env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                       WANDB_MODE="disabled")
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.variant_timeout)
                failed = proc.returncode != 0
                tail = (proc.stdout[-1500:] + proc.stderr[-3000:]) if failed else ""
            except subprocess.TimeoutExpired as exc:
                failed, tail = True, f"timed out after {args.variant_timeout} s: {str(exc.stderr or '')[-3000:]}"
            part = os.path.join(work, f"{name}.json")
            if failed or not os.path.exists(part):
                variants[name] = {"failed": tail}
                print(f"{name}: failed\n{tail}", flush=True)
                shutil.rmtree(os.path.join(work, f"run_{name}"), ignore_errors=True)
                continue
            result = json.loads(Path(part).read_text())
            bare = bare_step(args.bare, args.resolution, name == "compiled", args.batch)
            if bare:
                result["bare_step"] = bare
                result["trainer_over_bare"] = result["samples_per_s"] / bare["samples_per_s"]
            variants[name] = result
            shutil.rmtree(os.path.join(work, f"run_{name}"), ignore_errors=True)  # its checkpoint: GBs
            syncs = result.get("syncs", {})
            print(f"{name}: {result['samples_per_s']:.1f} samples/s over steps {result['window'][0]}-"
                  f"{result['window'][1]} (median step {result['median_step_s']:.3f} s)"
                  + (f", {100 * result['trainer_over_bare']:.1f} % of the bare step" if bare else "")
                  + (f"; syncs per steady step {syncs['steady_steps_max']}, per log step {syncs['log_steps_max']}"
                     if syncs else ""), flush=True)
        import deepspeed

        record = dict(benchmark="gpu_trainer", dry_run=args.dry_run, model=args.model, resolution=args.resolution,
                      batch=args.batch, steps=args.steps, date=datetime.datetime.now().isoformat(timespec="seconds"),
                      torch=torch.__version__, deepspeed=deepspeed.__version__,
                      device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      data_seconds=data_s, total_seconds=time.time() - started, variants=variants,
                      command=" ".join(["benchmarks/bench_gpu_trainer.py"] + list(argv if argv is not None
                                                                                    else sys.argv[1:])))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(f"wrote {out}")
        return 1 if any("failed" in v for v in variants.values()) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
