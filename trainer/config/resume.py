"""Before anything starts: can the newest checkpoint in ``run.dir`` resume under the requested layout and batch?

Every checkpoint records the layout it was written under (``trainer_state.json`` ``layout``): world and
data/tensor/pipeline/expert sizes, ZeRO stage and offload, global and micro batch. A launch that would resume it
under a layout DeepSpeed cannot load is refused here, in seconds and before the process group starts, naming the
saved layout and the requested one, instead of failing inside ``engine.load_checkpoint`` minutes later (or
silently loading partitions into the wrong ranks).

What resumes as is ("native"): the same data/tensor/pipeline/expert sizes, and ZeRO-1 <-> ZeRO-2 with or without
optimizer offload (the same flat partitions per rank). Everything else between ZeRO-1/2/3 layouts resumes through a
one-time conversion ("universal") into one folder per parameter under official DiT names, which do not depend on the
layout: DeepSpeed's converter for data-parallel runs (trainer/state/convert.py), our own for tensor/pipeline/expert-
parallel and MoE runs (trainer/state/reshard.py, from the optimizer maps their checkpoints carry); either is loaded
into the new layout through DeepSpeed's tensor-fragment API (trainer/state/elastic.py), cut for the new tensor rank,
pipeline stage or experts. Data-parallel size, ZeRO stage, tensor size, pipeline stages and expert size may all change
at once. Refused: ZeRO-0 on either side (its plain torch optimizer state is not converted), and a model-parallel
checkpoint written before the optimizer maps existed.
A changed global batch resumes only with ``train.allow_batch_change=true``; the run then continues at the saved
sample position (the elastic stream's position, not a batch count).

Torch-free: reads JSON files only.
"""
from __future__ import annotations

import os
from typing import Optional

from trainer.config.schema import ConfigError, RunConfig
from trainer.config.stages import Stage
from trainer.config.topology import Topology
from trainer.rundir import CHECKPOINT_COMPLETE, checkpoints_dir, read_json

SIZE_KEYS = ("data", "tensor", "pipeline", "expert")
OPTIMIZER_MAP = "optim_map_rank00000.json"  # rank 0's map of a model-parallel checkpoint (trainer/engine/parallelize.py)


def layout_record(topo: Topology, ds: dict, stage: Stage) -> dict:
    z = ds.get("zero_optimization", {}) or {}
    return {"world": topo.world, "data": topo.data, "tensor": topo.tensor, "pipeline": topo.pipeline,
            "expert": topo.expert, "zero_stage": int(z.get("stage", 0)),
            "offload_optimizer": (z.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
            "offload_param": (z.get("offload_param") or {}).get("device", "none") not in ("none", None),
            "global_batch": stage.global_batch, "micro_batch": stage.micro_batch}


def describe(layout: dict) -> str:
    off = "+".join(k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param") if layout.get(k))
    return (f"world {layout.get('world')} (data {layout.get('data')} x tensor {layout.get('tensor')} x pipeline "
            f"{layout.get('pipeline')}, expert {layout.get('expert')}), ZeRO-{layout.get('zero_stage')}"
            f"{' with ' + off + ' offload' if off else ''}, global batch {layout.get('global_batch')}")


def newest_checkpoint_state(run_dir: str) -> tuple[Optional[str], Optional[dict]]:
    """(path, trainer_state) of the newest published checkpoint with a completion marker (sizes are checked at
    resume; this is only about the layout), or (None, None)."""
    ck = checkpoints_dir(run_dir)
    if not os.path.isdir(ck):
        return None, None
    tags = sorted((n for n in os.listdir(ck) if n.startswith("step") and n[4:].isdigit()), reverse=True)
    for tag in tags:
        path = os.path.join(ck, tag)
        state = read_json(os.path.join(path, "trainer_state.json"))
        if state is not None and os.path.isfile(os.path.join(path, CHECKPOINT_COMPLETE)):
            return path, state
    return None, None


def resume_mode(saved: dict, current: dict, moe: bool = False) -> tuple[str, Optional[str]]:
    """("native" | "universal", None) when a checkpoint written under ``saved`` loads under ``current``,
    ("refused", why) when it cannot. ``moe``: an MoE model (its expert partitions always convert through
    trainer/state/reshard.py; DeepSpeed's own converter does not cover MoE)."""
    native = all(saved.get(k) == current.get(k) for k in SIZE_KEYS) and \
        (saved.get("zero_stage") == current.get("zero_stage") or {saved.get("zero_stage"), current.get("zero_stage")} <= {1, 2}) \
        and saved.get("offload_param") == current.get("offload_param")
    if native:
        return "native", None
    if 0 in (saved.get("zero_stage"), current.get("zero_stage")):
        what = ", ".join(f"{k}-parallel size {saved.get(k)} -> {current.get(k)}" for k in SIZE_KEYS
                         if saved.get(k) != current.get(k))
        return "refused", (f"ZeRO stage {saved.get('zero_stage')} -> {current.get('zero_stage')}"
                           f"{' with ' + what if what else ''}: the layout conversion covers ZeRO-1/2/3 only (ZeRO-0 "
                           f"keeps a plain torch optimizer state per model-parallel rank that it does not read)")
    return "universal", None


def model_parallel(layout: dict, moe: bool = False) -> bool:
    """Checkpoints of these layouts convert through trainer/state/reshard.py (it needs their optimizer maps)."""
    return moe or any(int(layout.get(k, 1) or 1) > 1 for k in ("tensor", "pipeline", "expert"))


def check_resume_layout(cfg: RunConfig, stages: list[Stage], topo: Topology, ds: dict) -> Optional[str]:
    """ConfigError when the newest checkpoint cannot resume under this launch; returns its path (or None)."""
    path, state = newest_checkpoint_state(cfg.run.dir)
    if path is None or not state.get("layout"):
        return path  # nothing to resume, or a checkpoint from before layouts were recorded
    saved = state["layout"]
    stage = stages[min(int(state.get("stage", 0)), len(stages) - 1)]
    current = layout_record(topo, ds, stage)
    mode, problem = resume_mode(saved, current, moe=cfg.model.moe.num_experts > 0)
    if mode == "refused":
        raise ConfigError(
            f"cannot resume {path}: it was written under {describe(saved)}; this launch is {describe(current)} "
            f"({problem}). Relaunch with the saved layout, or start a new run.dir with checkpoint.init_from={path} "
            f"(weights only; optimizer and data position start fresh).")
    moe = cfg.model.moe.num_experts > 0
    if mode == "universal" and model_parallel(saved, moe) and not os.path.isfile(os.path.join(path, OPTIMIZER_MAP)):
        raise ConfigError(
            f"cannot resume {path} under another layout: it was written under {describe(saved)}, this launch is "
            f"{describe(current)}, and the checkpoint has no {OPTIMIZER_MAP} (written by versions before model-parallel "
            f"layout conversion existed). Relaunch with the saved layout once; its next checkpoint converts.")
    if saved.get("global_batch") != current["global_batch"] and not cfg.train.allow_batch_change:
        raise ConfigError(
            f"cannot resume {path}: stage {state.get('stage', 0)} was trained with global batch "
            f"{saved.get('global_batch')}, this launch uses {current['global_batch']}. Set train.allow_batch_change=true "
            f"to continue at the same sample position with the new batch, or restore the batch size.")
    return path
