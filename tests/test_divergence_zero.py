"""Real non-finite forwards and NaN gradients leave no trace, on ZeRO-1/2/3 and the pipeline engine (2 CPU ranks).

Each layout (ZeRO-1/2/3 data parallel, and pipeline parallel without ZeRO) trains configs/tiny.yaml for 6 steps (global batch 8; data-parallel runs: micro-batch 2, so two
micro-steps per rank and step) with two faults in the network (trainer/monitor/faults.py, DIT_FAULT_ACTIVATION):

  step 3  an activation overflow in a DiT block on ONE rank (data parallel: rank 1, its second micro-step, after the
          first had accumulated clean gradients; pipeline: the stage holding block 0): the loss is NaN and backward
          puts NaN gradients into DeepSpeed's buckets;
  step 4  NaN gradients with a FINITE loss on the other rank (only DeepSpeed's overflow check, read back through
          ``engine.was_step_applied()``, can see it).

The reference run is the faulted run's step-2 checkpoint resumed with ``data_position`` moved past the two batches
(tests/runs.py's resume_copy: the trainer's own resume contract, no new mechanism), i.e. those batches skipped by
hand. The faulted run's steps 5 and 6 must equal the reference's 3 and 4 bit for bit: weights, ZeRO fp32 partitions,
AdamW exp_avg / exp_avg_sq / step, EMA, LR schedule position (the applied-step count) and the logged losses. That
also shows the gradients were cleared: anything carried into step 5's accumulation would change it.
"""
import json
import os

import pytest
import torch

from tests.runs import checkpoint_tensors, losses_by_step, lr_position, read_metrics, resume_copy, run_training
from trainer.rundir import read_jsonl

STEPS = 6
G = 8
ZERO0 = "zero0"  # written by the fixture: {"zero_optimization": {"stage": 0}}
# layout -> (ds config, overrides, activation faults)
LAYOUTS = {
    "zero1": ("zero1.json", ["train.micro_batch=2"],
              "steps=3;ranks=1;micro=1;block=0 | steps=4;ranks=0;micro=0;block=1;kind=grad_nan"),
    "zero2": ("zero2.json", ["train.micro_batch=2"],
              "steps=3;ranks=1;micro=1;block=0 | steps=4;ranks=0;micro=0;block=1;kind=grad_nan"),
    "zero3": ("zero3.json", ["train.micro_batch=2"],
              "steps=3;ranks=1;micro=1;block=0 | steps=4;ranks=0;micro=0;block=1;kind=grad_nan"),
    # PP=2 on 2 ranks: block 0 lives on stage 0 (rank 0), block 1 on stage 1 (rank 1); 2 micro-batches per step.
    # Without ZeRO (stage 0) DeepSpeed has no overflow check of its own, so only the loop's pipeline guard
    # (trainer/loop/pipeline_step.py) stands between the NaN gradients and the weights; under ZeRO-1 the pipeline
    # engine also gets DeepSpeed's overflow path, the one the zero1 row exercises.
    "pp2": (ZERO0, ["parallel.pipeline=2", "train.micro_batch=4"],
            "steps=3;ranks=0;block=0 | steps=4;ranks=1;block=1;kind=grad_nan"),
}


def _over(root, run_dir, extra):
    return [f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", f"train.global_batch={G}", "train.lr_schedule=cosine", "train.warmup_steps=2",
            "train.min_lr=1e-4", "checkpoint.every=1", "checkpoint.keep_last=10", *extra]


def _ck(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step{step:08d}")


_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    """layout -> (faulted run dir, its process, reference run dir); each layout's two runs start on first use."""

    def get(layout):
        if layout not in _RUNS:
            ds, extra, faults = LAYOUTS[layout]
            base = tmp_path_factory.mktemp(layout)
            faulted, ref = str(base / "faulted"), str(base / "ref")
            if ds == ZERO0:
                ds = str(base / "zero0.json")
                with open(ds, "w") as f:
                    json.dump({"zero_optimization": {"stage": 0}}, f)
            proc = run_training(2, _over(demo_root, faulted, extra), ds_config=ds, timeout=600,
                                extra_env={"DIT_FAULT_ACTIVATION": faults})
            state = json.load(open(os.path.join(_ck(faulted, 2), "trainer_state.json")))
            # batches 3 and 4 skipped by hand: the data position (and the resampled stream's counter) past them
            gas = state["data_batches"] // 2
            resume_copy(_ck(faulted, 2), ref, data_position=state["data_position"] + 2 * G,
                        data_batches=state["data_batches"] + 2 * gas)
            run_training(2, _over(demo_root, ref, extra), ds_config=ds, timeout=600)
            _RUNS[layout] = (faulted, proc, ref)
        return _RUNS[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_skipped_steps_change_nothing_and_are_counted_on_every_rank(runs, layout):
    faulted, proc, _ = runs(layout)
    by_step = {r["step"]: r for r in read_metrics(faulted)}
    assert by_step[3]["loss"] == "nan"  # the overflow reached the loss
    assert isinstance(by_step[4]["loss"], float)  # finite loss, NaN gradients
    assert [by_step[s]["skipped"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 0, 0]
    assert by_step[6]["skipped_steps"] == 2
    two, three, four, five = (checkpoint_tensors(_ck(faulted, s)) for s in (2, 3, 4, 5))
    assert len(two) > 20 and two.keys() == three.keys() == four.keys()
    for name, value in two.items():  # weights, fp32 partitions, moments, Adam step counts, EMA: every rank's files
        assert torch.equal(value, three[name]) and torch.equal(value, four[name]), name
    assert any("exp_avg_sq" in k for k in two) and any("ema" in k for k in two)
    assert any(not torch.equal(four[k], five[k]) for k in four)  # step 5 trains again
    assert all(torch.isfinite(v).all() for v in five.values() if v.is_floating_point())
    # the LR schedule counts applied steps: 1, 2, (skip), (skip), 3, 4
    assert [lr_position(_ck(faulted, s)) for s in range(1, STEPS + 1)] == [1, 2, 2, 2, 3, 4]
    state = json.load(open(os.path.join(_ck(faulted, STEPS), "trainer_state.json")))
    assert state["nan_skipped"] == 2 and state["step"] == STEPS
    alerts = [e["title"] for e in read_jsonl(os.path.join(faulted, "events.jsonl")) if e.get("event") == "alert"]
    assert alerts == ["non-finite loss", "non-finite gradients"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_equals_a_run_that_skipped_those_batches_by_hand(runs, layout):
    faulted, _, ref = runs(layout)
    for mine, theirs in ((5, 3), (6, 4)):
        a, b = checkpoint_tensors(_ck(faulted, mine)), checkpoint_tensors(_ck(ref, theirs))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"step {mine} vs hand-skipped {theirs}: {different[:5]}"
        assert lr_position(_ck(faulted, mine)) == lr_position(_ck(ref, theirs)) == theirs
    got, want = losses_by_step(faulted), losses_by_step(ref)
    assert (got[5], got[6]) == (want[3], want[4])
    lrs, ref_lrs = ({r["step"]: r["lr"] for r in read_metrics(d)} for d in (faulted, ref))
    assert (lrs[5], lrs[6]) == (ref_lrs[3], ref_lrs[4]) and lrs[5] != lrs[6]
