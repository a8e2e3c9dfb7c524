"""Before anything starts: can the newest checkpoint in ``run.dir`` resume under the requested layout and batch?

Every checkpoint records the layout it was written under (``trainer_state.json`` ``layout``): world and
data/tensor/pipeline/expert sizes, ZeRO stage and offload, global and micro batch. A launch that would resume it
under a layout DeepSpeed cannot load is refused here, in seconds and before the process group starts, naming the
saved layout and the requested one, instead of failing inside ``engine.load_checkpoint`` minutes later (or
silently loading partitions into the wrong ranks).

What resumes as is ("native"): the same data/tensor/pipeline/expert sizes, and ZeRO-1 <-> ZeRO-2 with or without
optimizer offload (the same flat partitions per rank). What resumes through a one-time conversion ("universal",
trainer/state/convert.py, loaded by trainer/state/elastic.py): any other ZeRO-1/2/3 stage and data-parallel size,
with or without offload, for data-parallel layouts of a dense model (tensor = pipeline = expert = 1 before and
after): a data-parallel size change within ZeRO-1/2 or within ZeRO-3, and ZeRO-1/2 <-> ZeRO-3. The conversion's
per-parameter tensors do not depend on the layout, and they are loaded through DeepSpeed's tensor-fragment API, not
its universal loaders (whose global optimizer-state formats differ between the two ZeRO families). Tensor/pipeline/
expert-size changes, and any layout change of a tensor/pipeline-parallel or MoE run, are refused: their files hold
fairscale slices, pipeline-stage names or DeepSpeed-MoE expert files that the conversion does not cover yet.
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
    ("refused", why) when it cannot."""
    native = all(saved.get(k) == current.get(k) for k in SIZE_KEYS) and \
        (saved.get("zero_stage") == current.get("zero_stage") or {saved.get("zero_stage"), current.get("zero_stage")} <= {1, 2}) \
        and saved.get("offload_param") == current.get("offload_param")
    if native:
        return "native", None
    model_parallel = [k for k in ("tensor", "pipeline", "expert") if saved.get(k, 1) != 1 or current.get(k, 1) != 1]
    if model_parallel or moe:
        what = ", ".join(f"{k}-parallel size {saved.get(k)} -> {current.get(k)}" for k in SIZE_KEYS
                         if saved.get(k) != current.get(k)) or f"ZeRO stage {saved.get('zero_stage')} -> " \
                                                                f"{current.get('zero_stage')}"
        why = "an MoE model" if moe else f"{'/'.join(model_parallel)} parallelism"
        return "refused", f"{what}, with {why}: a layout conversion for it is not implemented yet"
    if 0 in (saved.get("zero_stage"), current.get("zero_stage")):
        return "refused", (f"ZeRO stage {saved.get('zero_stage')} -> {current.get('zero_stage')} with data-parallel size "
                           f"{saved.get('data')} -> {current.get('data')}: the layout conversion covers ZeRO-1/2/3 only")
    return "universal", None


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
    if saved.get("global_batch") != current["global_batch"] and not cfg.train.allow_batch_change:
        raise ConfigError(
            f"cannot resume {path}: stage {state.get('stage', 0)} was trained with global batch "
            f"{saved.get('global_batch')}, this launch uses {current['global_batch']}. Set train.allow_batch_change=true "
            f"to continue at the same sample position with the new batch, or restore the batch size.")
    return path
