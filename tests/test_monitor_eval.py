"""Evaluation: Fréchet distance and Inception Score against hand-computed values, the ADM sample batch
written across ranks, and FID through a local TorchScript feature extractor.

Real Inception weights are not available here (nothing can be downloaded), so the end-to-end FID uses a
small TorchScript stand-in with the same calling convention; the FID arithmetic itself is checked
against closed-form values.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.monitor.fid import frechet_distance, gaussian_statistics, inception_score, load_feature_extractor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frechet_distance_of_commuting_gaussians_by_hand():
    # |(0,0)-(1,2)|^2 = 5; Tr(I) + Tr(4I) - 2 Tr(sqrt(4I)) = 2 + 8 - 8 = 2  ->  7
    assert frechet_distance([0, 0], np.eye(2), [1, 2], 4 * np.eye(2)) == pytest.approx(7.0, abs=1e-12)
    assert frechet_distance([3.0], [[9.0]], [3.0], [[9.0]]) == pytest.approx(0.0, abs=1e-12)
    # 1-D: (mu1-mu2)^2 + (s1 - s2)^2 with variances s^2
    assert frechet_distance([1.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(4 + (2 - 1) ** 2)


def test_frechet_distance_of_non_commuting_covariances_by_hand():
    s1 = np.diag([1.0, 4.0])
    s2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    # S1 S2 = [[2, 1], [4, 8]]: trace 10, det 12 -> eigenvalues 5 +- sqrt(13)
    tr_sqrt = math.sqrt(5 + math.sqrt(13)) + math.sqrt(5 - math.sqrt(13))
    expected = (1 - 0) ** 2 + (1 - 3) ** 2 + 5 + 4 - 2 * tr_sqrt
    assert frechet_distance([1, 1], s1, [0, 3], s2) == pytest.approx(expected, abs=1e-12)
    assert frechet_distance([0, 3], s2, [1, 1], s1) == pytest.approx(expected, abs=1e-12)  # symmetric


def test_fid_of_samples_converges_to_the_gaussians_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(0.5, 2.0, size=(20000, 3))
    # 3 * 0.5^2 + 3 * (1 - 2)^2 = 3.75
    assert frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b)) == pytest.approx(3.75, rel=0.05)
    with pytest.raises(ValueError):
        frechet_distance([0, 0], np.eye(2), [0], np.eye(1))


def test_inception_score_by_hand():
    k = 5
    one_hot = np.eye(k)[np.arange(100) % k]  # confident and evenly spread: IS = number of classes
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(k, rel=1e-6)
    uniform = np.full((100, k), 1.0 / k)  # no confidence: IS = 1
    assert inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0))


class _StandIn(torch.nn.Module):
    """TorchScript stand-in for an Inception network: per-channel means/stds as 'features', 10-way logits."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = x.float() / 255.0
        feats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (N, 6)
        if return_features:
            return feats
        w = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 60.0
        return torch.softmax(feats @ w * 10.0, dim=1)


@pytest.fixture(scope="module")
def standin_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "standin.pt")
    torch.jit.script(_StandIn()).save(path)
    return path


def test_feature_extractor_loads_torchscript_from_a_local_path(standin_path):
    ex = load_feature_extractor(standin_path)
    imgs = np.random.default_rng(0).integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)
    feats, probs = ex(imgs, batch_size=3)
    assert feats.shape == (7, 6) and probs.shape == (7, 10)
    np.testing.assert_allclose(feats[:, :3], imgs.reshape(7, -1, 3).mean(1) / 255.0, rtol=1e-5)


@pytest.fixture(scope="module")
def eval_run(demo_root, tmp_path_factory):
    """A run dir with the tiny config on the demo shards and a hand-made checkpoint of random EMA weights."""
    from trainer.config.schema import load_config, save_config
    from trainer.config.shards import open_shard_set
    from trainer.config.model import architecture

    run = tmp_path_factory.mktemp("eval_run")
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), [f"data.root={demo_root}", f"run.dir={run}"])
    save_config(cfg, str(run / "config.yaml"))
    shards = open_shard_set(demo_root, 64)
    arch = architecture(cfg, in_channels=shards.latent_shape[0], input_size=shards.latent_shape[1],
                        num_classes=shards.num_classes)
    torch.manual_seed(0)
    model = arch.build()
    tensors = {n: torch.randn_like(p) * 0.05 for n, p in model.named_parameters() if p.requires_grad}
    ck = run / "checkpoints" / "step00000004"
    ck.mkdir(parents=True)
    torch.save({"tensors": tensors}, ck / "ema.pt")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 4, "model_config": arch.to_dict()}))
    sizes = {f: os.path.getsize(ck / f) for f in ("ema.pt", "trainer_state.json")}
    (ck / "COMPLETE.json").write_text(json.dumps({"files": sizes}))
    return str(run), shards.num_classes


def _evaluate(args, nprocs=1):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nprocs == 1:
        cmd = [sys.executable, "-m", "trainer.evaluate", *args]
    else:
        from trainer.engine.distributed import free_port

        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_port",
               str(port), "-m", "trainer.evaluate", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_two_ranks_write_the_same_adm_sample_batch_as_one_and_fid_is_recorded(eval_run, standin_path, tmp_path):
    from trainer.monitor.fid import FeatureExtractor

    run, classes = eval_run
    common = ["--per-class", "3", "--steps", "3", "--cfg-scale", "2.0", "--method", "ddim", "--batch-size", "4"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _evaluate([run, *common, "--out", one, "--no-record"])
    ref = str(tmp_path / "ref.npz")
    rng = np.random.default_rng(1)
    np.savez(ref, arr_0=rng.integers(0, 256, size=(32, 64, 64, 3), dtype=np.uint8))
    _evaluate([run, *common, "--out", two, "--inception", standin_path, "--ref", ref], nprocs=2)
    n = 3 * classes
    a = np.load(os.path.join(one, f"samples_{n}x64x64x3.npz"))
    b = np.load(os.path.join(two, f"samples_{n}x64x64x3.npz"))
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (n, 64, 64, 3)
    assert a["arr_1"].tolist() == [c for c in range(classes) for _ in range(3)] == b["arr_1"].tolist()
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.99  # same samples whichever ranks drew them
    assert a["arr_0"].std() > 5  # real images, not a constant
    assert not [f for f in os.listdir(two) if f.startswith(".part")]
    records = [json.loads(line) for line in open(os.path.join(run, "evals.jsonl"))]
    assert len(records) == 1 and records[0]["step"] == 4 and records[0]["world_size"] == 2
    ex = FeatureExtractor(standin_path)
    fa, _ = ex(b["arr_0"])
    fr, _ = ex(np.load(ref)["arr_0"])
    expected = frechet_distance(*gaussian_statistics(fa), *gaussian_statistics(fr))
    # a 6-d stand-in is not Inception-v3 pool3: its distance is not called FID, and no Inception Score is given
    assert "fid" not in records[0] and "inception_score" not in records[0]
    assert records[0]["fd_standin"] == pytest.approx(expected, rel=1e-6) and records[0]["fd_standin"] > 0
    fe = records[0]["feature_extractor"]
    assert fe["name"] == "standin" and fe["dim"] == 6 and len(fe["sha256"]) == 64
    from trainer.tools.status import run_status

    shown = run_status(run, query_slurm=False)["fid"]
    assert shown["metric"] == "fd_standin" and shown["fid"] == pytest.approx(expected, rel=1e-6)
