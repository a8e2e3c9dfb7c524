"""The planner's outputs: trainer overrides, the ZeRO-only DeepSpeed JSON, plan.json and the ranking table."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from cluster.plan import Candidate, Request, ds_config_for



def overrides_for(req: Request, c: Candidate) -> list[str]:
    lines = [
        f"model.name={req.model}",
        f"data.resolution={req.resolution}",
        f"train.global_batch={req.global_batch}",
        f"train.micro_batch={c.micro_batch}",
        f"train.precision={req.precision}",
        f"model.grad_checkpoint={c.grad_checkpoint}",
        f"parallel.tensor={c.tensor}",
        f"parallel.pipeline={c.pipeline}",
        f"parallel.expert={c.expert}",
    ]
    if req.moe_experts:
        lines += [f"model.moe.num_experts={req.moe_experts}", f"model.moe.top_k={req.moe_top_k}",
                  f"model.moe.every={req.moe_every}"]
    return lines


def write_outputs(req: Request, result: dict, out_dir: str) -> dict:
    best: Candidate = result["fitting"][0]
    os.makedirs(out_dir, exist_ok=True)
    paths = {"overrides": os.path.join(out_dir, "overrides.txt"), "ds_config": os.path.join(out_dir, "ds_config.json"),
             "plan": os.path.join(out_dir, "plan.json")}
    counts = result["params"]
    dense_per_rank = (counts["trainable"] - counts["expert"]) / (best.tensor * best.pipeline)
    with open(paths["overrides"], "w") as f:
        f.write(f"# cluster/plan.py: {best.name()} — est. {best.time['total']:.3f} s/step, "
                f"{best.memory['total']:.1f} GiB/GPU\n")
        f.write(f"# use: deepspeed trainer/main.py --ds_config {paths['ds_config']} --config <run>.yaml "
                f"$(grep -v '^#' {paths['overrides']})\n")
        f.write("\n".join(overrides_for(req, best)) + "\n")
    with open(paths["ds_config"], "w") as f:
        json.dump(ds_config_for(best.zero, best.offload, dense_per_rank), f, indent=2)
    with open(paths["plan"], "w") as f:
        json.dump({"request": result["request"], "params": result["params"], "chosen": asdict(best),
                   "ranking": [asdict(c) for c in result["fitting"][:50]]}, f, indent=1)
    return paths


def format_table(req: Request, result: dict, top: int) -> str:
    p = result["params"]
    experts = f" ({p['expert'] / 1e6:.1f} M in experts)" if p["expert"] else ""
    lines = [
        f"{req.model} at {req.resolution} px: {p['tokens']} tokens, {p['trainable'] / 1e6:.1f} M trainable params"
        f"{experts}, "
        f"{p['flops_per_sample'] / 1e9:.0f} GFLOP/sample (train); {req.gpus} GPUs × {req.gpu_mem:g} GiB "
        f"({req.gpus_per_node}/node), global batch {req.global_batch}, {req.precision}, peak {req.peak_tflops:g} "
        f"TFLOP/s × MFU {req.mfu:g}",
        f"{result['candidates']} valid layouts, {len(result['fitting'])} fit "
        f"(usable {req.gpu_mem - req.reserve_gib:g} GiB/GPU after {req.reserve_gib:g} GiB reserve)",
        "",
        f"{'#':>3} {'layout':<58}{'param':>6}{'grad':>6}{'optim':>6}{'zbuf':>6}{'ema':>6}{'act':>7}{'total':>7}"
        f"{'host':>6}{'step s':>8}{'comp':>7}{'comm':>7}{'smp/s':>8}",
    ]
    for i, c in enumerate(result["fitting"][:top]):
        m, t = c.memory, c.time
        comm = t["total"] - t["compute"]
        lines.append(f"{i + 1:>3} {c.name():<58}{m['params']:>6.1f}{m['grads']:>6.1f}{m['optim']:>6.1f}"
                     f"{m['zero_buffers']:>6.1f}{m['ema']:>6.1f}{m['activations'] + m['autocast_cache']:>7.1f}{m['total']:>7.1f}"
                     f"{m['host']:>6.1f}{t['total']:>8.3f}{t['compute']:>7.3f}{comm:>7.3f}{t['samples_per_sec']:>8.0f}")
    best = result["fitting"][0]
    ck = [c for c in result["fitting"] if (c.zero, c.offload, c.tensor, c.pipeline, c.expert, c.micro_batch)
          == (best.zero, best.offload, best.tensor, best.pipeline, best.expert, best.micro_batch)]
    lines += ["", "memory in GiB per GPU; act = saved activations × micro-batch (+ one recomputed block with "
                  "checkpointing, + bf16 autocast weight copies); zbuf = ZeRO buckets; ema = the trainer's fp32 EMA",
              f"activations per sample: {best.memory['activations_per_sample']:.3f} GiB with checkpointing "
              f"{'on' if best.grad_checkpoint else 'off'}"]
    for other in ck:
        if other.grad_checkpoint != best.grad_checkpoint:
            lines.append(f"  (checkpointing {'on' if other.grad_checkpoint else 'off'}: "
                         f"{other.memory['activations_per_sample']:.3f} GiB per sample)")
    lines.append(f"chosen: {best.name()}")
    return "\n".join(lines)
