"""train.compile: per-block torch.compile trains the same numbers as eager, through a resolution change."""
import json
import os

import pytest

from tests.runs import losses_by_step, run_training


def test_compiled_progressive_run_matches_eager(demo_root, tmp_path):
    runs = {}
    for mode in ("false", "true"):
        run_dir = str(tmp_path / f"compile_{mode}")
        run_training(1, [f"data.root={demo_root}", f"run.dir={run_dir}", f"train.compile={mode}",
                         "model.grad_checkpoint=1", "checkpoint.every=100"],
                     config="configs/tiny_progressive.yaml", launcher="python", timeout=600)
        runs[mode] = run_dir
    eager, compiled = losses_by_step(runs["false"]), losses_by_step(runs["true"])
    assert sorted(eager) == sorted(compiled) == list(range(1, 13))  # 6 steps at 64 px, 6 at 128 px
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), f"step {step}"
    with open(os.path.join(runs["true"], "events.jsonl")) as f:
        finished = [e for e in map(json.loads, f) if e.get("event") == "finished"][-1]
    # one graph per token-grid size (16 then 64 tokens), inside gradient checkpointing, nothing left eager
    assert finished["compile"]["graphs"] >= 2
    assert finished["compile"]["graph_breaks"] == 0


def test_compiling_blocks_keeps_state_dict_keys():
    from models import DiTArgs
    from trainer.engine.compile import compile_blocks

    model = DiTArgs.from_preset("DiT-S/2", input_size=8).build()
    keys = list(model.state_dict())
    assert compile_blocks(model) == len(model.blocks)
    assert list(model.state_dict()) == keys  # checkpoints, EMA and export see the official names


def test_layouts_that_rewrite_blocks_are_named():
    from trainer.config.validate import compile_conflicts

    assert compile_conflicts(zero_stage=2, tensor=1, pipeline=1, num_experts=0) == []
    reasons = compile_conflicts(zero_stage=3, tensor=2, pipeline=2, num_experts=4)
    assert [r.split(" ")[0] for r in reasons] == ["ZeRO-3", "parallel.tensor=2", "parallel.pipeline=2",
                                                   "model.moe.num_experts=4"]
