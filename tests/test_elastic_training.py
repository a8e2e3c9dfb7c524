"""The trainer on the elastic data stream (the default): the run does not depend on the layout or the loader
workers, epochs roll over and resume mid-epoch exactly, a changed batch continues at the same sample position, and
a checkpoint that cannot load under the requested layout is refused before the process group starts."""
import json
import os

import pytest

from tests.runs import losses_by_step, read_metrics, run_training, start_and_kill_after_checkpoint
from trainer.rundir import EXIT_CONFIG_ERROR

STEPS = 8


def _over(root, run_dir, *extra):
    return [f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", "train.global_batch=8", "train.micro_batch=4", *extra]


def _same(a: dict, b: dict, steps, rel):
    for s in steps:
        assert s in a and s in b, (s, sorted(a), sorted(b))
        assert b[s] == pytest.approx(a[s], rel=rel), f"step {s}: {a[s]} vs {b[s]}"


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """80 samples (8 classes x 10): an epoch is 10 steps of 8, so three epochs fit in a short run."""
    from data_pipeline.demo_data import build_demo_data

    root = tmp_path_factory.mktemp("small_demo")
    build_demo_data(str(root), resolutions=(64,), samples_per_class=10, samples_per_shard=30, seed=0, vae="pca")
    return str(root)


def test_one_rank_two_ranks_and_loader_workers_train_the_same_run(demo_root, tmp_path):
    one, two, workers = (str(tmp_path / n) for n in ("dp1", "dp2", "dp2w"))
    run_training(1, _over(demo_root, one), launcher="python")  # 1 rank, 2 micro-steps per step
    run_training(2, _over(demo_root, two))  # 2 ranks, 1 micro-step each
    run_training(2, _over(demo_root, workers, "data.num_workers=2"))
    ref = losses_by_step(one)
    assert sorted(ref) == list(range(1, STEPS + 1))
    _same(ref, losses_by_step(two), range(1, STEPS + 1), rel=1e-4)  # fp32 reduction order only
    _same(losses_by_step(two), losses_by_step(workers), range(1, STEPS + 1), rel=1e-12)


def test_three_epochs_and_a_mid_epoch_resume_are_exact(small_root, tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    over = ["train.max_steps=30", "checkpoint.every=13", "checkpoint.keep_last=5"]
    run_training(1, _over(small_root, ref, *over), launcher="python")
    records = read_metrics(ref)
    assert [r["epoch"] for r in records if r["step"] in (9, 10, 11, 20, 21, 30)] == [0, 1, 1, 2, 2, 3]
    assert records[-1]["samples_per_epoch"] == 80 and records[-1]["epoch_progress"] == pytest.approx(3.0)
    start_and_kill_after_checkpoint(1, _over(small_root, run, *over), run, 13, launcher="python")  # mid-epoch 1
    state = json.load(open(os.path.join(run, "checkpoints", "step00000013", "trainer_state.json")))
    assert state["data_position"] == 13 * 8
    run_training(1, _over(small_root, run, *over), launcher="python")
    _same(losses_by_step(ref), losses_by_step(run), range(1, 31), rel=1e-12)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31))


def test_a_layout_the_checkpoint_cannot_load_is_refused_before_the_process_group(demo_root, tmp_path):
    """A tensor-parallel checkpoint without its optimizer maps (as versions before model-parallel conversion wrote
    them) cannot move to another layout: refused in seconds, naming both layouts, before any process group."""
    import glob

    run = str(tmp_path / "run")
    run_training(2, _over(demo_root, run, "checkpoint.every=4", "train.max_steps=4", "parallel.tensor=2"),
                 ds_config="zero1.json")
    maps = glob.glob(os.path.join(run, "checkpoints", "step00000004", "optim_map_rank*.json"))
    assert len(maps) == 2
    for path in maps:
        os.unlink(path)
    proc = run_training(1, _over(demo_root, run), launcher="python", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_CONFIG_ERROR and f"error: cannot resume {run}/checkpoints/step00000004" in out, \
        out[-3000:]
    assert "written under world 2 (data 1 x tensor 2 x pipeline 1, expert 1), ZeRO-1" in out
    assert "this launch is world 1 (data 1 x tensor 1 x pipeline 1, expert 1), ZeRO-2" in out
    assert "has no optim_map_rank00000.json" in out
    assert "TorchBackend" not in out and "[trainer] took over" not in out  # refused before anything started


def test_a_changed_global_batch_needs_the_key_and_continues_at_the_sample_position(demo_root, tmp_path):
    run = str(tmp_path / "run")
    run_training(1, _over(demo_root, run, "checkpoint.every=4", "train.max_steps=4"), launcher="python")
    refused = run_training(1, _over(demo_root, run, "train.global_batch=16"), launcher="python", check=False)
    assert refused.returncode == EXIT_CONFIG_ERROR and "train.allow_batch_change=true" in refused.stderr
    run_training(1, _over(demo_root, run, "train.global_batch=16", "train.allow_batch_change=true",
                          "checkpoint.every=4"), launcher="python")
    state = json.load(open(os.path.join(run, "checkpoints", f"step{STEPS:08d}", "trainer_state.json")))
    assert state["data_position"] == 4 * 8 + (STEPS - 4) * 16


def test_zero2_offload_checkpoint_resumes_under_zero2(demo_root, tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_training(1, _over(demo_root, ref), launcher="python", ds_config="zero2.json")
    run_training(1, _over(demo_root, run, "train.max_steps=4", "checkpoint.every=4"), launcher="python",
                 ds_config="zero2_offload.json")
    proc = run_training(1, _over(demo_root, run, "checkpoint.every=4"), launcher="python", ds_config="zero2.json")
    assert f"resumed from {run}/checkpoints/step00000004 at step 4" in proc.stdout
    _same(losses_by_step(ref), losses_by_step(run), range(1, STEPS + 1), rel=1e-4)
