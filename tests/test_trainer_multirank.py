"""Real DeepSpeed runs on CPU ranks (gloo): ZeRO stages agree, resume is exact, bad checkpoints are skipped.

Every run trains configs/tiny.yaml on the demo shards in fp32 with the same seed, logging the loss of
every step to metrics.jsonl; the assertions compare those numbers.
"""
import glob
import os
import shutil

import pytest
import torch

from tests.runs import losses_by_step, read_metrics, run_training, start_and_kill_after_checkpoint

STEPS = 10


def _overrides(demo_root, run_dir, *extra):
    return [f"data.root={demo_root}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "log.every=1",
            "train.precision=fp32", *extra]


@pytest.fixture(scope="module")
def two_rank_runs(demo_root, tmp_path_factory):
    """Uninterrupted 2-rank runs under ZeRO-1/2/3 (reused by several tests)."""
    runs = {}
    for stage in (1, 2, 3):
        run_dir = str(tmp_path_factory.mktemp(f"zero{stage}"))
        run_training(2, _overrides(demo_root, run_dir, "checkpoint.every=5"), ds_config=f"zero{stage}.json")
        runs[stage] = run_dir
    return runs


def _assert_same_losses(a: dict, b: dict, steps, rel=1e-4):
    for s in steps:
        assert s in a and s in b, f"step {s} missing ({sorted(a)[-3:]}, {sorted(b)[-3:]})"
        assert b[s] == pytest.approx(a[s], rel=rel), f"step {s}: {a[s]} vs {b[s]}"


def test_two_ranks_zero_1_2_3_give_the_same_loss(two_rank_runs):
    ref = losses_by_step(two_rank_runs[1])
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert all(v == v and v < 10 for v in ref.values())
    for stage in (2, 3):
        _assert_same_losses(ref, losses_by_step(two_rank_runs[stage]), range(1, STEPS + 1))


def test_one_process_zero1_equals_zero3(demo_root, tmp_path):
    a, b = str(tmp_path / "z1"), str(tmp_path / "z3")
    run_training(1, _overrides(demo_root, a), ds_config="zero1.json", launcher="python")
    run_training(1, _overrides(demo_root, b), ds_config="zero3.json", launcher="python")
    _assert_same_losses(losses_by_step(a), losses_by_step(b), range(1, STEPS + 1))


def _deepspeed_shm_files() -> set:
    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


def test_cpu_process_group_skips_deepspeeds_shared_memory_allreduce(tmp_path):
    """The trainer's CPU start-up neither builds DeepSpeed's shm all-reduce op (a 35 s compile on a machine's first
    launch, used only by DeepSpeed's inference all-reduce) nor maps its /dev/shm buffer; training still reduces."""
    import subprocess
    import sys

    script = (
        "import torch, torch.distributed as dist, deepspeed.comm.comm as dc\n"
        "from trainer.engine.distributed import init_distributed\n"
        "init_distributed()\n"
        "assert dc.cdb.shm_comm_op is None, 'shm all-reduce op was built'\n"
        "t = torch.ones(3); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0, 1.0]\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert "shm_comm_op built" not in done.stdout + done.stderr


def test_sigkill_after_checkpoint_resumes_exactly(demo_root, two_rank_runs, tmp_path):
    shm_before = _deepspeed_shm_files()
    run_dir = str(tmp_path / "killed")
    over = _overrides(demo_root, run_dir, "checkpoint.every=4", "checkpoint.keep_last=5")
    k = 4
    start_and_kill_after_checkpoint(2, over, run_dir, k, ds_config="zero2.json")  # SIGKILL, all processes
    got = losses_by_step(run_dir)
    assert k in got and k + 1 not in got
    run_training(2, over, ds_config="zero2.json")
    resumed = losses_by_step(run_dir)
    ref = losses_by_step(two_rank_runs[2])
    _assert_same_losses(ref, resumed, range(k + 1, STEPS + 1), rel=1e-9)
    # DeepSpeed's CPU shared-memory buffers (69 MB per rank) are released even by SIGKILLed ranks.
    assert _deepspeed_shm_files() <= shm_before


def test_truncated_checkpoint_is_skipped_and_resume_is_exact(demo_root, two_rank_runs, tmp_path):
    from trainer.state.checkpoint import find_resumable

    run_dir = str(tmp_path / "trunc")
    shutil.copytree(two_rank_runs[2], run_dir)
    ck = os.path.join(run_dir, "checkpoints")
    newest = os.path.join(ck, "step00000010")
    victim = max((os.path.join(newest, f) for f in os.listdir(newest) if f.endswith(".pt")), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    # A save that died before publishing: never picked up either.
    os.makedirs(os.path.join(ck, ".tmp-step00000012"))
    assert find_resumable(ck) == os.path.join(ck, "step00000005")
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    proc = run_training(2, _overrides(demo_root, run_dir), ds_config="zero2.json")
    assert "skipping checkpoint" in proc.stderr + proc.stdout
    _assert_same_losses(losses_by_step(two_rank_runs[2]), losses_by_step(run_dir), range(6, STEPS + 1), rel=1e-9)


def test_flipped_byte_checkpoint_is_skipped_naming_the_file_and_resume_is_exact(demo_root, two_rank_runs, tmp_path):
    """Same-length corruption (bit rot) of the newest checkpoint: caught by its checksum at resume, the file and both
    hashes named, the previous checkpoint used; metrics.jsonl keeps every step exactly once."""
    from trainer.state.integrity import file_digest

    run_dir = str(tmp_path / "flip")
    shutil.copytree(two_rank_runs[2], run_dir)
    newest = os.path.join(run_dir, "checkpoints", "step00000010")
    victim = max((os.path.join(newest, f) for f in os.listdir(newest) if f.endswith(".pt")), key=os.path.getsize)
    size = os.path.getsize(victim)
    recorded = file_digest(victim)
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    assert os.path.getsize(victim) == size
    corrupted = file_digest(victim)  # before the run: it writes a new step-10 checkpoint over this one
    proc = run_training(2, _overrides(demo_root, run_dir), ds_config="zero2.json")
    out = proc.stderr + proc.stdout
    assert f"skipping checkpoint step00000010: {victim} has xxh3_128 {corrupted}, COMPLETE.json records " \
           f"{recorded}" in out, out[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step00000005 at step 5" in out
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps
    _assert_same_losses(losses_by_step(two_rank_runs[2]), losses_by_step(run_dir), range(6, STEPS + 1), rel=1e-9)


def test_zero3_trained_weights_export_without_unpickling(two_rank_runs, tmp_path, monkeypatch):
    """--weights model under ZeRO-3 reads the ranks' fp32 partitions (weights_only=True) and equals DeepSpeed's own
    zero_to_fp32 consolidation, which is the one place that unpickles and is used here only as the reference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.state.consolidate import consolidated_weights

    ck = os.path.join(two_rank_runs[3], "checkpoints", "step00000010")
    reference = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ck), tag=os.path.basename(ck))
    real_load = torch.load

    def safe_only(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {args[:1]}"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", safe_only)
    weights, arch = consolidated_weights(ck)
    assert set(weights) == {k for k in reference if k != "pos_embed"}
    assert all(torch.equal(weights[k], reference[k].float()) for k in weights)


def test_ema_under_zero3_equals_its_formula(demo_root, tmp_path):
    """Sharded EMA (ZeRO-3, 2 ranks), consolidated, equals d·ema + (1-d)·weights at every step."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.config.schema import load_config
    from trainer.state.consolidate import consolidated_ema
    from trainer.config.model import architecture
    from trainer.loop.seeding import seed_everything

    run_dir = str(tmp_path / "ema")
    decay = 0.5
    run_training(2, [f"data.root={demo_root}", f"run.dir={run_dir}", "train.max_steps=2", "checkpoint.every=1",
                     "checkpoint.keep_last=3", f"train.ema_decay={decay}", "log.sample_every=0"],
                 ds_config="zero3.json")
    cfg = load_config("configs/tiny.yaml")
    from trainer.config.shards import open_shard_set

    shards = open_shard_set(demo_root, 64)
    arch = architecture(cfg, in_channels=shards.latent_shape[0], input_size=shards.latent_shape[1],
                        num_classes=shards.num_classes)
    seed_everything(cfg.run.seed)
    expected = {n: p.detach().float().clone() for n, p in arch.build().named_parameters() if p.requires_grad}
    ck = os.path.join(run_dir, "checkpoints")
    for step in (1, 2):
        tag = f"step{step:08d}"
        weights = get_fp32_state_dict_from_zero_checkpoint(ck, tag=tag)
        ema, _ = consolidated_ema(os.path.join(ck, tag))
        for n in expected:
            expected[n] = decay * expected[n] + (1 - decay) * weights[n].float()
            torch.testing.assert_close(ema[n], expected[n], rtol=1e-6, atol=1e-7, msg=f"{n} at step {step}")


def test_torchrun_launch_equals_deepspeed_launch(demo_root, two_rank_runs, tmp_path):
    """The same run started by torchrun instead of the deepspeed launcher gives the same losses."""
    run_dir = str(tmp_path / "torchrun")
    run_training(2, _overrides(demo_root, run_dir, "train.max_steps=3"), ds_config="zero2.json",
                 launcher="torchrun")
    _assert_same_losses(losses_by_step(two_rank_runs[2]), losses_by_step(run_dir), range(1, 4), rel=1e-9)
