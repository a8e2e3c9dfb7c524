"""The config reference table in README.md, generated from the schema so the two cannot drift.

``python -m trainer.config.reference`` prints it; a test checks that README.md holds the current
table and that every key has a description.
"""
from __future__ import annotations

import dataclasses
import sys
import typing

from trainer.config.schema import CHOICES, RunConfig, StageSection

HELP = {
    "run.dir": "run directory: config, metrics, checkpoints, samples; the same dir resumes",
    "run.seed": "seed of init, data order and per-(data-parallel rank, step) noise/timestep streams",
    "run.name": "display name (W&B); default: the run dir's name",
    "run.lease_timeout_minutes": "one writer per run dir: a lease holder without heartbeat this long is presumed dead and taken over (a requeue of the same Slurm job, or a dead pid on the same host, takes over at once)",
    "run.hang_timeout_minutes": "a rank that makes no progress (no step, no collective completing) this long is a hang: the whole job is torn down with exit code 7, the stuck rank and its node named first; also the collective timeout (gloo; NCCL gets a little more so the stuck rank is named first). Must exceed the longest step, first-step compilation, checkpoint save and sample grid (0 = off: 30 min collective timeout only)",
    "run.requeue_on_hang": "after a hang, requeue the Slurm job (resumes from the last checkpoint; bounded by MAX_RESTARTS). Off by default: a deterministic hang would loop",
    "model.name": "`DiT-{S,B,L,XL}/{2,4,8}` or `custom` (then hidden_size, depth, num_heads, patch_size are required)",
    "model.hidden_size": "override the preset's hidden size",
    "model.depth": "override the preset's number of blocks",
    "model.num_heads": "override the preset's attention heads",
    "model.patch_size": "override the preset's patch size",
    "model.mlp_ratio": "feed-forward width / hidden size (preset 4.0)",
    "model.class_dropout_prob": "label dropout for classifier-free guidance",
    "model.num_classes": "0 = from the shard manifest",
    "model.learn_sigma": "predict the variance too (2C output channels, hybrid loss)",
    "model.qk_norm": "normalise per-head q and k (keeps long bf16 runs stable)",
    "model.output_conv": "3×3 conv layers over the output, across token borders, added residually and zero-initialised (U-ViT's final conv): 0 off (the reference DiT), 1 one conv, 2 conv-SiLU-conv; fainter token-grid seams in briefly trained models; not exportable to diffusers",
    "model.ffn": "`gelu` (official MLP) or `swiglu`",
    "model.norm": "`layernorm` (official) or `rmsnorm`",
    "model.grad_checkpoint": "activation checkpointing: 0 off, 1 every block, k every k-th block",
    "model.moe.num_experts": "0 = dense; > 0 = MoE feed-forward with this many experts",
    "model.moe.top_k": "experts per token",
    "model.moe.every": "MoE in every k-th block (1 = all)",
    "model.moe.capacity_factor": "expert capacity = factor × tokens × top_k / experts; overflow tokens are dropped",
    "model.moe.shared_expert": "add one always-on expert",
    "model.moe.noisy_gate": "noise on router logits while training",
    "model.moe.aux_loss_coef": "weight of the load-balancing loss added to the diffusion loss",
    "objective.kind": "`diffusion` (DiT's Gaussian diffusion) or `flow` (rectified flow)",
    "objective.noise_schedule": "`linear` (DiT) or `cosine`",
    "objective.diffusion_steps": "training timesteps of the diffusion",
    "objective.flow_timesteps": "flow t sampling: `uniform` or `logit_normal`",
    "objective.flow_logit_mean": "mean of the logit-normal t distribution",
    "objective.flow_logit_std": "std of the logit-normal t distribution",
    "data.root": "folder with one shard set per resolution (`ROOT/64/`, `ROOT/128/`, …)",
    "data.resolution": "pixels, when there are no stages",
    "data.num_workers": "loader worker processes per rank",
    "data.shuffle_buffer": "samples in the shuffle buffer (resampled stream only)",
    "data.shuffle_block": "elastic stream: shards are shuffled, then samples within blocks of this many (0 = shuffle whole epochs)",
    "data.val_root": "validation shard sets (`VAL_ROOT/64/`, …) for `log.val_every`; empty: the held-out set the training manifest records (`--val-fraction`/`--val-list` of the encode tool, `OUT/val/<res>/` of the demo builder). Must not share sample keys with the training set",
    "data.resampled": "false (default): the elastic epoch stream — global batch k is the same samples on any layout, each sample once per epoch, exact mid-epoch resume; true: the order-free resampled stream (needed only for pipe:/http shards)",
    "train.max_steps": "optimizer steps (with stages: derived as their sum)",
    "train.global_batch": "samples per optimizer step over all data-parallel ranks",
    "train.micro_batch": "samples per rank per forward/backward (gradient accumulation fills the rest)",
    "train.precision": "`fp32`, `bf16` (autocast, fp32 master weights and loss) or `fp16` (autocast over fp32 weights with dynamic loss scaling; overflow steps are skipped and counted)",
    "train.lr": "peak learning rate (AdamW)",
    "train.min_lr": "floor of the cosine schedule",
    "train.warmup_steps": "linear warmup steps (restarts per stage)",
    "train.lr_schedule": "`constant` or `cosine` after warmup",
    "train.weight_decay": "AdamW decay (not on biases, norms, embedding tables)",
    "train.beta1": "AdamW β1",
    "train.beta2": "AdamW β2",
    "train.eps": "AdamW ε",
    "train.compile": "torch.compile each DiT block (inductor fuses norm, modulation, GELU and residuals around the matmuls); not with ZeRO-3, tensor/pipeline parallel or MoE",
    "train.fused_adamw": "torch's fused AdamW kernel: one pass over weights, grads and moments, no temporaries (false: multi-tensor `foreach`)",
    "train.tf32": "fp32 matmuls and convolutions on TF32 tensor cores (CUDA, Ampere or newer; ~7× the fp32 rate, 10-bit mantissa inputs, fp32 accumulation), as the reference DiT trains; false: full fp32. MFU uses the peak of the math in effect",
    "train.grad_clip": "gradient-norm clipping (0 = off)",
    "train.ema_decay": "EMA decay of the sampling weights",
    "train.ema_every": "update the EMA every k steps",
    "train.allow_batch_change": "resume from a checkpoint trained with another global batch (continues at the same sample position); otherwise refused before start",
    "train.max_nan_steps": "non-finite steps in a row (loss or gradients) that make a divergence: roll back (`train.max_rollbacks` > 0), else stop with a checkpoint of the last good state (exit 3)",
    "train.max_rollbacks": "automatic rollbacks: on a divergence the run restores the newest checkpoint from before it, skips the data consumed since (recorded, so a resume repeats the skip) and continues; past this many it stops with the last good checkpoint intact (exit 6; a hang is exit 7). 0 = off",
    "train.blowup_steps": "a loss spike lasting this many steps (counted in logged records: ceil(steps / `log.every`) records in a row) is a sustained blow-up and rolls back like `train.max_nan_steps` non-finite steps (0 = spikes only alert)",
    "log.every": "steps between metric records",
    "log.sample_every": "steps between EMA sample grids (0 = only at the end)",
    "log.peak_tflops": "per-device peak for MFU; 0 = known-GPU table or a measured matmul on CPU",
    "log.stall_minutes": "no step for this long → stall alert (0 = off; the heartbeat is written regardless)",
    "log.heartbeat_seconds": "how often the logging rank writes `heartbeat.json`",
    "log.val_every": "steps between validation-loss evaluations on held-out latents (also at step 0 of a fresh run; 0 = off): raw and EMA weights, `log.val_timesteps` fixed timesteps, fixed noise, no label dropout; `val/loss`, `val/loss_t{i}`, `val/ema_loss`, `val/ema_loss_t{i}` in metrics.jsonl and W&B. Not with pipeline parallelism",
    "log.val_samples": "held-out latents per evaluation (the first N of the validation shard set, split over data-parallel ranks)",
    "log.val_timesteps": "K fixed equidistant timesteps (diffusion: bin centres of [0, T); flow: (k + ½)/K)",
    "log.val_alert_evals": "alert when the EMA validation loss rises this many evaluations in a row (0 = off)",
    "log.eval_every": "steps between in-training FID evaluations of the EMA (0 = off): samples drawn as `trainer.evaluate` draws them (noise keyed by `sample.seed` and the sample index; `sample.steps`, `sample.method`, `sample.cfg_scale`), data-parallel over every rank, features reduced as sums; a record in `evals.jsonl` (→ `trainer.status`, W&B `eval/*`). Any layout, pipeline included",
    "log.eval_per_class": "EMA samples per class per evaluation (`sample.classes`, else every class)",
    "log.eval_batch": "samples per sampling batch on each rank",
    "log.eval_extractor": "local TorchScript feature network (e.g. NVIDIA's `inception-2015-12-05.pt`; nothing is downloaded). The distance is `fid` only for Inception-v3 pool3 2048-d features, else `fd_<name>`; the record holds name, file, dim, SHA-256",
    "log.eval_extractor_name": "the network's name in records (default: its file name)",
    "log.eval_ref": "ADM reference batch `.npz` (`mu`/`sigma`, or `arr_0` images); empty: the stage's held-out latents decoded by the shard set's VAE, computed once and cached as `run.dir/eval/reference-*.npz`",
    "log.eval_ref_samples": "held-out latents in that default reference (0 = as many as are sampled)",
    "log.spike_factor": "loss spike: the loss of each timestep quartile against its own running median (geometric mean over quartiles; two of three consecutive records at `log.every=1`) above this factor → alert once (0 = off; also turns off blow-up rollbacks)",
    "log.spike_budget": "false alarms per logged record the spike threshold allows: it rises above `log.spike_factor` when the statistic's own robust spread (median/MAD, Gaussian tail) would exceed it more often",
    "log.wandb.mode": "`online`, `offline` (sync later) or `disabled`",
    "log.wandb.project": "W&B project",
    "log.wandb.entity": "W&B entity (team)",
    "log.wandb.group": "W&B group",
    "log.wandb.tags": "W&B tags",
    "checkpoint.every": "steps between checkpoints (also at each stage end and on preemption)",
    "checkpoint.keep_last": "checkpoints kept",
    "checkpoint.init_from": "checkpoint dir to take weights from (other resolution allowed); optimizer starts fresh",
    "sample.cfg_scale": "classifier-free guidance scale of sample grids",
    "sample.steps": "sampler steps",
    "sample.method": "`ddim`/`ddpm` (diffusion) or `euler`/`heun` (flow)",
    "sample.classes": "classes in grids (empty = all)",
    "sample.per_class": "samples per class (grid columns)",
    "sample.seed": "noise seed of sample grids",
    "parallel.tensor": "tensor-parallel size (heads and MLP split across ranks)",
    "parallel.pipeline": "pipeline stages (ZeRO-0/1 only)",
    "parallel.expert": "expert-parallel size for MoE",
    "parallel.pipeline_partition": "`parameters`, `uniform` or comma-separated layers per stage",
    "pe_interpolation": "scale position-table coordinates to the first stage's grid (PixArt)",
    "stages": "progressive stages; each: resolution, steps, and optionally global_batch, micro_batch, lr, "
              "warmup_steps, data_root, sample_every, checkpoint_every (unset = inherit)",
}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _type_name(inner) + " (optional)"
    return getattr(tp, "__name__", str(tp))


def iter_keys(cls=RunConfig, prefix=""):
    """(dotted key, type, default) for every leaf of the schema."""
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, getattr(instance, f.name)


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default in iter_keys():
        if key == "stages":
            shown = "[]"
        else:
            shown = repr(default) if not isinstance(default, str) else (f"`{default}`" if default else '""')
        meaning = HELP[key]
        if key in CHOICES:
            meaning += " (" + " / ".join(CHOICES[key]) + ")"
        lines.append(f"| `{key}` | {_type_name(tp)} | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"


def stage_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(StageSection)]


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
