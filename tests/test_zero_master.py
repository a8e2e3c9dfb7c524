"""The fp32 master aliasing of trainer/engine/zero_master.py: less memory, the same training, exact resume.

Each case runs tests/zero_master_check.py on 2 CPU ranks: the same seeded DiT trained 3 steps by DeepSpeed as
shipped and by the trainer's ``initialize_engine``; the aliased engine is also checkpointed after step 2 and
resumed by a fresh aliased engine.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(ds_config: str, tmp_path) -> list[dict]:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "zero_master_check.py"), "--world", "2",
                           "--ds-config", ds_config, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("ds_config", ["zero1.json", "zero2.json", "zero3.json"])
def test_aliased_master_trains_and_resumes_bit_exactly(ds_config, tmp_path):
    ranks = _run(ds_config, tmp_path)
    assert len(ranks) == 2
    for rank, r in enumerate(ranks):
        # DeepSpeed as shipped keeps a separate fp32 clone; the trainer's engine shares the weights' storage,
        # also after a checkpoint load
        assert r["shipped_layout"] and not any(g["aliased"] for g in r["shipped_layout"]), r["shipped_layout"]
        assert all(g["aliased"] for g in r["aliased_layout"]), r["aliased_layout"]
        assert all(g["aliased"] for g in r["resumed_layout"]), r["resumed_layout"]
        # the optimizer now steps the weights in place: same losses and (gathered, full) weights, bit for bit
        assert r["aliased_losses"] == r["shipped_losses"], f"rank {rank}"
        assert r["aliased_weights"] == r["shipped_weights"], f"rank {rank}"
        # resume from the step-2 checkpoint continues exactly
        assert r["resumed_losses"] == r["aliased_losses"][-1:], f"rank {rank}"
        assert r["resumed_weights"] == r["aliased_weights"], f"rank {rank}"
    # the two ranks really trained different data-parallel shards
    assert ranks[0]["aliased_losses"] != ranks[1]["aliased_losses"]


@pytest.mark.parametrize("ds_config", ["zero2_offload.json", "zero3_offload.json"])
def test_offloaded_master_is_left_alone_and_still_trains_exactly(ds_config, tmp_path):
    for r in _run(ds_config, tmp_path):
        # with the optimizer offloaded the master lives in host buffers of its own: no aliasing there
        assert not any(g["aliased"] for g in r["aliased_layout"])
        assert r["aliased_losses"] == r["shipped_losses"]
        assert r["resumed_losses"] == r["aliased_losses"][-1:]


def test_non_zero_optimizers_are_not_touched():
    from trainer.engine.zero_master import alias_fp32_master_partitions

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    assert alias_fp32_master_partitions(opt) == 0
    assert alias_fp32_master_partitions(None) == 0


def test_a_deepspeed_without_the_expected_internals_keeps_its_clone_with_a_warning():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from trainer.engine.zero_master import alias_fp32_master_partitions

    hollow = object.__new__(DeepSpeedZeroOptimizer)  # the class, none of the attributes a future release may rename
    with pytest.warns(UserWarning, match="keeping its fp32 master clone"):
        assert alias_fp32_master_partitions(hollow) == 0
