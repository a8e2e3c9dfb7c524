"""Per-rank memory of a DiT training layout: model states under ZeRO-1/2/3 (+ offload) and activations.

Model states (bytes per rank), with Ψ trainable parameters, N ranks in the ZeRO (data-parallel) group:

  The trainer keeps fp32 parameters in every precision mode: ``train.precision=bf16`` and ``fp16`` are
  DeepSpeed's torch-autocast mode (fp32 weights, 16-bit matmuls; fp16 adds a loss scale), so weights,
  gradients, master copies and Adam moments are 4 bytes each. (DeepSpeed's own estimators assume 16-bit
  weights: 2Ψ + 2Ψ + 12Ψ, its "fp16" section, which the trainer does not use.) Measured on CPU ranks
  (benchmarks/bench_zero_memory.py) DeepSpeed 0.19 holds:

    stage 1 / 2   params  w·Ψ_all       (module weights; ZeRO flattens them into one buffer, views, no copy)
                  grads   w·Ψ/N         (reduced into the owned partition bucket by bucket; stage 1 as well
                                         when each step is one micro-batch; with accumulation stage 1 keeps
                                         full gradients, w·Ψ, until the boundary)
                  optim   8Ψ/N          (Adam m, v; DeepSpeed's fp32 master partition would be a *clone* even
                                         of fp32 weights, 4Ψ/N more: trainer/engine/zero_master.py aliases it to
                                         the weights when w = 4 and the optimizer is not offloaded)
                  buffers reduce bucket(s) only while backward runs (reduce_bucket_size, ×2 with overlap_comm)
    stage 3       params  w·Σ⌈n_i/N⌉ + w·Σ_{n_i ≤ persistence threshold} n_i  (partitions + persistent params)
                  grads   4Ψ/N
                  optim   8Ψ/N          (+ 4Ψ/N master clone unless aliased: w = 4, nothing offloaded)
                  buffers reduce_bucket_size · 4 bytes, kept allocated between steps
                  + at run time the gathered parameters of the live layers (≈ prefetch bucket, transient)
    offload_optimizer (stage 2/3): master, Adam moments and fp32 grads move to host memory, plus a w·Ψ/N
                  staging copy; offload_param (stage 3): the parameter partitions move to host as well.

  w = 4 (``weight_bytes``; 2 only for 16-bit weights, which no trainer mode uses). Ψ_all also counts frozen
  parameters (the fixed pos_embed table).
  Tensor/pipeline parallelism divide the per-rank parameter count first; expert parameters are divided by
  the expert-parallel size and ZeRO-partitioned over data/expert ranks (DeepSpeed's expert-data groups).

Activations (bytes per sample per DiT block), derived from what autograd saves in models/dit.py's block,
T tokens, D hidden, F = mlp_ratio·D FFN width, H heads (checked against a saved_tensors_hooks count in
tests/test_plan.py):

    LayerNorm inputs (x, x after attention)           2·T·D      fp32 (the residual stream)
    LayerNorm outputs (saved by the modulate addcmul)  2·T·D      compute dtype (modulate runs in it)
    modulated inputs of qkv and fc1                    2·T·D      compute dtype
    qkv output (q, k, v for attention backward)        3·T·D      compute dtype
    attention output, proj input (transposed copy)     2·T·D      compute dtype
    proj output, fc2 output (saved by the gate mul)    2·T·D      compute dtype
    fc1 output (GELU input), GELU output (fc2 input)   2·T·F      compute dtype
    LayerNorm mean/rstd (2 norms), attention logsumexp (4 + H)·T  fp32
  = 13·T·D + 2·T·F elements; fp32: 84·T·D bytes at F = 4D, bf16/fp16 autocast: 30·T·D + 4·T·F = 46·T·D bytes.
  A checkpointed block keeps only its input (T·D fp32); one block is recomputed at a time in backward.
  bf16/fp16 autocast also caches a 16-bit copy of every weight from forward to backward (2 bytes per parameter).
"""
from __future__ import annotations

import math
from typing import Optional

GiB = 2 ** 30

# --------------------------------------------------------------------------- parameters


def dit_kwargs(model: str, resolution: int, *, in_channels: int = 4, num_classes: int = 1000, vae_downsample: int = 8,
               moe_experts: int = 0, moe_top_k: int = 1, moe_every: int = 1) -> dict:
    """DiT constructor kwargs of a named preset ("DiT-XL/2") at an image resolution."""
    from models.args import preset_kwargs

    preset = preset_kwargs(model)  # ValueError "unknown model name ..." for anything else
    patch = preset["patch_size"]
    if resolution % vae_downsample:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE downsampling factor {vae_downsample}")
    latent = resolution // vae_downsample
    if latent % patch:
        raise ValueError(f"latent size {latent} (resolution {resolution}/{vae_downsample}) is not divisible by patch {patch}")
    kw = dict(preset, input_size=latent, in_channels=in_channels, num_classes=num_classes)
    if moe_experts:
        kw["moe"] = {"num_experts": moe_experts, "top_k": moe_top_k, "every": moe_every}
    return kw


def count_params(model_kwargs: dict) -> dict:
    """Exact parameter census of a DiT, built on the meta device (no memory, no init cost).

    Returns total/trainable/frozen/expert counts, the largest single parameter, the numel of every trainable
    parameter (ZeRO-3 partitions and persistence are per parameter) and the model's training FLOPs per sample.
    """
    import torch

    from models.dit import DiT
    from models.moe import MoEFeedForward

    with torch.device("meta"):
        model = DiT(**model_kwargs)
    expert_ids = set()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            expert_ids.update(id(p) for p in module.experts.parameters())
    numels, expert, frozen, largest = [], 0, 0, 0
    for p in model.parameters():
        n = p.numel()
        largest = max(largest, n)
        if not p.requires_grad:
            frozen += n
            continue
        numels.append(n)
        if id(p) in expert_ids:
            expert += n
    trainable = sum(numels)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    return {
        "total": trainable + frozen, "trainable": trainable, "frozen": frozen, "expert": expert,
        "blocks": blocks, "largest_layer": largest, "numels": numels,
        "flops_per_sample": int(model.flops_per_sample(train=True)),
        "depth": len(model.blocks), "hidden": model.hidden_size, "heads": model.num_heads,
        "tokens": model.grid_size[0] * model.grid_size[1], "mlp_hidden": _ffn_width(model_kwargs),
        "latent_elems": model.in_channels * model.grid_size[0] * model.grid_size[1] * model.patch_size ** 2,
    }


def _ffn_width(kw: dict) -> int:
    from models.layers import swiglu_hidden

    d, ratio = kw["hidden_size"], kw.get("mlp_ratio", 4.0)
    return swiglu_hidden(d, ratio) if kw.get("ffn", "gelu") == "swiglu" else int(d * ratio)


# --------------------------------------------------------------------------- model states


def weight_bytes(precision: str) -> int:
    """Bytes per parameter (and gradient) the trainer keeps: 4 in every mode (bf16/fp16 are autocast over fp32)."""
    return 4


def grad_comm_bytes(precision: str) -> int:
    """Bytes per gradient element on the wire: DeepSpeed's torch-autocast mode tags Linear/Conv weights with the
    autocast dtype and reduces their gradients in it (its ``comm_dtype``), 2 bytes for bf16/fp16."""
    return 2 if precision in ("bf16", "fp16") else 4


def zero_settings(ds: dict) -> dict:
    z = ds.get("zero_optimization", {}) or {}
    off_opt = (z.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    off_par = (z.get("offload_param") or {}).get("device", "none") not in ("none", None)
    return {
        "stage": int(z.get("stage", 0)),
        "reduce_bucket_size": int(float(z.get("reduce_bucket_size", 5e8))),
        "allgather_bucket_size": int(float(z.get("allgather_bucket_size", 5e8))),
        "prefetch_bucket_size": int(float(z.get("stage3_prefetch_bucket_size", 5e7))),
        "persistence_threshold": int(float(z.get("stage3_param_persistence_threshold", 1e5))),
        "overlap_comm": bool(z.get("overlap_comm", z.get("stage", 0) == 3)),
        "offload_optimizer": off_opt, "offload_param": off_par,
    }


def model_state_bytes(counts: dict, ds: dict, *, dp: int, precision: str = "fp32", tp: int = 1, pp: int = 1,
                      ep: int = 1, grad_accum: int = 1) -> dict:
    """Bytes per rank of parameters, gradients, optimizer states and ZeRO buffers (device and host)."""
    z = zero_settings(ds)
    stage = z["stage"]
    w = weight_bytes(precision)  # weight/grad bytes: bf16 and fp16 runs keep fp32 weights (autocast)
    mp = tp * pp
    dense = counts["trainable"] - counts["expert"]
    # trainable parameters this rank owns before ZeRO partitioning: dense / (tp·pp), experts / (tp·pp·ep)
    dense_r = dense / mp
    expert_r = counts["expert"] / (mp * ep)
    frozen_r = counts["frozen"] / mp
    edp = max(1, dp // ep)  # expert-data-parallel group: ZeRO partitions expert weights over it
    part = dense_r / dp + expert_r / edp  # Ψ/N, per-rank share of the trainable parameters
    psi_r = dense_r + expert_r

    if stage == 3:
        scale = 1.0 / mp
        numels = counts["numels"]
        thr = z["persistence_threshold"]
        parts = sum(math.ceil(n * scale / dp) for n in numels)
        persistent = sum(n * scale for n in numels if n <= thr)
        params = w * (parts + persistent + frozen_r / dp)
        grads = 4 * part
        buffers = 4 * z["reduce_bucket_size"]
        transient = w * min(z["prefetch_bucket_size"], psi_r) + w * counts["largest_layer"] * scale
    else:
        params = w * (psi_r + frozen_r)
        # stage 1 with gradient accumulation keeps full gradients until the boundary (it reduces once per step)
        full_grads = stage == 0 or (stage == 1 and grad_accum > 1)
        grads = (4 if w == 4 or stage == 0 else 2) * (psi_r if full_grads else part)
        buffers = 0.0
        bucket = min(z["reduce_bucket_size"], psi_r) * w
        transient = bucket * (2 if z["overlap_comm"] else 1)
        if stage == 0:
            transient = 0.0
    # no ZeRO: torch AdamW steps the module's fp32 weights themselves; ZeRO-1/2/3 without offload: the master
    # partition aliases the rank's fp32 weight partition (trainer/engine/zero_master.py)
    master_is_weights = w == 4 and (stage == 0 or not (z["offload_optimizer"] or (stage == 3 and z["offload_param"])))
    optim_master = 0.0 if master_is_weights else 4 * (psi_r if stage == 0 else part)
    optim = optim_master + 8 * (psi_r if stage == 0 else part)  # + Adam m, v
    host = 0.0
    if z["offload_optimizer"] and stage in (1, 2, 3):
        host += optim + grads + w * part  # master, moments, fp32 grad partition, staging copy
        optim = grads = 0.0
    if z["offload_param"] and stage == 3:
        host += w * parts
        params = w * (persistent + frozen_r / dp)
    device = params + grads + optim + buffers
    return {"params": params, "grads": grads, "optim": optim, "buffers": buffers, "host": host,
            "transient": transient, "device": device, "total": device + host}


# --------------------------------------------------------------------------- activations


def _block_elems(T: int, D: int, F: int, H: int, tp: int = 1) -> dict:
    """Elements autograd saves per DiT block per sample, by storage dtype class."""
    return {
        "fp32": 2 * T * D + (4 + H / tp) * T,  # norm inputs (residual stream) + norm stats + logsumexp
        # norm outputs (saved by modulate, which runs in the compute dtype) + modulated inputs + qkv, attention
        # output, branch outputs and the FFN's hidden activations
        "compute": 2 * T * D + 2 * T * D + (3 * T * D + 2 * T * D + 2 * T * F) / tp,
    }


def _moe_ffn_elems(T: int, D: int, F: int, E: int, top_k: int, shared: bool) -> dict:
    """Extra per-sample elements of a MoE FFN over the dense FFN it replaces (routing copies, router probs)."""
    # per routed choice: fc1 out + GELU out (2·T·F), the gathered token rows, the expert output and the gated
    # copy (≈ 2.5·T·D: capacity drops make it a little less than 3); once per token: the combined output (T·D)
    routed = top_k * (2 * T * F + 2.5 * T * D) + T * D
    dense = 2 * T * F + T * D
    extra_fp32 = 3 * T * E  # router logits, probs (fp32)
    if shared:
        routed += 2 * T * F + T * D
    return {"compute": routed - dense, "fp32": extra_fp32}


def activation_bytes_per_sample(counts: dict, precision: str = "fp32", checkpoint_every: int = 0, tp: int = 1,
                                pp: int = 1, moe: Optional[dict] = None, with_loss: bool = True) -> dict:
    """Saved-activation bytes for one sample on the rank holding depth/pp blocks (the first pipeline stage)."""
    T, D, F, H = counts["tokens"], counts["hidden"], counts["mlp_hidden"], counts["heads"]
    L = math.ceil(counts["depth"] / pp)
    cb = 4 if precision == "fp32" else 2
    fp32_b = 4  # the residual stream and norm statistics stay fp32 under autocast
    e = _block_elems(T, D, F, H, tp)
    block = fp32_b * e["fp32"] + cb * e["compute"]
    if moe and moe.get("num_experts"):
        m = _moe_ffn_elems(T, D, F // tp, moe["num_experts"], moe.get("top_k", 1), moe.get("shared_expert", False))
        every = moe.get("every", 1)
        n_moe = counts["depth"] // every
        block += (cb * m["compute"] + 4 * m["fp32"]) * n_moe / counts["depth"]
    ckpt_in = fp32_b * T * D  # a checkpointed block keeps only its input
    if checkpoint_every:
        n_ckpt = math.ceil(L / checkpoint_every)
        blocks = n_ckpt * ckpt_in + (L - n_ckpt) * block
        recompute = block  # backward re-runs one checkpointed block at a time and holds its activations
    else:
        blocks, recompute = L * block, 0.0
    latent = counts["latent_elems"]  # C·H·W of one latent
    # final layer: norm input (fp32), norm output and modulated input (compute), head output; patch input (fp32)
    other = fp32_b * T * D + cb * 2 * T * D + cb * 2 * latent + 4 * latent
    if with_loss:
        other += 4 * 10 * latent  # objective: noise, x_t, targets, per-element losses (fp32, C_out = 2C)
    saved = blocks + other
    return {"per_block": block, "blocks": blocks, "other": other, "saved_forward": saved,
            "total": saved + recompute}


def autocast_weight_cache_bytes(counts: dict, precision: str, tp: int = 1, pp: int = 1) -> float:
    """bf16/fp16 autocast keeps a 16-bit copy of each weight used in forward until backward ends."""
    return 2.0 * counts["trainable"] / (tp * pp) if precision in ("bf16", "fp16") else 0.0


def measure_saved_bytes(model, inputs: tuple, precision: str = "fp32") -> int:
    """Bytes of distinct storages autograd saves in one forward (parameters and their views excluded)."""
    import torch

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr and ptr not in param_ptrs and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(*inputs)
    del out
    return sum(seen.values())
