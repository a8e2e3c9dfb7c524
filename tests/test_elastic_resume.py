"""Layout-independent resume of data-parallel runs (the resume matrix in docs/parallelism.md).

A 2-rank run (ZeRO-2 or ZeRO-3) is checkpointed at step 4 and continued, from a copy of its run directory, under
another layout (another data-parallel size, or the other ZeRO family): the losses of the 8 steps after the resume
equal the uninterrupted 2-rank run's (relative 1e-4, the bound the parallel-equivalence tests use: fp32 reduction
order is the only difference), and what the new layout loaded (full fp32 weights, AdamW moments and step, EMA, LR
position) equals what was saved bit for bit. The data stream and the per-sample randomness do not depend on the
layout (trainer/loop/data.py), the weights, AdamW moments and step counts go through DeepSpeed's universal checkpoint
(trainer/state/convert.py) loaded with the tensor-fragment API (trainer/state/elastic.py), and the EMA through its
consolidation.
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.runs import REPO, _env, copy_until, losses_by_step, read_metrics, run_training
from trainer.engine.distributed import free_port

STEPS, AT = 12, 4


def _over(root, run_dir, *extra):
    return [f"data.root={root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", "train.global_batch=8", "train.micro_batch=2", "checkpoint.every=4",
            "checkpoint.keep_last=5", *extra]


@pytest.fixture(scope="module")
def references(demo_root, tmp_path_factory):
    """Uninterrupted 2-rank ZeRO-2 and ZeRO-3 runs (12 steps, checkpoints at 4, 8, 12)."""
    runs = {}
    for name in ("zero2", "zero3"):
        run_dir = str(tmp_path_factory.mktemp(name))
        run_training(2, _over(demo_root, run_dir), ds_config=f"{name}.json")
        runs[name] = run_dir
    return runs


LAYOUT_CHANGES = [
    ("zero2", 1, "zero2.json"),   # fewer nodes
    ("zero2", 4, "zero2.json"),   # more GPUs
    ("zero2", 2, "zero3.json"),   # ZeRO-2 -> ZeRO-3
    ("zero3", 2, "zero2.json"),   # ZeRO-3 -> ZeRO-2
    ("zero3", 1, "zero3.json"),   # ZeRO-3, fewer nodes
]


@pytest.mark.parametrize("source,nprocs,ds_config", LAYOUT_CHANGES)
def test_resume_on_another_data_parallel_layout_continues_the_same_run(references, demo_root, tmp_path, source,
                                                                        nprocs, ds_config):
    run = copy_until(references[source], str(tmp_path / "run"), AT)
    proc = run_training(nprocs, _over(demo_root, run), ds_config=ds_config, **({"launcher": "python"} if nprocs == 1 else {}))
    out = proc.stdout + proc.stderr
    assert f"resumed from {run}/checkpoints/step{AT:08d} at step {AT}" in out, out[-3000:]
    ref, got = losses_by_step(references[source]), losses_by_step(run)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    for s in range(AT + 1, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-4), f"step {s}: {ref[s]} vs {got[s]}"


def _saved_state(ck: str) -> dict:
    """What checkpoint ``ck`` holds, read from its own files (not through the conversion): full fp32 weights
    (DeepSpeed's consolidation), each parameter's AdamW moments cut out of the ranks' flat partitions, the AdamW step
    of every partition, and the consolidated EMA. ZeRO-1/2 partitions cut the concatenation of a group's parameters;
    ZeRO-3 partitions each parameter separately (ceil(numel / ranks) elements per rank, zero-padded at the end)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.state.consolidate import consolidated_ema

    files = sorted(f for f in os.listdir(ck) if f.endswith("_optim_states.pt"))
    parts = [torch.load(os.path.join(ck, f), map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in files]
    zero3 = "base_optimizer_state" not in parts[0]
    states = [p["optimizer_state_dict" if zero3 else "base_optimizer_state"]["state"] for p in parts]
    meta = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt"
    groups = torch.load(os.path.join(ck, meta), map_location="cpu", weights_only=False)["param_shapes"]
    moments, steps = {}, []
    for g, shapes in enumerate(groups):
        steps += [float(st[g]["step"]) for st in states]
        flat = {k: torch.cat([st[g][k] for st in states]) for k in ("exp_avg", "exp_avg_sq")}
        offset = 0
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            if zero3:
                share = -(-n // len(states))
                moments[name] = {k: torch.cat([st[g][k][offset:offset + share] for st in states])[:n]
                                 for k in ("exp_avg", "exp_avg_sq")}
                offset += share
            else:
                moments[name] = {k: flat[k][offset:offset + n] for k in ("exp_avg", "exp_avg_sq")}
                offset += n
    weights = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ck), tag=os.path.basename(ck))
    ema, _ = consolidated_ema(ck)
    return {"weights": weights, "moments": moments, "steps": steps, "ema": ema}


@pytest.mark.parametrize("source,nprocs,ds_config", LAYOUT_CHANGES[:1] + LAYOUT_CHANGES[2:])
def test_a_layout_change_loads_exactly_what_was_saved(references, demo_root, tmp_path, source, nprocs, ds_config):
    """The resume path of a real launch (tests/elastic_check.py: Trainer.setup on the new layout), then every full
    fp32 weight, AdamW moment and step, EMA tensor and the LR position gathered back: equal to the checkpoint's own
    files bit for bit."""
    run = copy_until(references[source], str(tmp_path / "run"), AT)
    out = str(tmp_path / "loaded.pt")
    args = [os.path.join(REPO, "tests", "elastic_check.py"), "--config", os.path.join(REPO, "configs", "tiny.yaml"),
            "--ds_config", ds_config, "--out", out, *_over(demo_root, run)]
    cmd = [sys.executable, *args] if nprocs == 1 else \
        ["deepspeed", "--num_gpus", str(nprocs), "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and os.path.exists(out), (proc.stdout + proc.stderr)[-4000:]
    assert f"resumed from {run}/checkpoints/step{AT:08d} at step {AT}" in proc.stdout
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    saved = _saved_state(os.path.join(run, "checkpoints", f"step{AT:08d}"))
    trained = set(saved["moments"])
    assert set(loaded["params"]) == trained == set(saved["weights"]) - {"pos_embed"}  # the sin-cos table is fixed
    for name, got in loaded["params"].items():
        assert torch.equal(got["fp32"].reshape(-1), saved["weights"][name].float().reshape(-1)), (name, "fp32")
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[k].reshape(-1), saved["moments"][name][k].reshape(-1)), (name, k)
    assert set(saved["steps"]) == {float(AT)} and loaded["steps"] and set(loaded["steps"]) == {float(AT)}
    assert set(loaded["ema"]) == set(saved["ema"]) == trained
    for name, got in loaded["ema"].items():
        assert torch.equal(got.reshape(-1), saved["ema"][name].float().reshape(-1)), (name, "ema")
    assert (loaded["step"], loaded["lr_last_step"], loaded["global_steps"], loaded["skipped_steps"]) == (AT, AT, AT, 0)
    assert loaded["global_samples"] == AT * 8
    if source == "zero3":  # the consolidated archive of a ZeRO-3 run (its conversion gets step.pt from the global state)
        archive_path = str(tmp_path / "archive.pt")
        proc = subprocess.run([sys.executable, "-m", "trainer.convert", run, "--archive", archive_path], cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        archive = torch.load(archive_path, map_location="cpu", weights_only=True)
        assert archive["adam_step"] == AT and set(archive["weights"]) == trained
        for name, w in archive["weights"].items():
            assert torch.equal(w.reshape(-1), saved["weights"][name].float().reshape(-1)), name
            assert torch.equal(archive["exp_avg_sq"][name].reshape(-1), saved["moments"][name]["exp_avg_sq"]), name


def test_the_conversion_is_bit_exact_and_a_killed_conversion_leaves_the_original_usable(references, tmp_path):
    """The universal conversion holds exactly the weights, AdamW moments and step of the original's partitions and
    EMA; a conversion killed half-way (its temporary folder left behind) is redone, the original untouched."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.state.consolidate import consolidated_ema
    from trainer.state.convert import ensure_universal, universal_path, universal_state
    from trainer.state.integrity import check_hashes, check_sizes

    run = copy_until(references["zero2"], str(tmp_path / "run"), AT)
    ck = os.path.join(run, "checkpoints", f"step{AT:08d}")
    partial = os.path.join(run, "checkpoints", f".tmp-universal-step{AT:08d}")
    os.makedirs(os.path.join(partial, "zero", "half"))  # what a conversion killed half-way leaves
    before = {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)}
    out, seconds = ensure_universal(ck)
    assert out == universal_path(ck) and seconds > 0 and not os.path.exists(partial)
    assert {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)} == before  # original untouched
    assert check_sizes(out) is None and check_hashes(out) == []
    state = universal_state(out)
    weights = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ck), tag=os.path.basename(ck))
    assert set(state) == set(weights) - {"pos_embed"}  # the fixed sin-cos table has no optimizer state
    for name, got in state.items():
        assert torch.equal(got["fp32"].reshape(weights[name].shape), weights[name].float()), name
    # AdamW moments: per parameter group, the two ranks' flat partitions concatenated hold every parameter's
    # moments in the order of DeepSpeed's param_shapes (alignment padding only at the group's end).
    parts = [torch.load(os.path.join(ck, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"] for r in (0, 1)]
    groups = torch.load(os.path.join(ck, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=True)["param_shapes"]
    checked = 0
    for g, shapes in enumerate(groups):
        flat = {k: torch.cat([p[g][k] for p in parts]) for k in ("exp_avg", "exp_avg_sq")}
        offset = 0
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[name][k].reshape(-1), flat[k][offset:offset + n]), (name, k)
            assert int(state[name]["step"]) == int(parts[0][g]["step"]) == AT
            offset += n
            checked += 1
    assert checked == len([n for n in weights if n != "pos_embed"])  # the fixed sin-cos table is not trained
    ema, _ = consolidated_ema(ck)
    assert set(ema) == set(weights) - {"pos_embed"}  # the fixed sin-cos table is neither trained nor averaged
    again, seconds_again = ensure_universal(ck)  # once: the verified conversion is reused
    assert again == out and seconds_again == 0.0
    # The archive command: one weights_only-loadable fp32 file with weights, moments, EMA and state.
    archive_path = str(tmp_path / "archive.pt")
    proc = subprocess.run([sys.executable, "-m", "trainer.convert", run, "--archive", archive_path], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    archive = torch.load(archive_path, map_location="cpu", weights_only=True)
    assert archive["trainer_state"]["step"] == AT and archive["adam_step"] == AT
    for name, w in archive["weights"].items():
        assert torch.equal(w, weights[name].float()) and torch.equal(archive["ema"][name], ema[name].float()), name
        assert torch.equal(archive["exp_avg"][name].reshape(-1), state[name]["exp_avg"].reshape(-1)), name


def test_which_layout_changes_convert_and_which_are_refused():
    from trainer.config.resume import resume_mode

    base = {"world": 2, "data": 2, "tensor": 1, "pipeline": 1, "expert": 1, "zero_stage": 2,
            "offload_optimizer": False, "offload_param": False, "global_batch": 8}
    assert resume_mode(base, dict(base, data=4, world=4)) == ("universal", None)
    assert resume_mode(base, dict(base, zero_stage=1)) == ("native", None)
    assert resume_mode(base, dict(base, zero_stage=1, data=1, world=1)) == ("universal", None)
    # ZeRO-3: another data-parallel size, and either way between the ZeRO families, go through the conversion
    assert resume_mode(dict(base, zero_stage=3), dict(base, zero_stage=3, data=1, world=1)) == ("universal", None)
    for saved_stage, new_stage in ((2, 3), (3, 2), (3, 1), (1, 3)):
        assert resume_mode(dict(base, zero_stage=saved_stage), dict(base, zero_stage=new_stage)) == ("universal", None)
    assert resume_mode(dict(base, zero_stage=3), dict(base, zero_stage=3)) == ("native", None)
    mode, why = resume_mode(dict(base, zero_stage=0), dict(base, zero_stage=0, data=1, world=1))
    assert mode == "refused" and "ZeRO-1/2/3 only" in why
    # tensor/pipeline/expert sizes and MoE: our own conversion (trainer/state/reshard.py), any direction
    assert resume_mode(base, dict(base, tensor=2, data=1)) == ("universal", None)
    assert resume_mode(dict(base, tensor=2, data=1), dict(base, zero_stage=1)) == ("universal", None)
    assert resume_mode(dict(base, zero_stage=1), dict(base, zero_stage=1, pipeline=2, data=1)) == ("universal", None)
    assert resume_mode(dict(base, tensor=2, data=1), dict(base, tensor=2, data=1, zero_stage=1)) == ("native", None)
    assert resume_mode(base, dict(base, expert=2), moe=True) == ("universal", None)
    assert resume_mode(base, dict(base, data=1, world=1), moe=True) == ("universal", None)
    mode, why = resume_mode(dict(base, zero_stage=0, pipeline=2, data=1), dict(base, zero_stage=1))
    assert mode == "refused" and "ZeRO stage 0 -> 1" in why and "pipeline-parallel size 2 -> 1" in why
