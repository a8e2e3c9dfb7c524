"""Monitoring arithmetic and alert logic without a training run: MFU, quartiles, MoE load,
NaN-step skipping on a plain optimizer, the stall watchdog (driven by explicit times), W&B scrubbing,
sink isolation, and the report tool."""
import json
import math
import os

import pytest
import torch

from trainer.monitor import telemetry
from trainer.monitor.faults import fault_nan_steps
from trainer.monitor.nan_guard import NanGuard, basic_optimizer, optimizer_update_skipped
from trainer.monitor.watchdog import Watchdog
from trainer.monitor.metrics import JsonlSink, Metrics
from trainer.rundir import read_jsonl


def test_mfu_formula_by_hand():
    # DiT-S/2-like: 36.3 GFLOP per training sample, 7 samples/s on 1 device of 437 GFLOP/s peak -> 58 %
    assert telemetry.mfu(36.3e9, 7.0, 1, 0.437) == pytest.approx(36.3e9 * 7 / 437e9)
    # 8 devices share the global throughput
    assert telemetry.mfu(712e9, 800.0, 8, 989.0) == pytest.approx(712e9 * 100 / 989e12)
    assert math.isnan(telemetry.mfu(1e9, 1.0, 1, 0.0))


def test_model_flops_match_the_dit_paper():
    from models.dit import DiT

    with torch.device("meta"):
        s2 = DiT(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6)
    assert s2.flops_per_sample(train=False) == pytest.approx(12.1e9, rel=0.01)  # 6.06 GMACs
    assert s2.flops_per_sample(train=True) == 3 * s2.flops_per_sample(train=False)


def test_peak_table_and_config_override():
    assert telemetry.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert telemetry.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert telemetry.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0  # fp32 matmuls on TF32 cores
    assert telemetry.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5  # train.tf32=false: plain fp32
    assert telemetry.gpu_peak_tflops("Tesla V100-SXM2-32GB", "tf32") == 15.7  # no TF32 units: the fp32 peak
    assert telemetry.gpu_peak_tflops("Some New Accelerator", "bf16") is None
    assert telemetry.peak_tflops(123.0, torch.device("cpu"), "bf16") == (123.0, "config log.peak_tflops")
    measured, source = telemetry.peak_tflops(0, torch.device("cpu"), "fp32")
    assert 0.001 < measured < 100 and "measured" in source


def test_loss_by_timestep_quartile():
    t = torch.tensor([0, 249, 250, 500, 999, 998])
    loss = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    sums = telemetry.timestep_bin_sums(t, loss, 1000.0)
    assert sums.tolist() == [4.0, 5.0, 7.0, 20.0, 2.0, 1.0, 1.0, 2.0]
    q = telemetry.quartile_means(sums + telemetry.timestep_bin_sums(torch.tensor([0.3]), torch.tensor([1.0]), 1.0))
    assert q == {"loss_q0": 2.0, "loss_q1": 3.0, "loss_q2": 7.0, "loss_q3": 10.0}
    assert math.isnan(telemetry.quartile_means(torch.zeros(8))["loss_q2"])


def test_moe_summary():
    stats = [{"expert_counts": torch.tensor([30, 10, 0, 0]), "dropped_fraction": 0.1, "balance_loss": 2.0},
             {"expert_counts": torch.tensor([10, 10, 10, 10]), "dropped_fraction": 0.0, "balance_loss": 1.0}]
    out = telemetry.moe_summary(stats)
    assert out["moe_load_e0"] == pytest.approx((0.75 + 0.25) / 2) and out["moe_load_e3"] == pytest.approx(0.125)
    assert out["moe_max_load"] == pytest.approx(3.0)  # 75 % of tokens on one of 4 experts
    assert out["moe_drop_rate"] == pytest.approx(0.05) and out["moe_balance_loss"] == pytest.approx(1.5)
    assert telemetry.moe_summary([]) == {}


def test_memory_and_eta():
    m = telemetry.memory_stats(torch.device("cpu"))
    assert 0.01 < m["rss_gb"] <= m["max_rss_gb"] + 0.01
    assert telemetry.eta_seconds(40, 100, 2.0) == 120.0 and telemetry.eta_seconds(100, 100, 2.0) == 0.0


def test_fault_hook_parsing():
    assert fault_nan_steps({"DIT_FAULT_NAN_STEPS": "5, 6"}) == {5, 6}
    assert fault_nan_steps({}) == frozenset()


class _Engine:
    """Just enough of a DeepSpeed engine: a wrapper optimizer around the torch one."""

    def __init__(self, opt):
        self.optimizer = type("Wrapper", (), {"optimizer": opt})()


def test_skipped_optimizer_update_leaves_weights_and_adam_state_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    engine = _Engine(opt)
    assert basic_optimizer(engine) is opt
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: v.clone() for k, v in opt.state[model.weight].items()}
    (model(torch.randn(2, 4)).sum() * float("nan")).backward()  # NaN gradients
    with optimizer_update_skipped(engine):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(adam[k], v) for k, v in opt.state[model.weight].items())
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # the real step is back after the block
    assert not torch.equal(before["weight"], model.weight)
    g = NanGuard(2)
    assert g.any_nonfinite(torch.tensor(float("inf"))) and not g.any_nonfinite(torch.tensor(1.0))
    g.update(True)
    assert not g.should_stop
    g.update(True)
    assert g.should_stop
    g.update(False)
    assert g.in_row == 0


def test_stall_is_flagged_alerted_once_and_cleared(tmp_path, capsys):
    from trainer.tools.status import run_status

    run = str(tmp_path)
    metrics = Metrics([JsonlSink(run)])
    clock = [1000.0]
    from trainer.state.lease import Lease

    lease = Lease(run, timeout=300)  # a live run holds the run directory; status reads its holder
    lease.acquire()
    dog = Watchdog(run, stall_seconds=60, interval=1, alert=metrics.alert, clock=lambda: clock[0], lease=lease)
    dog.beat(5)
    assert dog.check(now=1030.0) is False
    hb = json.load(open(os.path.join(run, "heartbeat.json")))
    assert hb["step"] == 5 and hb["stalled"] is False and hb["time"] == 1030.0
    assert dog.check(now=1061.0) is True
    assert dog.check(now=1100.0) is True  # still stalled: no second alert
    alerts = [e for e in read_jsonl(os.path.join(run, "events.jsonl")) if e["event"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [("stall", "ERROR")]
    assert "[alert] stall: no optimizer step for 1.0 min" in capsys.readouterr().err
    s = run_status(run, now=1101.0, stall_minutes=1, query_slurm=False)
    assert s["state"] == "stalled" and "STALL" in s["flags"]
    clock[0] = 1102.0
    dog.beat(6)
    assert dog.check(now=1103.0) is False
    alerts = [e for e in read_jsonl(os.path.join(run, "events.jsonl")) if e["event"] == "alert"]
    assert [a["title"] for a in alerts] == ["stall", "stall cleared"]
    assert run_status(run, now=1104.0, stall_minutes=1, query_slurm=False)["state"] == "running"
    dog.stop("finished")  # the final heartbeat says so; no stall alert at shutdown
    lease.release()
    assert json.load(open(os.path.join(run, "heartbeat.json")))["state"] == "finished"


def test_watchdog_thread_writes_heartbeats(tmp_path):
    import time

    dog = Watchdog(str(tmp_path), stall_seconds=3600, interval=0.05, alert=lambda *a: None).start()
    path = os.path.join(str(tmp_path), "heartbeat.json")
    first = json.load(open(path))["time"]
    deadline = time.time() + 20
    while json.load(open(path))["time"] == first and time.time() < deadline:
        time.sleep(0.05)
    dog.stop("finished")
    assert json.load(open(path))["time"] > first


def test_scrub_removes_credentials_at_any_depth():
    from trainer.monitor.wandb_sink import scrub

    cfg = {"log": {"wandb": {"project": "p", "api_key": "x"}}, "hf_token": "y", "list": [{"password": 1, "ok": 2}]}
    assert scrub(cfg) == {"log": {"wandb": {"project": "p"}}, "list": [{"ok": 2}]}


def test_a_failing_sink_never_stops_the_others_and_is_dropped(tmp_path, capsys):
    class Broken:
        def log(self, record):
            raise RuntimeError("W&B is down")

    good = JsonlSink(str(tmp_path))
    m = Metrics([good, Broken()])
    for step in range(Metrics.MAX_FAILURES + 2):
        m.log({"step": step, "loss": 1.0})
    assert len(read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))) == Metrics.MAX_FAILURES + 2
    assert m.sinks == [good] and "dropped" in capsys.readouterr().err


def test_wandb_failure_at_init_leaves_training_without_wandb(tmp_path, monkeypatch, capsys):
    from trainer.config.schema import load_config
    from trainer.monitor.wandb_sink import make_wandb_sink

    cfg = load_config(None, ["log.wandb.mode=offline"])
    monkeypatch.setattr("wandb.init", lambda **kw: (_ for _ in ()).throw(RuntimeError("no network")))
    assert make_wandb_sink(cfg, str(tmp_path)) is None
    assert "W&B disabled for this run: no network" in capsys.readouterr().err


def test_report_writes_plots_and_markdown(tmp_path):
    from trainer.tools.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 31):
            f.write(json.dumps({"step": s, "loss": 1 / s, "mse": 0.9 / s, "vb": 0.1 / s, "loss_q0": 0.5, "loss_q3": 2.0,
                                "lr": 1e-4, "grad_norm": 0.5, "samples_per_sec": 100.0, "mfu": 0.4,
                                "step_time": 0.1, "fwd_time": 0.03, "bwd_time": 0.05, "rss_gb": 1.0,
                                "skipped_steps": 0, "stage": 0, "resolution": 256}) + "\n")
    (run / "evals.jsonl").write_text(json.dumps({"step": 30, "fid": 12.5, "num_samples": 1000}) + "\n")
    (run / "events.jsonl").write_text(json.dumps({"event": "finished", "step": 30}) + "\n")
    path = write_report(str(run))
    text = open(path).read()
    for png in ("loss.png", "throughput.png", "optim.png", "memory.png", "fid.png"):
        assert os.path.getsize(run / "report" / png) > 5000 and f"]({png})" in text
    assert "**finished**" in text and "| 30 | 1000 |" in text and "12.50" in text


def test_loss_plot_leaves_out_the_vb_panel_of_a_run_without_one():
    from trainer.tools.report import loss_panels

    diffusion = [{"step": s, "loss": 1.0, "mse": 0.9, "vb": 0.1} for s in range(1, 4)]
    flow = [{"step": s, "loss": 1.0, "mse": 1.0, "vb": 0.0} for s in range(1, 4)]  # models/flow.py logs vb = 0
    assert [name for name, _ in loss_panels(diffusion)] == ["loss", "vb", "loss by t quartile"]
    assert [name for name, _ in loss_panels(flow)] == ["loss", "loss by t quartile"]
