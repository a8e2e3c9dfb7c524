"""Parallelism planner: which layout (ZeRO stage, TP, PP, EP, micro-batch, checkpointing) fits and runs fastest.

    python -m cluster.plan --model DiT-XL/2 --resolution 512 --gpus 64 --gpu-mem 80 [--gpus-per-node 8]
        [--global-batch 256] [--moe-experts 0] [--precision bf16] [--peak-tflops 989] [--out DIR]
        [--zero 2 --tensor 1 --pipeline 1]   (only layouts of that kind: a recipe's fixed DeepSpeed JSON)

For every candidate layout it computes per-GPU memory with cluster/memory_model.py (model states as
DeepSpeed 0.19 actually holds them — checked against CPU-rank measurements in tests/test_plan_zero.py —
and saved activations derived from the DiT block's shapes, checked against a saved-tensor count), keeps
the trainer's fp32 EMA copy, keeps those that fit in ``--gpu-mem`` minus ``--reserve-gib``, estimates the step time, ranks them and writes
the best as trainer overrides (``overrides.txt``: ``key=value`` lines for trainer/main.py) and a DeepSpeed
JSON (``ds_config.json``: only ZeRO keys; the trainer fills batch, precision and optimizer).

Every candidate passes ``trainer.config.topology.Topology.validate`` and the trainer's batch divisibility rule,
so a proposed layout is never one the trainer would reject.

Step time (one optimizer step, seconds), deliberately simple and printed term by term:
  compute   = FLOPs/sample (models' flops_per_sample, ×4/3 with checkpointing) × global batch
              ÷ (GPUs × peak × MFU × GEMM efficiency), × (1 + (PP−1)/micro-batches) for the pipeline bubble;
              GEMM efficiency = rows/(rows+512) normalised at 8192 rows (rows = micro-batch × tokens),
              −5 % per doubling of TP: small micro-batches and thin shards do not reach the assumed MFU
  data-par. = ring volume ÷ bandwidth: ZeRO-1 one reduce-scatter + one all-gather of the fp32 weights per
              step; ZeRO-2 a reduce-scatter every micro-batch (it reduces during each backward) + one
              all-gather; ZeRO-3 two all-gathers (forward, backward; three with checkpointing) and one
              reduce-scatter every micro-batch; ``--comm-overlap`` of the backward reduce-scatter is hidden
  tensor-p. = 4 all-reduces of the (micro, T, D) activations per block per micro-batch (Megatron layout)
  pipeline  = activations sent between stages, forward and backward
  expert-p. = 4 all-to-alls of the routed tokens per MoE layer per micro-batch
  offload   = fp32 gradients down + weights up over PCIe, plus CPU Adam at ``--host-gbs`` memory bandwidth
A group inside one node uses ``--intra-gbs``; a group spanning nodes ``--inter-gbs`` (per GPU).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass, field

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.memory_model import (  # noqa: E402
    GiB,
    activation_bytes_per_sample,
    autocast_weight_cache_bytes,
    count_params,
    dit_kwargs,
    grad_comm_bytes,
    model_state_bytes,
    weight_bytes,
)

EXIT_IMPOSSIBLE = 2


class PlanError(ValueError):
    """The request cannot be planned; the message says why and what to change."""


@dataclass
class Request:
    model: str = "DiT-XL/2"
    resolution: int = 256
    gpus: int = 8
    gpu_mem: float = 80.0  # GiB per GPU
    gpus_per_node: int = 8
    global_batch: int = 256
    moe_experts: int = 0
    moe_top_k: int = 1
    moe_every: int = 1
    precision: str = "bf16"
    peak_tflops: float = 989.0  # dense bf16 tensor-core peak of an H100 SXM
    mfu: float = 0.40
    intra_gbs: float = 150.0  # effective ring bandwidth inside a node, GB/s per GPU (NVLink)
    inter_gbs: float = 25.0  # effective bandwidth across nodes, GB/s per GPU (InfiniBand 200–400 Gb/s)
    pcie_gbs: float = 20.0
    host_gbs: float = 10.0  # CPU Adam streaming rate for offload
    comm_overlap: float = 0.5
    reserve_gib: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation
    in_channels: int = 4
    num_classes: int = 1000
    max_tensor: int = 8
    max_pipeline: int = 8
    offload: bool = True  # consider ZeRO-Offload layouts (only chosen when nothing else fits or they win)
    zero: int = 0  # 0 = any ZeRO stage; 1-3 = only that one (e.g. the DeepSpeed JSON a recipe ships with)
    tensor: int = 0  # 0 = any tensor-parallel size; k = only k
    pipeline: int = 0  # 0 = any pipeline size; k = only k


@dataclass
class Candidate:
    zero: int
    offload: bool
    tensor: int
    pipeline: int
    expert: int
    data: int
    micro_batch: int
    grad_accum: int
    grad_checkpoint: int
    memory: dict = field(default_factory=dict)  # GiB by part
    time: dict = field(default_factory=dict)  # seconds by part
    fits: bool = False

    @property
    def step_time(self) -> float:
        return self.time.get("total", math.inf)

    def name(self) -> str:
        z = f"ZeRO-{self.zero}{'+offload' if self.offload else ''}"
        return (f"{z} TP{self.tensor} PP{self.pipeline} EP{self.expert} DP{self.data} micro {self.micro_batch} "
                f"gas {self.grad_accum} ckpt {'on' if self.grad_checkpoint else 'off'}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- DeepSpeed JSON of a layout


def shipped_ds_name(zero: int, offload: bool) -> str:
    """The configs/ JSON a layout runs with: zero1/2/3.json, zero2/3_offload.json."""
    return f"zero{zero}{'_offload' if offload else ''}.json"


def ds_config_for(zero: int, offload: bool, params_per_rank: float) -> dict:
    """ZeRO section only (the trainer fills batch/precision/optimizer): the shipped JSON of the layout, with its
    GPU settings (overlap_comm, contiguous gradients, pinned offload buffers) as they are, so the planner and
    configs/ cannot disagree, and the bucket sizes scaled with the model (5e7..5e8 elements, a quarter of the
    rank's parameters): large buckets keep NCCL at bandwidth for big models, small ones save memory."""
    from trainer.config.ds_json import load_ds_config

    ds = load_ds_config(shipped_ds_name(zero, offload))
    z = ds["zero_optimization"]
    bucket = int(min(5e8, max(5e7, params_per_rank / 4)))
    bucket -= bucket % 1_000_000
    z["reduce_bucket_size"] = bucket
    if zero in (1, 2):
        z["allgather_bucket_size"] = bucket
    if zero == 3:
        z["stage3_prefetch_bucket_size"] = int(min(bucket, 5e7))
    return {"zero_optimization": z}


BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


# --------------------------------------------------------------------------- evaluation of one candidate


def matmul_efficiency(rows: int, tensor: int = 1) -> float:
    """Share of the assumed MFU reached with ``rows`` = micro-batch × tokens per GEMM (1.0 from ~8k rows).

    Small GEMMs (few tokens per micro-batch) and thin tensor-parallel shards run below the large-GEMM rate;
    rows/(rows + 512) normalised at 8192 rows, and 5 % less per doubling of TP, is a simple stand-in.
    """
    eff = (rows / (rows + 512)) / (8192 / (8192 + 512))
    return min(1.0, eff) * (1 - 0.05 * math.log2(tensor))


def _ring_seconds(nbytes: float, group: int, gbs: float) -> float:
    if group <= 1:
        return 0.0
    return nbytes * (group - 1) / group / (gbs * 1e9)


def evaluate(req: Request, counts: dict, c: Candidate) -> Candidate:
    dense_per_rank = (counts["trainable"] - counts["expert"]) / (c.tensor * c.pipeline)
    ds = ds_config_for(c.zero, c.offload, dense_per_rank)
    ms = model_state_bytes(counts, ds, dp=c.data, precision=req.precision, tp=c.tensor, pp=c.pipeline, ep=c.expert,
                           grad_accum=c.grad_accum)
    moe = {"num_experts": req.moe_experts, "top_k": req.moe_top_k, "every": req.moe_every} if req.moe_experts else None
    act = activation_bytes_per_sample(counts, req.precision, c.grad_checkpoint, tp=c.tensor, pp=c.pipeline, moe=moe)
    in_flight = min(c.pipeline, c.grad_accum) if c.pipeline > 1 else 1  # 1F1B keeps ≤ PP micro-batches alive
    activations = act["saved_forward"] * c.micro_batch * in_flight + (act["total"] - act["saved_forward"]) * c.micro_batch
    cache = autocast_weight_cache_bytes(counts, req.precision, c.tensor, c.pipeline)
    # the trainer's EMA (trainer/state/ema.py): fp32 copy of the trainable weights, sharded like them under ZeRO-3
    psi_rank = (counts["trainable"] - counts["expert"]) / (c.tensor * c.pipeline) + counts["expert"] / (
        c.tensor * c.pipeline * c.expert)
    ema = 4 * (psi_rank / c.data if c.zero == 3 else psi_rank)
    total = ms["device"] + ms["transient"] + activations + cache + ema
    c.memory = {"ema": ema / GiB, "params": ms["params"] / GiB, "grads": ms["grads"] / GiB, "optim": ms["optim"] / GiB,
                "zero_buffers": (ms["buffers"] + ms["transient"]) / GiB, "activations": activations / GiB,
                "autocast_cache": cache / GiB, "total": total / GiB, "host": ms["host"] / GiB,
                "activations_per_sample": act["total"] / GiB}
    c.fits = total / GiB <= req.gpu_mem - req.reserve_gib

    # ---- time
    flops = counts["flops_per_sample"] * (4 / 3 if c.grad_checkpoint else 1.0)
    compute = flops * req.global_batch / (req.gpus * req.peak_tflops * 1e12 * req.mfu * matmul_efficiency(
        c.micro_batch * counts["tokens"], c.tensor))
    if c.pipeline > 1:
        compute *= 1 + (c.pipeline - 1) / c.grad_accum
    node = req.gpus_per_node
    mp = c.tensor * c.pipeline
    dp_bw = req.intra_gbs if c.data * mp <= node else req.inter_gbs
    psi = (counts["trainable"] - counts["expert"]) / mp + counts["expert"] / (mp * c.expert)
    rs = _ring_seconds(grad_comm_bytes(req.precision) * psi, c.data, dp_bw)  # gradients: the autocast dtype
    ag = _ring_seconds(weight_bytes(req.precision) * psi, c.data, dp_bw)  # the fp32 weights after the step
    if c.zero == 1:
        dp = rs * (1 - req.comm_overlap) + ag
    elif c.zero == 2:
        dp = c.grad_accum * rs * (1 - req.comm_overlap) + ag
    else:
        gathers = 3 if c.grad_checkpoint else 2
        dp = c.grad_accum * (gathers * ag * (1 - req.comm_overlap) + rs * (1 - req.comm_overlap))
    T, D = counts["tokens"], counts["hidden"]
    act_b = 4 if req.precision == "fp32" else 2
    layers = math.ceil(counts["depth"] / c.pipeline)
    tp = c.grad_accum * layers * 4 * 2 * _ring_seconds(c.micro_batch * T * D * act_b, c.tensor, req.intra_gbs)
    pp_bw = req.intra_gbs if mp <= node else req.inter_gbs
    pp = c.grad_accum * 2 * (c.micro_batch * T * D * act_b) / (pp_bw * 1e9) if c.pipeline > 1 else 0.0
    ep = 0.0
    if c.expert > 1 and req.moe_experts:
        moe_layers = math.ceil(counts["depth"] // req.moe_every / c.pipeline)
        ep_bw = req.intra_gbs if c.expert * mp <= node else req.inter_gbs
        tokens = c.micro_batch * T * D * act_b * req.moe_top_k
        ep = c.grad_accum * moe_layers * 4 * tokens * (c.expert - 1) / c.expert / (ep_bw * 1e9)
    off = 0.0
    if c.offload:
        part = psi / c.data
        off = 2 * 4 * part / (req.pcie_gbs * 1e9) + 16 * part / (req.host_gbs * 1e9)
    c.time = {"compute": compute, "data_parallel": dp, "tensor_parallel": tp, "pipeline": pp, "expert_parallel": ep,
              "offload": off}
    c.time["total"] = sum(c.time.values())
    c.time["samples_per_sec"] = req.global_batch / c.time["total"]
    c.time["mfu_effective"] = counts["flops_per_sample"] * c.time["samples_per_sec"] / (
        req.gpus * req.peak_tflops * 1e12)
    return c


# --------------------------------------------------------------------------- search


def check_request(req: Request) -> None:
    problems = []
    if req.gpus < 1:
        problems.append(f"--gpus must be >= 1, got {req.gpus}")
    if req.gpus_per_node < 1:
        problems.append(f"--gpus-per-node must be >= 1, got {req.gpus_per_node}")
    elif req.gpus > req.gpus_per_node and req.gpus % req.gpus_per_node:
        problems.append(f"--gpus {req.gpus} is not a whole number of nodes of {req.gpus_per_node} GPUs")
    if req.gpu_mem <= req.reserve_gib:
        problems.append(f"--gpu-mem {req.gpu_mem} GiB leaves nothing after the {req.reserve_gib} GiB reserve "
                        f"(CUDA context, NCCL, fragmentation; --reserve-gib)")
    if req.global_batch < 1:
        problems.append(f"--global-batch must be >= 1, got {req.global_batch}")
    if req.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"--precision must be fp32, bf16 or fp16, got {req.precision}")
    if not 0 < req.mfu <= 1:
        problems.append(f"--mfu must be in (0, 1], got {req.mfu}")
    if req.peak_tflops <= 0:
        problems.append(f"--peak-tflops must be > 0, got {req.peak_tflops}")
    if req.moe_experts < 0 or (req.moe_experts and not 1 <= req.moe_top_k <= req.moe_experts):
        problems.append(f"--moe-top-k must be in [1, --moe-experts], got {req.moe_top_k} with {req.moe_experts} experts")
    if problems:
        raise PlanError("; ".join(problems))


def candidates(req: Request, arch: dict) -> list[Candidate]:
    from trainer.config.topology import LayoutError, Topology

    out = []
    heads, hidden, depth = arch["num_heads"], arch["hidden_size"], arch["depth"]
    tps = [t for t in divisors(req.gpus) if t <= min(req.max_tensor, req.gpus_per_node) and req.tensor in (0, t)]
    pps = [p for p in divisors(req.gpus) if p <= req.max_pipeline and req.pipeline in (0, p)]
    eps = [e for e in divisors(req.gpus) if req.moe_experts and req.moe_experts % e == 0] or [1]
    for tp in tps:
        for pp in pps:
            for ep in eps:
                for zero in [z for z in (1, 2, 3) if req.zero in (0, z)]:
                    try:
                        topo = Topology(req.gpus, tp, pp, ep).validate(
                            zero_stage=zero, num_heads=heads, hidden_size=hidden, depth=depth,
                            num_experts=req.moe_experts)
                    except LayoutError:
                        continue
                    per_dp = req.global_batch // topo.data if req.global_batch % topo.data == 0 else 0
                    for micro in divisors(per_dp) if per_dp else []:
                        if micro > 256:
                            continue
                        for ckpt in (0, 1):
                            for offload in ((False, True) if req.offload and zero in (2, 3) and pp == 1 else (False,)):
                                out.append(Candidate(zero, offload, tp, pp, ep, topo.data, micro,
                                                     req.global_batch // (micro * topo.data), ckpt))
    return out


def rank_key(c: Candidate):
    # fastest first; ties (within 2 %) go to the simpler layout: less model parallelism, lower ZeRO stage,
    # no offload, no checkpointing, then the larger micro-batch
    return (math.floor(math.log(max(c.step_time, 1e-12)) / math.log(1.02)), c.tensor * c.pipeline * c.expert,
            c.offload, c.zero, c.grad_checkpoint, -c.micro_batch)


def plan(req: Request) -> dict:
    check_request(req)
    try:
        kw = dit_kwargs(req.model, req.resolution, in_channels=req.in_channels, num_classes=req.num_classes,
                        moe_experts=req.moe_experts, moe_top_k=req.moe_top_k, moe_every=req.moe_every)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    counts = count_params(kw)
    cands = [evaluate(req, counts, c) for c in candidates(req, kw)]
    if not cands:
        raise PlanError(
            f"no parallel layout of {req.gpus} GPUs is valid for {req.model} with global batch {req.global_batch}: "
            f"the global batch must be divisible by the data-parallel size (GPUs / (TP × PP)); "
            f"use a global batch that is a multiple of {req.gpus} or a different GPU count")
    fitting = sorted((c for c in cands if c.fits), key=rank_key)
    if not fitting:
        best = min(cands, key=lambda c: c.memory["total"])
        floor = min(cands, key=lambda c: c.memory["total"] - c.memory["activations"])
        raise PlanError(
            f"no layout of {req.model} at {req.resolution} px (global batch {req.global_batch}) fits in "
            f"{req.gpu_mem:g} GiB per GPU on {req.gpus} GPUs: the smallest needs {best.memory['total']:.1f} GiB "
            f"({best.name()}), of which model states alone are "
            f"{floor.memory['total'] - floor.memory['activations']:.1f} GiB at best; usable is "
            f"{req.gpu_mem - req.reserve_gib:.1f} GiB after the {req.reserve_gib:g} GiB reserve. "
            f"Use more GPUs, GPUs with more memory, a smaller model or resolution")
    return {"request": asdict(req), "model_kwargs": kw,
            "params": {k: v for k, v in counts.items() if k != "numels"},
            "candidates": len(cands), "fitting": fitting, "rejected": [c for c in cands if not c.fits]}


def parse_args(argv=None) -> argparse.Namespace:
    d = Request()
    ap = argparse.ArgumentParser(prog="python -m cluster.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=d.model, help="DiT-S|B|L|XL/2|4|8")
    ap.add_argument("--resolution", type=int, default=d.resolution, help="image resolution in px (latent = /8)")
    ap.add_argument("--gpus", type=int, default=d.gpus)
    ap.add_argument("--gpu-mem", type=float, default=d.gpu_mem, help="GiB per GPU")
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    ap.add_argument("--global-batch", type=int, default=d.global_batch)
    ap.add_argument("--moe-experts", type=int, default=d.moe_experts)
    ap.add_argument("--moe-top-k", type=int, default=d.moe_top_k)
    ap.add_argument("--moe-every", type=int, default=d.moe_every)
    ap.add_argument("--precision", default=d.precision, choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="per-GPU peak in the compute dtype")
    ap.add_argument("--mfu", type=float, default=d.mfu, help="assumed model FLOPs utilisation")
    ap.add_argument("--intra-gbs", type=float, default=d.intra_gbs, help="GB/s per GPU inside a node")
    ap.add_argument("--inter-gbs", type=float, default=d.inter_gbs, help="GB/s per GPU across nodes")
    ap.add_argument("--comm-overlap", type=float, default=d.comm_overlap)
    ap.add_argument("--reserve-gib", type=float, default=d.reserve_gib)
    ap.add_argument("--no-offload", action="store_true", help="do not consider ZeRO-Offload layouts")
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="only this ZeRO stage (0: any)")
    ap.add_argument("--tensor", type=int, default=0, help="only this tensor-parallel size (0: any)")
    ap.add_argument("--pipeline", type=int, default=0, help="only this pipeline size (0: any)")
    ap.add_argument("--top", type=int, default=12, help="rows of the ranking to print")
    ap.add_argument("--out", default=None, help="write overrides.txt, ds_config.json and plan.json here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from cluster.plan_output import format_table, write_outputs

    a = parse_args(argv)
    req = Request(model=a.model, resolution=a.resolution, gpus=a.gpus, gpu_mem=a.gpu_mem,
                  gpus_per_node=a.gpus_per_node, global_batch=a.global_batch, moe_experts=a.moe_experts,
                  moe_top_k=a.moe_top_k, moe_every=a.moe_every, precision=a.precision, peak_tflops=a.peak_tflops,
                  mfu=a.mfu, intra_gbs=a.intra_gbs, inter_gbs=a.inter_gbs, comm_overlap=a.comm_overlap,
                  reserve_gib=a.reserve_gib, offload=not a.no_offload, zero=a.zero, tensor=a.tensor,
                  pipeline=a.pipeline)
    try:
        result = plan(req)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IMPOSSIBLE
    print(format_table(req, result, a.top))
    if a.out:
        paths = write_outputs(req, result, a.out)
        print(f"wrote {paths['overrides']}, {paths['ds_config']}, {paths['plan']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
