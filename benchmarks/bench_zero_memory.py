"""Model-state memory per rank under ZeRO-1/2/3 (+ offload) on CPU ranks, vs DeepSpeed's formulas and our planner.

    python benchmarks/bench_zero_memory.py [--ranks 2 4] [--configs zero1 zero2 zero3 zero2_offload zero3_offload]
                                           [--model DiT-S/2] [--input-size 32] [--out benchmarks/results/zero_memory.json]

How the bytes a rank holds are measured (``measure_job``):
  1. Before the model is built, every live tensor storage in the process is recorded (``gc.get_objects()``).
  2. The DiT is built, handed to ``trainer.engine.parallelize.initialize_engine`` exactly as the trainer does
     (``deepspeed.initialize`` + the fp32 master aliasing of trainer/engine/zero_master.py, ``param_groups`` +
     ``optimizer_config`` from trainer/engine/optimizer.py, the JSON filled by ``trainer.config.ds_json.fill_ds_config``, fp32),
     and trained one full step, then a second forward + backward.
  3. Right after that second backward (grads and optimizer states both alive: the model-state peak) every live
     tensor storage that did not exist at (1) is summed once (de-duplicated by storage address, so views and
     flat-buffer aliases count once). Gradients held only by autograd (``p.grad`` without a Python object yet)
     are included by touching ``p.grad`` of every module parameter first. The autograd graph is freed by then,
     so no activations are counted.
  4. Each storage is given one category: ``params`` (module parameters, ZeRO-3 ``ds_tensor`` partitions),
     ``grads`` (``p.grad``, ZeRO's partitioned gradient buffers), ``optim`` (tensors in the torch optimizer's
     ``state``: Adam's exp_avg/exp_avg_sq, and the fp32 master partitions it steps), ``buffers`` (the rest:
     reduce/all-gather buckets and other DeepSpeed scratch space).
A second snapshot right after ``engine.step()`` is also recorded (gradients released).

The expected values come from ``cluster.memory_model.model_state_bytes`` (the planner's model) and from
DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` (which assume
mixed precision with 16-bit params: they are printed for reference, not expected to match an fp32 CPU run).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_results  # noqa: E402

import torch  # noqa: E402

from trainer.engine.distributed import free_port  # noqa: E402


# --------------------------------------------------------------------------- per-rank measurement


def _live_storages() -> dict[int, tuple[int, object]]:
    """data_ptr -> (nbytes, one tensor) for every tensor storage reachable by the garbage collector."""
    out = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - odd tensor subclasses
            continue
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if ptr and nbytes and ptr not in out:
            out[ptr] = (nbytes, obj)
    return out


def _ptr(t) -> int:
    try:
        return t.untyped_storage().data_ptr() if t is not None and t.numel() else 0
    except Exception:  # noqa: BLE001
        return 0


def _categorise(engine, stage: int) -> dict[int, str]:
    cats: dict[int, str] = {}

    def mark(t, cat):
        p = _ptr(t)
        if p and p not in cats:
            cats[p] = cat

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    # the weights first: a ZeRO-1/2 master partition aliased to them (trainer/engine/zero_master.py) is no extra memory
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            mark(p.ds_tensor, "params")
        mark(p, "params")
        if p.grad is not None:
            mark(p.grad, "grads")
    for state in getattr(inner, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                mark(v, "optim")
    for group in getattr(inner, "param_groups", []):
        for p in group["params"]:
            mark(p, "optim")  # fp32 master partitions stepped by the optimizer (unless aliased to the weights)
            if p.grad is not None:
                mark(p.grad, "grads")
    for name in ("grads_in_partition", "grad_partitions_flat_buffer", "averaged_gradients",
                 "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "fp32_partitioned_groups_flat",
                 "fp16_partitioned_groups_flat", "bit16_groups_flat", "single_partition_of_fp32_groups"):
        value = getattr(opt, name, None)
        cat = {"grads_in_partition": "grads", "grad_partitions_flat_buffer": "grads", "averaged_gradients": "grads",
               "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition": "grads",
               "fp32_partitioned_groups_flat": "optim", "single_partition_of_fp32_groups": "optim"}.get(name, "params")
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            for t in (item if isinstance(item, (list, tuple)) else [item]):
                if isinstance(t, torch.Tensor):
                    mark(t, cat)
    return cats


def _snapshot(engine, stage: int, baseline: set) -> dict:
    for p in engine.module.parameters():
        _ = p.grad  # materialise autograd-held grads as Python objects so gc sees them
    keep = [p.grad for p in engine.module.parameters() if p.grad is not None]
    gc.collect()
    live = _live_storages()
    cats = _categorise(engine, stage)
    out = {"params": 0, "grads": 0, "optim": 0, "buffers": 0}
    for ptr, (nbytes, _) in live.items():
        if ptr in baseline:
            continue
        out[cats.get(ptr, "buffers")] += nbytes
    for p in engine.module.parameters():  # grads with no gc-visible wrapper (kept alive in `keep`)
        pass
    del keep
    out["total"] = sum(out.values())
    return out


def measure_job(job: dict) -> dict:
    """One engine on this rank: build, train 1 step + forward/backward, snapshot; returns bytes by category."""
    from models.dit import DiT
    from trainer.config.schema import load_config
    from trainer.config.ds_json import fill_ds_config, load_ds_config
    from trainer.engine.optimizer import optimizer_config, param_groups
    from trainer.engine.parallelize import initialize_engine

    world = torch.distributed.get_world_size()
    micro = job.get("micro_batch", 2)
    cfg = load_config(None, ["train.precision=fp32", f"train.micro_batch={micro}",
                             f"train.global_batch={micro * world}", "train.grad_clip=1.0"])
    ds_raw = job["ds"] if isinstance(job.get("ds"), dict) else load_ds_config(job["ds_config"])
    ds = fill_ds_config(ds_raw, cfg, global_batch=micro * world, micro_batch=micro, data_parallel=world,
                        on_cuda=False)
    ds["optimizer"] = optimizer_config(cfg)
    if any(k in ds["zero_optimization"] for k in ("offload_optimizer", "offload_param")):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on offloaded partitions (no compiled CPU Adam)
    stage = int(ds["zero_optimization"].get("stage", 0))
    kw = dict(job["model"])
    n, c, s = micro, kw.get("in_channels", 4), kw["input_size"]
    torch.manual_seed(0)
    x, t, y = torch.randn(n, c, s, s), torch.randint(0, 1000, (n,)), torch.randint(0, kw.get("num_classes", 1000), (n,))
    gc.collect()
    baseline = set(_live_storages())
    torch.manual_seed(0)
    model = DiT(**kw)
    engine, *_ = initialize_engine(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    del model
    result = {"stage": stage}
    for step in range(2):
        out = engine(x, t, y)
        loss = out.float().square().mean()
        engine.backward(loss)
        del out, loss
        if step == 1:
            result["after_backward"] = _snapshot(engine, stage, baseline)
        engine.step()
    result["after_step"] = _snapshot(engine, stage, baseline)
    result["trainable_params"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                     for p in engine.module.parameters() if p.requires_grad)
    result["all_params"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine
    gc.collect()
    return result


def _worker(rank: int, world: int, port: int, jobs: list, queue) -> None:
    try:
        from trainer.engine.distributed import init_local_gloo_rank

        torch.set_num_threads(1)
        init_local_gloo_rank(rank, world, port)
        for i, job in enumerate(jobs):
            res = measure_job(job)
            queue.put((rank, i, res))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - report, parent raises
        queue.put((rank, -1, traceback.format_exc()))


def run_jobs(world: int, jobs: list[dict], timeout: float = 600) -> list[list[dict]]:
    """Run every job in ``world`` fresh CPU ranks (gloo); returns results[job][rank]."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, jobs, queue), daemon=True) for r in range(world)]
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    for p in procs:
        p.start()
    if env_before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    results: list[list] = [[None] * world for _ in jobs]
    deadline = time.time() + timeout
    try:
        import queue as queue_mod

        pending = world * len(jobs)
        while pending:
            if time.time() > deadline:
                raise TimeoutError(f"memory measurement on {world} ranks did not finish in {timeout:.0f} s")
            try:
                rank, i, res = queue.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died (exit codes {dead}) before reporting") from None
                continue
            if i < 0:
                raise RuntimeError(f"rank {rank} failed:\n{res}")
            results[i][rank] = res
            pending -= 1
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


# --------------------------------------------------------------------------- the benchmark


def expected(model_kwargs: dict, ds_name_or_dict, world: int) -> dict:
    import copy

    from cluster.memory_model import count_params, model_state_bytes
    from trainer.config.ds_json import apply_cpu_choices, load_ds_config

    ds = copy.deepcopy(ds_name_or_dict) if isinstance(ds_name_or_dict, dict) else load_ds_config(ds_name_or_dict)
    apply_cpu_choices(ds)  # measured on CPU ranks: the JSON as the trainer fills it there
    counts = count_params(model_kwargs)
    return model_state_bytes(counts, ds, dp=world, precision="fp32")


def deepspeed_formula(total_params: int, largest_layer: int, stage: int, world: int, offload: bool) -> int:
    """DeepSpeed's own estimate (16-bit params, mixed precision) of model-state bytes per GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer, num_gpus_per_node=world,
                                                          cpu_offload=offload, cpu_offload_params=offload)
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=world, cpu_offload=offload)
    return int(gpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--configs", nargs="+", default=["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "zero_memory.json"))
    args = ap.parse_args(argv)
    from cluster.memory_model import count_params
    from models.args import preset_kwargs

    kw = dict(preset_kwargs(args.model), input_size=args.input_size, in_channels=4, num_classes=1000)
    counts = count_params(kw)
    rows = []
    for world in args.ranks:
        jobs = [{"ds_config": f"{name}.json", "model": kw} for name in args.configs]
        started = time.time()
        results = run_jobs(world, jobs)
        print(f"[{world} ranks: {time.time() - started:.0f} s]", flush=True)
        for name, per_rank in zip(args.configs, results):
            exp = expected(kw, f"{name}.json", world)
            stage = per_rank[0]["stage"]
            ds_est = deepspeed_formula(counts["total"], counts["largest_layer"], stage, world, "offload" in name)
            meas = [r["after_backward"] for r in per_rank]
            mean_total = sum(m["total"] for m in meas) / len(meas)
            rows.append({
                "config": name, "ranks": world, "stage": stage,
                "measured_per_rank": meas, "measured_after_step_per_rank": [r["after_step"] for r in per_rank],
                "measured_total_mean": mean_total,
                "planner": exp, "planner_error": exp["total"] / mean_total - 1,
                "deepspeed_formula_16bit": ds_est,
            })
    mib = 2 ** 20
    print(f"\nmodel {args.model} latent {args.input_size}: {counts['trainable']:,} trainable params, fp32, "
          f"AdamW; bytes per rank after the 2nd backward (MiB)")
    head = f"{'config':<15}{'ranks':>6}{'params':>9}{'grads':>9}{'optim':>9}{'buffers':>9}{'measured':>10}" \
           f"{'planner':>9}{'error':>8}{'DS est*':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["measured_per_rank"][0]
        print(f"{r['config']:<15}{r['ranks']:>6}{m['params'] / mib:>9.1f}{m['grads'] / mib:>9.1f}{m['optim'] / mib:>9.1f}"
              f"{m['buffers'] / mib:>9.1f}{r['measured_total_mean'] / mib:>10.1f}{r['planner']['total'] / mib:>9.1f}"
              f"{100 * r['planner_error']:>7.1f}%{r['deepspeed_formula_16bit'] / mib:>9.1f}")
    print("* DeepSpeed's estimate_zero{2,3}_model_states_mem_needs: 16-bit params + fp32 master/Adam, device side only")
    load = os.getloadavg()
    print(f"load average {load}")
    record = {
        "command": "python benchmarks/bench_zero_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": load},
        "model": args.model, "input_size": args.input_size, "params": counts, "results": rows,
    }
    write_results(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
