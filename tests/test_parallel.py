"""Model parallelism composed with ZeRO: tensor, pipeline and expert parallelism on CPU ranks (gloo, fp32).

Every multi-rank test trains configs/tiny.yaml (depth 4 for the dense runs) on the demo shards for 10 steps
with the same seed and compares the per-step losses in metrics.jsonl. Data, noise, timesteps and label
dropout depend on the global batch and each sample's position only (the elastic stream), so every layout must
reproduce the single process: TP/PP with data-parallel size 1, DP=2, DP=2×TP=2, and MoE with EP=2 equals EP=1
(1e-4 relative).
Gradient clipping (0.3) is active in every step, so the global gradient norm across slices is checked too.
"""
import glob
import os
import shutil

import pytest
import torch

from tests.runs import losses_by_step, read_metrics, run_training

STEPS = 10
DENSE = ["model.depth=4"]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.25"]


def _over(demo_root, run_dir, *extra):
    return [f"data.root={demo_root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", "train.grad_clip=0.3", "checkpoint.every=5", "checkpoint.keep_last=3", *extra]


# name -> (ranks, ds config, overrides). Comments: the ZeRO × layout cell each run backs (docs/parallelism.md).
RUNS = {
    "single": (1, "zero1.json", DENSE),
    "tp2": (2, "zero2.json", DENSE + ["parallel.tensor=2", "model.grad_checkpoint=1"]),  # ZeRO-2 × TP
    "pp2": (2, "zero1.json", DENSE + ["parallel.pipeline=2"]),  # ZeRO-1 × PP
    "tp2pp2": (4, "zero1.json", DENSE + ["parallel.tensor=2", "parallel.pipeline=2",
                                         "model.grad_checkpoint=1"]),  # ZeRO-1 × TP × PP
    "dp2": (2, "zero1.json", DENSE),
    "dp2tp2": (4, "zero1.json", DENSE + ["parallel.tensor=2"]),  # ZeRO-1 × DP × TP
    "ep1": (2, "zero1.json", MOE),  # ZeRO-1 × MoE (EP=1)
    "ep2": (2, "zero2.json", MOE + ["parallel.expert=2", "model.grad_checkpoint=1"]),  # ZeRO-2 × EP
}


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    out = {}
    for name, (n, ds, extra) in RUNS.items():
        run_dir = str(tmp_path_factory.mktemp(name))
        run_training(n, _over(demo_root, run_dir, *extra), ds_config=ds, launcher="python" if n == 1 else "deepspeed",
                     timeout=600)
        out[name] = run_dir
    return out


def _same(a: dict, b: dict, rel=1e-4, steps=range(1, STEPS + 1)):
    for s in steps:
        assert s in a and s in b, f"step {s} missing: {sorted(a)} vs {sorted(b)}"
        assert b[s] == pytest.approx(a[s], rel=rel), f"step {s}: {a[s]} vs {b[s]}"


# --------------------------------------------------------------------------- loss equality


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_model_parallel_with_data_parallel_size_1_equals_one_process(runs, layout):
    ref = losses_by_step(runs["single"])
    assert sorted(ref) == list(range(1, STEPS + 1))
    _same(ref, losses_by_step(runs[layout]))
    # clipping was active (norm > 0.3), and the global gradient norm over the slices equals the full model's
    norms_ref = {r["step"]: r["grad_norm"] for r in read_metrics(runs["single"]) if "grad_norm" in r}
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(runs[layout]) if "grad_norm" in r}
    assert min(norms_ref.values()) > 0.3
    _same(norms_ref, norms, rel=1e-3)


def test_dp2_tp2_equals_dp2(runs):
    _same(losses_by_step(runs["dp2"]), losses_by_step(runs["dp2tp2"]))
    # The elastic data stream makes the data-parallel size invisible: DP=2 trains the one-process run (each rank
    # reads its own half of every global batch, tests/test_data_elastic.py; per-sample noise follows the sample).
    # Before the elastic stream this asserted the opposite (each DP rank drew its own data and noise).
    _same(losses_by_step(runs["single"]), losses_by_step(runs["dp2"]))


def test_moe_ep2_equals_ep1_and_logs_expert_load(runs):
    _same(losses_by_step(runs["ep1"]), losses_by_step(runs["ep2"]))
    last = [r for r in read_metrics(runs["ep2"]) if "loss" in r][-1]
    loads = [v for k, v in last.items() if k.startswith("moe_load_e")]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0, rel=1e-6)
    assert last["moe_max_load"] >= 1.0 and 0.0 <= last["moe_drop_rate"] < 1.0 and last["moe_balance_loss"] > 0


def test_moe_ep2_checkpoint_holds_every_expert_once(runs):
    from trainer.state.consolidate import consolidated_ema

    ema, arch = consolidated_ema(os.path.join(runs["ep2"], "checkpoints", "step00000010"))
    experts = {k.split(".experts.")[1].split(".")[0] for k in ema if ".experts." in k}
    assert experts == {"0", "1", "2", "3"}
    result = arch.build().load_state_dict(ema, strict=False)  # plain DiT with models/moe.py FFNs
    assert [k for k in result.missing_keys if k != "pos_embed"] == [] and result.unexpected_keys == []


# --------------------------------------------------------------------------- checkpoints and export


def test_tp2_pp2_checkpoint_resumes_exactly(runs, demo_root, tmp_path):
    from trainer.state.checkpoint import find_resumable

    src = runs["tp2pp2"]
    run_dir = str(tmp_path / "resume")
    shutil.copytree(src, run_dir)
    ck = os.path.join(run_dir, "checkpoints")
    shutil.rmtree(os.path.join(ck, "step00000010"))
    assert find_resumable(ck) == os.path.join(ck, "step00000005")
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    n, ds, extra = RUNS["tp2pp2"]
    run_training(n, _over(demo_root, run_dir, *extra), ds_config=ds, timeout=600)
    got = losses_by_step(run_dir)
    assert sorted(got) == list(range(6, STEPS + 1))
    _same(losses_by_step(src), got, rel=1e-9, steps=range(6, STEPS + 1))


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_tp2_pp2_export_loads_into_single_process_model(runs, tmp_path, weights):
    from models.args import DiTArgs
    from trainer.tools.export import export_official
    def load(run):
        path = export_official(os.path.join(runs[run], "checkpoints", "step00000010"),
                               str(tmp_path / f"{run}.pt"), weights=weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        import json

        with open(os.path.splitext(path)[0] + ".json") as f:
            arch = json.load(f)
        model = DiTArgs.from_dict(arch).build()
        model.load_state_dict(state, strict=True)  # official keys, nothing missing or extra
        return model.eval(), state

    par, par_state = load("tp2pp2")
    ref, ref_state = load("single")
    assert set(par_state) == set(ref_state)
    assert all(par_state[k].shape == ref_state[k].shape for k in ref_state)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(par(x, t, y), ref(x, t, y), rtol=1e-4, atol=1e-5)
    files = os.listdir(os.path.join(runs["tp2pp2"], "checkpoints", "step00000010"))
    assert sum(f.startswith("ema_rank") for f in files) == 4 and sum(f.startswith("model_rank") for f in files) == 4


# --------------------------------------------------------------------------- layouts rejected up front

BAD = [
    # (world, overrides, ds config, words the message must contain)
    (3, ["parallel.tensor=2"], "zero1.json", ["not divisible by parallel.tensor × parallel.pipeline", "multiple of 2"]),
    (2, ["parallel.pipeline=2"], "zero2.json", ["ZeRO stage 2", "pipeline", "zero1.json"]),
    (2, ["parallel.pipeline=2"], "zero3.json", ["ZeRO stage 3", "pipeline"]),
    (2, ["parallel.tensor=2", "model.num_heads=3", "model.hidden_size=48"], "zero1.json", ["num_heads=3", "parallel.tensor=2"]),
    (4, ["parallel.pipeline=4", "model.depth=2"], "zero1.json", ["exceed the model depth 2"]),
    (2, ["parallel.expert=2", "model.moe.num_experts=3", "model.moe.top_k=1"], "zero2.json", ["num_experts=3", "parallel.expert=2"]),
    (2, ["parallel.expert=2"], "zero2.json", ["needs an MoE model"]),
    (2, ["parallel.tensor=2"], "zero3.json", ["ZeRO stage 3", "parallel.tensor=2"]),
    (2, ["parallel.tensor=2", "model.moe.num_experts=4"], "zero1.json", ["MoE", "parallel.tensor=1"]),
]


@pytest.mark.parametrize("world,extra,ds,words", BAD)
def test_invalid_layout_is_rejected_with_what_to_change(demo_root, tmp_path, world, extra, ds, words):
    from trainer.config.schema import ConfigError, load_config
    from trainer.config.ds_json import load_ds_config
    from trainer.config.topology import LayoutError
    from trainer.config.validate import validate_run

    cfg = load_config("configs/tiny.yaml", [f"data.root={demo_root}", f"run.dir={tmp_path}", *extra])
    with pytest.raises((LayoutError, ConfigError)) as info:
        validate_run(cfg, load_ds_config(ds), world)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_hidden_not_divisible_by_tensor_size_is_rejected():
    from trainer.config.topology import LayoutError, Topology

    with pytest.raises(LayoutError, match="hidden_size=66 is not divisible by parallel.tensor=4"):
        Topology(4, tensor=4).validate(hidden_size=66)


def test_invalid_layout_fails_before_workers_start(demo_root, tmp_path):
    proc = run_training(2, [f"data.root={demo_root}", f"run.dir={tmp_path}", "parallel.pipeline=2"],
                        ds_config="zero2.json", check=False, timeout=300)
    assert proc.returncode != 0
    assert "DeepSpeed's pipeline engine accepts ZeRO-0/1 only" in proc.stderr + proc.stdout
    assert not glob.glob(os.path.join(str(tmp_path), "checkpoints", "*"))


# --------------------------------------------------------------------------- units


def test_topology_matches_deepspeed_pipeline_grid():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from trainer.config.topology import Topology

    for world, tp, pp in [(8, 2, 2), (8, 2, 1), (8, 1, 2), (4, 4, 1), (12, 2, 3)]:
        topo = Topology(world, tp, pp)
        ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=topo.data)
        for r in range(world):
            c, d = topo.coords(r), ds.get_coord(r)
            assert (c.pipe, c.data, c.tensor) == (d.pipe, d.data, d.model)
        assert sorted(map(sorted, ds.get_axis_comm_lists("model"))) == sorted(topo.groups("tensor")) or tp == 1
        assert sorted(map(sorted, ds.get_axis_comm_lists("data"))) == sorted(topo.groups("data")) or topo.data == 1
        assert sorted(map(sorted, ds.get_axis_comm_lists("pipe"))) == sorted(topo.groups("pipeline")) or pp == 1


def test_qkv_split_takes_each_ranks_heads_from_q_k_and_v():
    from models.parallel.tensor import QKV, merge_tensor_slices, slice_qkv

    heads, hd, size = 4, 3, 2
    d = heads * hd
    w = torch.arange(3 * d * 5, dtype=torch.float32).reshape(3 * d, 5)
    parts = [slice_qkv(w, r, size) for r in range(size)]
    # rank 1 holds heads 2, 3 of q, of k and of v
    q, k, v = w.chunk(3)
    torch.testing.assert_close(parts[1], torch.cat([q[6:], k[6:], v[6:]]))
    torch.testing.assert_close(merge_tensor_slices(parts, QKV), w)
    torch.testing.assert_close(merge_tensor_slices([w[:, :2], w[:, 2:]], 1), w)


def test_pipeline_partition_by_parameters_uniform_and_given_split():
    from models.parallel.pipeline import partition_bounds

    counts = [10, 5, 5, 5, 5, 3]  # embed, 4 blocks, final
    assert partition_bounds(counts, 2, "parameters") == [0, 2, 6]
    assert partition_bounds(counts, 2, "uniform") == [0, 3, 6]
    assert partition_bounds(counts, 2, "3,1") == [0, 4, 6]
    assert partition_bounds(counts, 4, "parameters") == [0, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="summing to the depth 4"):
        partition_bounds(counts, 2, "1,1")


def test_pipeline_and_moe_names_map_to_official_keys():
    from models.parallel.moe import moe_name_map
    from models.parallel.pipeline import pipeline_name_map

    m = pipeline_name_map(["0.x_embedder.proj.weight", "0.pos_embed", "3.block.attn.qkv.weight",
                           "5.final_layer.linear.bias"], depth=4)
    assert list(m.values()) == ["x_embedder.proj.weight", "pos_embed", "blocks.2.attn.qkv.weight",
                                "final_layer.linear.bias"]
    m = moe_name_map(["blocks.1.mlp.moe.deepspeed_moe.gate.wg.weight",
                      "blocks.1.mlp.moe.deepspeed_moe.experts.deepspeed_experts.1.fc2.bias", "blocks.0.mlp.fc1.weight"],
                     num_local=2, ep_rank=1)
    assert list(m.values()) == ["blocks.1.mlp.router.gate.weight", "blocks.1.mlp.experts.3.fc2.bias",
                                "blocks.0.mlp.fc1.weight"]


def _tp_worker(rank, world, port, out):
    import torch.distributed as dist

    from models.dit import DiT
    from models.parallel.tensor import tensor_parallelize
    from trainer.engine.parallelize import ModelParallelUnit
    from trainer.config.topology import Topology

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5,
              ffn="gelu")
    full = DiT(**kw)
    for p in full.parameters():  # non-zero adaLN/head so every path matters
        torch.nn.init.normal_(p, std=0.05) if p.requires_grad else None
    ref = DiT(**kw)
    ref.load_state_dict(full.state_dict())
    mpu = ModelParallelUnit(Topology(world, tensor=world), rank)
    mpu.install_fairscale()
    tensor_parallelize(full, rank, world)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([3, 700]), torch.tensor([1, 4])
    out_tp = full(x, t, y)
    out_tp.square().mean().backward()
    out_ref = ref(x, t, y)
    out_ref.square().mean().backward()
    torch.testing.assert_close(out_tp, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.blocks[0].adaLN_modulation[1].weight.grad,
                               ref.blocks[0].adaLN_modulation[1].weight.grad.chunk(world)[rank], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(full.t_embedder.mlp[0].weight.grad, ref.t_embedder.mlp[0].weight.grad,
                               rtol=1e-4, atol=1e-7)
    n_tp = sum(p.numel() for p in full.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    torch.save({"tp": n_tp, "ref": n_ref}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_tensor_parallel_forward_backward_equal_full_model_and_slice_parameters(tmp_path):
    """2 gloo processes, no DeepSpeed: TP outputs/gradients equal the full model's; weights per rank ~halve."""
    import torch.multiprocessing as mp

    from trainer.engine.distributed import free_port

    mp.spawn(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    counts = torch.load(tmp_path / "0.pt")
    assert counts["tp"] < 0.6 * counts["ref"]
