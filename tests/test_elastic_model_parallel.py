"""Layout changes of tensor-, pipeline- and expert-parallel runs (the resume matrix in docs/parallelism.md).

A 2-rank run of each source layout is checkpointed at step 4 and continued, from a copy of its run directory, under
another layout: TP1 <-> TP2, PP1 <-> PP2, and an MoE model on EP2 <-> EP1, same global batch. The conversion is our own
(trainer/state/reshard.py: DeepSpeed's converter covers neither fairscale slices, pipeline stage names nor MoE), done by
both ranks together, and loaded with the tensor-fragment API cut for the new tensor rank / stage / experts.

Must hold: the 8 steps after the resume equal the uninterrupted source run's (relative 1e-4: fp32 reduction order is
the only difference), and what the new layout loaded (full fp32 weights, AdamW moments and steps, EMA, LR position and
counters), gathered under official names, equals bit for bit what the source layout itself loads from the checkpoint
natively (DeepSpeed's own loader, the independent oracle).
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.runs import REPO, _env, copy_until, losses_by_step, read_metrics, run_training
from trainer.engine.distributed import free_port

STEPS, AT = 12, 4
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.25"]
LAYOUTS = {  # name: (ds_config, overrides); every layout runs on 2 ranks
    "dp2": ("zero1.json", []),                            # TP1 = PP1: data-parallel 2, ZeRO-1
    "tp2": ("zero2.json", ["parallel.tensor=2"]),         # tensor-parallel 2, ZeRO-2
    "pp2": ("zero1.json", ["parallel.pipeline=2"]),       # pipeline 2 stages, ZeRO-1
    "ep1": ("zero2.json", MOE),                           # MoE, experts replicated over data-parallel 2
    "ep2": ("zero2.json", MOE + ["parallel.expert=2"]),   # MoE, 2 experts per rank
}
CHANGES = [("dp2", "tp2"), ("tp2", "dp2"), ("dp2", "pp2"), ("pp2", "dp2"), ("ep2", "ep1"), ("ep1", "ep2")]


def _over(root, run_dir, layout, *extra):
    return [f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "checkpoint.every=4",
            "checkpoint.keep_last=5", *LAYOUTS[layout][1], *extra]


@pytest.fixture(scope="module")
def references(demo_root, tmp_path_factory):
    """Uninterrupted 2-rank runs of every source layout (12 steps, checkpoints at 4, 8, 12)."""
    runs = {}
    for name in sorted({source for source, _ in CHANGES}):
        run_dir = str(tmp_path_factory.mktemp(name))
        run_training(2, _over(demo_root, run_dir, name), ds_config=LAYOUTS[name][0])
        runs[name] = run_dir
    return runs


def _loaded(demo_root, run: str, layout: str, out: str) -> dict:
    """Resume ``run`` under ``layout`` the trainer's way (tests/elastic_check.py) and return what was loaded."""
    args = [os.path.join(REPO, "tests", "elastic_check.py"), "--config", os.path.join(REPO, "configs", "tiny.yaml"),
            "--ds_config", LAYOUTS[layout][0], "--out", out, *_over(demo_root, run, layout)]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and os.path.exists(out), (proc.stdout + proc.stderr)[-4000:]
    assert f"resumed from {run}/checkpoints/step{AT:08d} at step {AT}" in proc.stdout
    return torch.load(out, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("source,target", CHANGES, ids=[f"{s}-to-{t}" for s, t in CHANGES])
def test_model_parallel_layout_change_continues_the_run_and_loads_exactly_what_was_saved(references, demo_root,
                                                                                         tmp_path, source, target):
    run = copy_until(references[source], str(tmp_path / "run"), AT)
    proc = run_training(2, _over(demo_root, run, target), ds_config=LAYOUTS[target][0])
    out = proc.stdout + proc.stderr
    assert f"resumed from {run}/checkpoints/step{AT:08d} at step {AT}" in out, out[-3000:]
    assert f"{run}/checkpoints/step{AT:08d} converted for a new layout in" in out, out[-3000:]
    ref, got = losses_by_step(references[source]), losses_by_step(run)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    for s in range(AT + 1, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-4), f"step {s}: {ref[s]} vs {got[s]}"

    # Bit-exact: the new layout's load (through the conversion) vs the source layout's native load.
    native = _loaded(demo_root, copy_until(references[source], str(tmp_path / "native"), AT), source,
                     str(tmp_path / "native.pt"))
    converted = _loaded(demo_root, copy_until(references[source], str(tmp_path / "converted"), AT), target,
                        str(tmp_path / "converted.pt"))
    assert set(native["params"]) == set(converted["params"]) and len(native["params"]) > 20
    for name, want in native["params"].items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(converted["params"][name][key], want[key]), (name, key)
    assert set(native["steps"]) == set(converted["steps"]) == {float(AT)}
    assert set(native["ema"]) == set(converted["ema"]) == set(native["params"])
    for name, want in native["ema"].items():
        assert torch.equal(converted["ema"][name], want), (name, "ema")
    for key in ("step", "lr_last_step", "global_steps", "global_samples", "skipped_steps"):
        assert converted[key] == native[key], key
    assert (native["step"], native["global_samples"]) == (AT, AT * 8)


def test_a_killed_model_parallel_conversion_is_redone_and_the_archive_holds_every_expert(references, demo_root,
                                                                                        tmp_path):
    """The MoE EP2 checkpoint converted in one process (``python -m trainer.convert --archive``) after a conversion
    was killed half-way: the half-written folder is replaced, the original is untouched, and the archive's weights,
    AdamW moments and EMA equal what the source layout loads natively, all four experts of every block included."""
    run = copy_until(references["ep2"], str(tmp_path / "run"), AT)
    ck = os.path.join(run, "checkpoints", f"step{AT:08d}")
    partial = os.path.join(run, "checkpoints", f".tmp-universal-step{AT:08d}", ".fragments", "half")
    os.makedirs(partial)  # what a conversion killed during its extract phase leaves
    before = {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)}
    archive_path = str(tmp_path / "archive.pt")
    proc = subprocess.run([sys.executable, "-m", "trainer.convert", run, "--archive", archive_path], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(os.path.dirname(partial))
    assert {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)} == before
    archive = torch.load(archive_path, map_location="cpu", weights_only=True)
    native = _loaded(demo_root, copy_until(references["ep2"], str(tmp_path / "native"), AT), "ep2",
                     str(tmp_path / "native.pt"))
    assert set(archive["weights"]) == set(native["params"])
    assert {f"blocks.{b}.mlp.experts.{e}.fc1.weight" for b in range(2) for e in range(4)} <= set(archive["weights"])
    for name, want in native["params"].items():
        assert torch.equal(archive["weights"][name], want["fp32"]), name
        assert torch.equal(archive["exp_avg"][name], want["exp_avg"]), name
        assert torch.equal(archive["exp_avg_sq"][name], want["exp_avg_sq"]), name
        assert torch.equal(archive["ema"][name], native["ema"][name]), name
    assert archive["adam_step"] == AT and archive["trainer_state"]["step"] == AT
