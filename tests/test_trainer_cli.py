"""The entry point rejects bad input fast, with the key or file named and a non-zero exit."""
import subprocess
import sys

import pytest
import torch

from tests.runs import REPO, _env

MAIN = [sys.executable, "trainer/main.py", "--config", "configs/tiny.yaml"]


def _run(*args, world_size=None):
    env = _env()
    if world_size:
        env["WORLD_SIZE"] = str(world_size)
    return subprocess.run([*MAIN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["train.max_step=5"], "unknown config key 'train.max_step'"),
    (["train.lr=abc"], "'train.lr' expects a number"),
    (["train.global_batch=6", "train.micro_batch=4"], "train.global_batch=6 is not divisible by train.micro_batch"),
    (["--ds_config", "zero7.json"], "DeepSpeed config 'zero7.json' not found"),
    (["parallel.pipeline=2", "--ds_config", "zero2.json", "--validate_only"],
     "ZeRO stage 2 cannot be combined with parallel.pipeline=2"),
    (["parallel.tensor=3", "--validate_only"], "world size 4 is not divisible by parallel.tensor × parallel.pipeline"),
    (["train.compile=true", "--ds_config", "zero3.json", "--validate_only"],
     "train.compile=true does not work with ZeRO-3"),
])
def test_config_errors_exit_nonzero_naming_the_key(demo_root, args, needle):
    proc = _run(f"data.root={demo_root}", *args, world_size=4)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_missing_shards_are_named(tmp_path):
    proc = _run(f"data.root={tmp_path}/nowhere")
    assert proc.returncode == 2
    assert f"{tmp_path}/nowhere" in proc.stderr


def test_validate_only_accepts_a_good_config(demo_root):
    proc = _run(f"data.root={demo_root}", "--validate_only", world_size=2)
    assert proc.returncode == 0, proc.stderr
    assert "ok: 1 stage(s), world 2" in proc.stdout


def test_world_size_without_a_launcher_is_refused(demo_root):
    proc = _run(f"data.root={demo_root}", world_size=2)
    assert proc.returncode == 2 and "no RANK" in proc.stderr


def test_ema_update_equals_formula():
    from trainer.state.ema import EMA

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    net.register_parameter("frozen", frozen)
    ema = EMA(net, decay=0.9)
    assert ema.names == ["weight", "bias"]
    expected = [p.detach().clone() for p in (net.weight, net.bias)]
    for _ in range(3):
        with torch.no_grad():
            for p in (net.weight, net.bias):
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, (net.weight, net.bias))]
    full = ema.full_tensors()
    torch.testing.assert_close(full["weight"], expected[0])
    torch.testing.assert_close(full["bias"], expected[1])
    with pytest.raises(ValueError, match="ema_decay must be in"):
        EMA(net, decay=1.5)
