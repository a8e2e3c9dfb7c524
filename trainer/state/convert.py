"""Moving a checkpoint to another parallel layout: DeepSpeed's universal checkpoint for data-parallel layouts.

A DeepSpeed ZeRO checkpoint holds each rank's flat partition of the fp32 weights and AdamW moments, so it loads only
on the data-parallel size and ZeRO family it was written with. DeepSpeed's universal checkpoint
(``deepspeed.checkpoint.ds_to_universal``) re-cuts those partitions into one folder per parameter
(``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, full unpartitioned tensors; DeepSpeed 0.19 writes ``step.pt`` for
ZeRO-1/2 sources only and keeps a ZeRO-3 source's AdamW step in ``zero/optimizer_state.pt``, so the conversion adds
the missing ``step.pt`` files from there). Those folders are the same whichever ZeRO-1/2/3 layout wrote them, and
trainer/state/elastic.py loads them into an engine of any ZeRO stage and data-parallel size through DeepSpeed's
tensor-fragment API (DeepSpeed's own universal loaders are not used: their global optimizer-state formats differ
between ZeRO-1/2 and ZeRO-3). Here the conversion is

* done once per checkpoint, into ``checkpoints/universal-stepNNNNNNNN/`` beside the original;
* atomic: written under ``.tmp-universal-stepNNNNNNNN`` and renamed after its own ``COMPLETE.json`` (sizes and
  xxh3-128 checksums) is written, so a conversion killed half-way leaves the original checkpoint untouched and
  usable and is redone by the next launch; a published conversion is verified like a checkpoint before use;
* run by DeepSpeed's converter in a subprocess (its extract and merge phases use worker processes), on one rank
  while the others wait, and logged with its time.

The EMA is not part of DeepSpeed's state: ``consolidated_ema`` (trainer/state/consolidate.py) rebuilds the full
EMA from any layout's files, and ``EMA.load_full`` cuts it for the new layout.

ZeRO-1/2 checkpoints that carry optimizer maps (all written since model-parallel conversion exists) go to
trainer/state/reshard.py instead (``ensure_universal`` hands them over): it also covers fairscale slices,
pipeline-stage names and DeepSpeed-MoE expert partitions, which DeepSpeed's converter does not know, writes the same
folders under official DiT names, and runs on every rank of a launch. This module's path remains for ZeRO-3
checkpoints and older data-parallel ones. ZeRO-0 checkpoints are not converted (refused before
start by trainer/config/resume.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from trainer.state import integrity

PREFIX = "universal-"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def model_states_file(checkpoint: str) -> str:
    """DeepSpeed's model-states file of ``checkpoint`` (its name differs between ZeRO-1/2 and ZeRO-3)."""
    found = next((os.path.join(checkpoint, n) for n in MODEL_STATES if os.path.isfile(os.path.join(checkpoint, n))),
                 None)
    if found is None:
        raise RuntimeError(f"{checkpoint} has no DeepSpeed model-states file ({' or '.join(MODEL_STATES)})")
    return found


def universal_path(checkpoint: str) -> str:
    checkpoint = checkpoint.rstrip("/")
    return os.path.join(os.path.dirname(checkpoint), PREFIX + os.path.basename(checkpoint))


def ensure_universal(checkpoint: str, workers: int = 2) -> tuple[str, float]:
    """The verified universal conversion of ``checkpoint`` (made now if missing or broken); (path, seconds spent)."""
    from trainer.state.reshard import ensure_resharded, rank_maps

    if rank_maps(checkpoint):  # any ZeRO-1/2 checkpoint with optimizer maps: trainer/state/reshard.py, one process
        return ensure_resharded(checkpoint)
    out = universal_path(checkpoint)
    if integrity.is_intact(out):
        return out, 0.0
    parent, tag = os.path.split(out)
    tmp = os.path.join(parent, ".tmp-" + tag)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a published but broken conversion: redo it
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", checkpoint,
           "--output_folder", tmp, "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    stray = os.path.join(parent, "latest_universal")  # the converter's pointer file; we use our own names
    if os.path.isfile(stray):
        os.unlink(stray)
    add_missing_steps(tmp)
    for name in ("trainer_state.json",):  # the run's own state travels with the conversion
        shutil.copy2(os.path.join(checkpoint, name), os.path.join(tmp, name))
    # DeepSpeed reads only metadata from the model-states file of a universal checkpoint (LR scheduler, step and
    # sample counters: the weights come from zero/), and looks for it under the target's naming: mp_rank_00_... for
    # ZeRO-1/2 targets, zero_pp_rank_0_mp_rank_00_... for ZeRO-3. The converter copies it for ZeRO-1/2 sources only.
    try:
        source = model_states_file(checkpoint)
    except RuntimeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in MODEL_STATES:
        if not os.path.isfile(os.path.join(tmp, name)):
            shutil.copy2(source, os.path.join(tmp, name))
    integrity.seal(tmp)
    os.rename(tmp, out)
    return out, time.perf_counter() - started


def global_adam_step(universal: str):
    """The AdamW step count in a conversion's global ``zero/optimizer_state.pt`` (where a ZeRO-3 source keeps it);
    one value (every parameter group steps together). A weights-only load with DeepSpeed's two classes allowed."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        sd = torch.load(os.path.join(universal, "zero", "optimizer_state.pt"), map_location="cpu", weights_only=True)
    steps = {float(s["step"]) for s in sd.get("optimizer_state_dict", {}).get("state", {}).values() if "step" in s}
    if len(steps) != 1:
        raise RuntimeError(f"{universal}: expected one AdamW step count in zero/optimizer_state.pt, found {sorted(steps)}")
    return torch.tensor(steps.pop(), dtype=torch.float32)


def add_missing_steps(universal: str) -> int:
    """Write ``step.pt`` into every trained parameter's folder that lacks it (ZeRO-3 sources); returns how many."""
    import torch

    root = os.path.join(universal, "zero")
    missing = [n for n in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, n, "exp_avg.pt"))
               and not os.path.exists(os.path.join(root, n, "step.pt"))]
    if missing:
        step = global_adam_step(universal)
        for name in missing:
            torch.save(step.clone(), os.path.join(root, name, "step.pt"))
    return len(missing)


def universal_names(universal: str) -> list[str]:
    """The parameter names of a universal checkpoint (one folder each under ``zero/``)."""
    root = os.path.join(universal, "zero")
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))


def parameter_state(universal: str, name: str, keys=("fp32", "exp_avg", "exp_avg_sq", "step")) -> dict:
    """{key: tensor} of one parameter of a universal checkpoint (weights_only loads; missing files left out)."""
    import torch

    entry = {}
    for key in keys:
        path = os.path.join(universal, "zero", name, f"{key}.pt")
        if os.path.exists(path):
            value = torch.load(path, map_location="cpu", weights_only=True)
            entry[key] = value["param"] if isinstance(value, dict) and "param" in value else value
    return entry


def universal_state(universal: str) -> dict:
    """name -> {"fp32", "exp_avg", "exp_avg_sq", "step"} tensors of a whole universal checkpoint (for archives and
    checks; a resume reads one parameter at a time through ``parameter_state``)."""
    return {name: parameter_state(universal, name) for name in universal_names(universal)}
