"""Planner unit tests: parameter census, activation formula vs saved tensors, CLI output, impossible requests,
and outputs (overrides + DeepSpeed JSON) that the trainer's own loaders and validators accept."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cluster import plan as planner
from cluster.memory_model import activation_bytes_per_sample, count_params, measure_saved_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=3, num_heads=4, num_classes=10)


def test_param_census_and_flops_match_the_real_model():
    from models.dit import DiT

    for kw in (SMALL, dict(SMALL, moe={"num_experts": 4, "top_k": 1})):
        counts = count_params(kw)
        model = DiT(**kw)
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts["flops_per_sample"] == model.flops_per_sample(train=True)
        assert counts["tokens"] == 64 and counts["hidden"] == 128
    assert count_params(dict(SMALL, moe={"num_experts": 4, "top_k": 1}))["expert"] > 0


def _saved_per_sample(kw, precision, ckpt):
    from models.dit import DiT

    torch.manual_seed(0)
    model = DiT(**kw, grad_checkpoint=ckpt)
    s = kw["input_size"]

    def saved(n):
        x, t, y = torch.randn(n, 4, s, s), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
        return measure_saved_bytes(model, (x, t, y), precision)

    return (saved(4) - saved(2)) / 2  # per sample: batch-independent terms (weight casts) cancel


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [0, 1])
@pytest.mark.parametrize("moe", [None, {"num_experts": 4, "top_k": 2}])
def test_activation_formula_matches_saved_tensor_count(precision, ckpt, moe):
    kw = dict(SMALL, moe=moe) if moe else SMALL
    measured = _saved_per_sample(kw, precision, ckpt)
    predicted = activation_bytes_per_sample(count_params(kw), precision, ckpt, moe=moe, with_loss=False)
    tol = 0.10 if moe and not ckpt else 0.06
    assert predicted["saved_forward"] == pytest.approx(measured, rel=tol)
    if ckpt:
        assert predicted["total"] > predicted["saved_forward"]  # + one block recomputed in backward


def _plan(tmp_path, *extra):
    out = tmp_path / "plan"
    rc = planner.main(["--model", "DiT-XL/2", "--resolution", "512", "--gpus", "64", "--gpu-mem", "80",
                       "--out", str(out), *extra])
    return rc, out


def test_cli_prints_a_ranked_table_and_writes_loadable_outputs(tmp_path, capsys):
    from trainer.config.schema import load_config
    from trainer.config.ds_json import fill_ds_config
    from trainer.config.topology import Topology
    from trainer.config.validate import validate_values

    rc, out = _plan(tmp_path)
    text = capsys.readouterr().out
    assert rc == 0
    assert "DiT-XL/2 at 512 px" in text and "chosen:" in text and "step s" in text
    assert "activations per sample" in text
    overrides = [l for l in (out / "overrides.txt").read_text().splitlines() if l and not l.startswith("#")]
    keys = {l.split("=", 1)[0] for l in overrides}
    assert {"parallel.tensor", "parallel.pipeline", "parallel.expert", "train.micro_batch", "model.grad_checkpoint",
            "train.global_batch", "model.name"} <= keys
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides)
    validate_values(cfg)
    assert cfg.model.name == "DiT-XL/2" and cfg.train.global_batch == 256
    ds = json.loads((out / "ds_config.json").read_text())
    chosen = json.loads((out / "plan.json").read_text())["chosen"]
    topo = Topology(64, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert)
    topo.validate(zero_stage=ds["zero_optimization"]["stage"], num_heads=16, hidden_size=1152, depth=28)
    assert topo.data == chosen["data"]
    filled = fill_ds_config(ds, cfg, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                            data_parallel=topo.data, on_cuda=True)
    assert filled["gradient_accumulation_steps"] == chosen["grad_accum"]
    assert filled["zero_optimization"]["stage"] == chosen["zero"]


def test_every_ranked_layout_fits_and_is_valid_for_the_trainer():
    from trainer.config.topology import Topology

    req = planner.Request(model="DiT-B/2", resolution=256, gpus=16, gpu_mem=40, global_batch=256)
    result = planner.plan(req)
    assert result["fitting"]
    times = [c.step_time for c in result["fitting"]]
    assert times[0] <= min(times) * 1.02 + 1e-12
    for c in result["fitting"]:
        assert c.memory["total"] <= req.gpu_mem - req.reserve_gib
        assert c.pipeline == 1 or c.zero <= 1  # DeepSpeed's pipeline engine takes ZeRO-0/1 only
        Topology(16, c.tensor, c.pipeline, c.expert).validate(zero_stage=c.zero, num_heads=12, hidden_size=768,
                                                              depth=12)
        assert req.global_batch % (c.micro_batch * c.data) == 0


def test_checkpointing_and_zero3_reduce_memory():
    req = planner.Request(model="DiT-XL/2", resolution=512, gpus=8, gpu_mem=80, global_batch=64, offload=False)
    counts = count_params(planner.dit_kwargs(req.model, req.resolution))
    base = dict(tensor=1, pipeline=1, expert=1, data=8, micro_batch=8, grad_accum=1)
    mem = {(z, ck): planner.evaluate(req, counts, planner.Candidate(zero=z, offload=False, grad_checkpoint=ck,
                                                                   **base)).memory
           for z in (1, 3) for ck in (0, 1)}
    assert mem[(1, 1)]["activations"] < 0.5 * mem[(1, 0)]["activations"]
    assert mem[(3, 0)]["params"] < 0.2 * mem[(1, 0)]["params"]


def test_moe_layouts_use_expert_parallelism():
    req = planner.Request(model="DiT-B/2", resolution=256, gpus=8, gpu_mem=80, global_batch=64, moe_experts=8)
    result = planner.plan(req)
    assert any(c.expert > 1 for c in result["fitting"])
    for c in result["fitting"]:
        assert 8 % c.expert == 0 and c.data % c.expert == 0


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2", "--gpu-mem", "8", "--resolution", "512"], "no layout of DiT-XL/2 at 512 px"),
    (["--gpus", "12", "--gpus-per-node", "8"], "not a whole number of nodes"),
    (["--model", "DiT-S/2", "--gpus", "64", "--global-batch", "3"], "global batch must be divisible"),
    (["--resolution", "500"], "not divisible"),
    (["--model", "DiT-XXL/2"], "unknown model"),
])
def test_impossible_requests_fail_with_a_clear_message(args, message, capsys):
    rc = planner.main(["--model", "DiT-XL/2", *args] if "--model" not in args else args)
    err = capsys.readouterr().err
    assert rc == planner.EXIT_IMPOSSIBLE
    assert err.startswith("error: ") and message in err


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.plan", "--model", "DiT-S/2", "--resolution", "256",
                           "--gpus", "2", "--gpu-mem", "16", "--global-batch", "32", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "chosen:" in proc.stdout
    assert (tmp_path / "overrides.txt").exists() and (tmp_path / "ds_config.json").exists()


def test_dit_xl_2_recipe_takes_the_planners_micro_batch_and_checkpointing():
    """configs/dit_xl_2.yaml: per stage, the micro-batch and checkpointing the planner picks for the recipe's
    target (8 nodes × 8 × 80 GiB, ZeRO-2 data parallel as cluster/train_xl.slurm runs it, bf16)."""
    from trainer.config.schema import load_config
    from trainer.config.stages import resolve_stages

    cfg = load_config(os.path.join(REPO, "configs", "dit_xl_2.yaml"))
    chosen_ckpt = []
    for stage in resolve_stages(cfg):
        req = planner.Request(model=cfg.model.name, resolution=stage.resolution, gpus=64, gpu_mem=80,
                              gpus_per_node=8, global_batch=stage.global_batch, precision=cfg.train.precision,
                              zero=2, tensor=1, pipeline=1, offload=False)
        best = planner.plan(req)["fitting"][0]
        assert (best.zero, best.tensor, best.pipeline, best.data) == (2, 1, 1, 64)
        assert stage.micro_batch == best.micro_batch, f"{stage.resolution} px: planner says micro {best.micro_batch}"
        chosen_ckpt.append(best.grad_checkpoint)
    assert cfg.model.grad_checkpoint == max(chosen_ckpt)  # one model-wide setting: on if any stage needs it
