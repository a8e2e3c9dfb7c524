"""The divergence pieces without a training run: the spike detector, the fault hooks on a real DiT, the applied-step
and LR decisions, the pipeline's local check, the rollback's data windows and setting checkpoints aside."""
import json
import math
import os
import random

import pytest
import torch

from trainer.loop.rollback import consumed_windows, merge_windows, window_at
from trainer.monitor.divergence import DivergenceDetector, filter_length
from trainer.monitor.faults import ActivationFault, FaultSpec, dit_blocks, fault_specs, parse_fault_spec
from trainer.monitor.nan_guard import local_nonfinite, realign_lr, step_applied


def _healthy(n, seed=0, every=1):
    """Records like a healthy small-batch run: each quartile's loss swings 3-5x from step to step (lognormal)
    around its own level, and some quartiles are missing (no sample drew that timestep range)."""
    rng = random.Random(seed)
    levels = [0.5, 0.1, 0.02, 0.01]
    out = []
    for step in range(every, every * n + 1, every):
        r = {"step": step, "stage": 0, "resolution": 64}
        for k, level in enumerate(levels):
            r[f"loss_q{k}"] = level * math.exp(rng.gauss(0, 0.45)) if rng.random() > 0.25 else float("nan")
        r["loss"] = sum(v for k, v in r.items() if k.startswith("loss_q") and v == v) / 4
        out.append(r)
    return out


def _scaled(record, factor):
    return {k: (v * factor if k.startswith("loss") and isinstance(v, float) else v) for k, v in record.items()}


def test_detector_is_quiet_on_noise_the_old_rule_alerts_on():
    records = _healthy(2000)
    d = DivergenceDetector(factor=3.0, budget=1e-4, log_every=1)
    verdicts = [d.update(r) for r in records]
    assert sum(v is not None and v.alert for v in verdicts) == 0
    # the rule it replaces: raw loss above 3x the median of the last 50 finite losses
    old, hist = 0, []
    for r in records:
        if len(hist) >= 10 and r["loss"] > 3 * sorted(hist[-50:])[len(hist[-50:]) // 2]:
            old += 1
        hist.append(r["loss"])
    assert old >= 5, old  # the noise is realistic: the raw rule cries wolf on it
    untimed = DivergenceDetector(factor=3.0, budget=1e-4, log_every=1, by_timestep=False)
    for r in records:
        untimed.update(r)
    # matching timesteps is what keeps the threshold at the factor: the loss alone spreads so much that the
    # budget pushes its threshold far up (and a 10x excursion can hide under it)
    assert math.exp(d.threshold_log()) == pytest.approx(3.0) and math.exp(untimed.threshold_log()) > 4.0


@pytest.mark.parametrize("onset", [40, 41, 97, 250])
def test_a_10x_excursion_of_5_steps_is_caught_on_its_second_step_and_alerted_once(onset):
    records = _healthy(300, seed=3)
    d = DivergenceDetector(factor=3.0, log_every=1, sustain=4)
    verdicts = [d.update(_scaled(r, 10.0) if onset <= r["step"] < onset + 5 else r) for r in records]
    alerts = [v for v in verdicts if v is not None and v.alert]
    assert [v.step for v in alerts] == [onset + 1] and alerts[0].onset_step == onset
    spikes = [v.step for v in verdicts if v is not None and v.spike]
    assert spikes == list(range(onset + 1, onset + 6))  # the median filter lags one record at both ends
    sustained = [v.step for v in verdicts if v is not None and v.sustained]
    assert sustained == [onset + 4, onset + 5]  # sustain=4 records in a row: a blow-up


def test_one_unlucky_step_never_alerts_at_log_every_1_but_a_10s_record_does():
    records = _healthy(100, seed=5)
    d = DivergenceDetector(log_every=1)
    assert not any((v := d.update(_scaled(r, 20.0) if r["step"] == 60 else r)) and v.alert for r in records)
    assert filter_length(1) == 3 and filter_length(2) == 2 and filter_length(10) == 1
    d10 = DivergenceDetector(log_every=10)
    verdicts = [d10.update(_scaled(r, 5.5) if r["step"] == 600 else r) for r in _healthy(100, seed=5, every=10)]
    assert [v.step for v in verdicts if v is not None and v.alert] == [600]
    assert next(v for v in verdicts if v is not None and v.alert).onset_step == 591  # the record covers 591..600


def test_threshold_rises_with_the_spread_and_the_budget():
    noisy = _healthy(400, seed=1)
    for r in noisy:  # a much noisier run than the factor allows for
        for k in range(4):
            v = r[f"loss_q{k}"]
            r[f"loss_q{k}"] = v * math.exp(random.Random(r["step"] * 7 + k).gauss(0, 1.2)) if v == v else v
    tight, loose = DivergenceDetector(budget=1e-6), DivergenceDetector(budget=0.2)
    for r in noisy:
        tight.update(r)
        loose.update(r)
    assert math.exp(tight.threshold_log()) > 3.0 and tight.threshold_log() > loose.threshold_log()
    assert math.exp(loose.threshold_log()) == pytest.approx(3.0)  # never below the factor


def test_a_new_stage_starts_fresh_and_a_sustained_blowup_stays_out_of_the_baseline():
    d = DivergenceDetector(log_every=1, sustain=5)
    for r in _healthy(60):
        d.update(r)
    assert d.update({"step": 61, "stage": 1, "resolution": 128, "loss_q0": 50.0}) is None  # no baseline yet
    d = DivergenceDetector(log_every=1, sustain=5)
    for r in _healthy(60):
        d.update(r)
    blown = [d.update(_scaled(r, 8.0)) for r in _healthy(60, seed=9)[:40]]
    assert all(v.spike for v in blown[1:]) and blown[-1].sustained  # 39 records in a row: still a blow-up
    d.reset_excursion()
    assert d.update(_healthy(1, seed=2)[0]).in_row == 0
    pipeline = DivergenceDetector(log_every=1)  # no quartiles logged: the loss against its own history
    verdicts = [pipeline.update({"step": i, "stage": 0, "loss": 0.2 * (10 if i in (30, 31) else 1)})
                for i in range(1, 40)]
    assert [v.step for v in verdicts if v is not None and v.alert] == [31]
    assert DivergenceDetector(factor=0).update(_healthy(1)[0]) is None  # off


def test_fault_specs_parse_and_select_steps_and_data():
    spec = parse_fault_spec("steps=3,4; ranks=0,1; micro=1; block=2; kind=grad_nan")
    assert spec == FaultSpec(steps=frozenset({3, 4}), ranks=frozenset({0, 1}), micro=1, block=2, kind="grad_nan")
    by_data = parse_fault_spec("samples=64-79")
    assert [by_data.hits_step(s, 8 * (s - 1), 8) for s in (8, 9, 10, 11)] == [False, True, True, False]
    inside = parse_fault_spec("samples=60-61")  # two samples inside step 8's batch [56, 64)
    assert [inside.hits_step(s, 8 * (s - 1), 8) for s in (7, 8, 9)] == [False, True, False]
    assert len(fault_specs("X", {"X": "steps=1 | samples=0-3;kind=overflow"})) == 2
    for bad in ("steps=1;kind=boom", "ranks=1", "samples=9-3", "steps"):
        with pytest.raises(ValueError):
            parse_fault_spec(bad)


def _tiny_dit():
    from models.dit import DiT

    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=8)


def _loss(model):
    x = torch.randn(2, 4, 8, 8)  # (N, C, H, W)
    out = model(x, torch.tensor([10, 500]), torch.tensor([1, 2]))  # (N, 2C, H, W): eps and variance
    return (out[:, :4] - x).pow(2).mean()


def test_activation_faults_break_a_real_dit_where_and_when_asked():
    model = _tiny_dit()
    assert sorted(dit_blocks(model)) == [0, 1]
    specs = fault_specs("X", {"X": "steps=2;ranks=0;micro=1;block=1 | steps=3;ranks=0;block=0;kind=grad_nan"})
    fault = ActivationFault(specs, model, rank=0)
    for step, micro_losses in ((1, [True, True]), (2, [True, False])):
        fault.begin_step(step, 0, 8)
        assert [bool(torch.isfinite(_loss(model))) for _ in range(2)] == micro_losses
    fault.begin_step(3, 0, 8)
    loss = _loss(model)
    loss.backward()
    assert torch.isfinite(loss)  # grad_nan: the forward is untouched ...
    grads = [p.grad for p in model.blocks[0].parameters() if p.grad is not None]
    assert grads and all(torch.isnan(g).any() for g in grads)  # ... the gradients are NaN
    assert local_nonfinite(None, model.parameters()) == (False, True)
    assert local_nonfinite(torch.zeros(3), []) == (False, False)
    assert local_nonfinite(torch.tensor([1.0, float("nan")]), []) == (True, False)
    assert ActivationFault(specs, model, rank=1).specs == []  # not this rank: no hooks at all
    fault.remove()
    model.zero_grad()
    assert torch.isfinite(_loss(model))


class _Sched:
    def __init__(self, step):
        self.last_step = step

    def load_state_dict(self, sd):
        self.last_step = sd["last_step"]


def test_applied_step_and_lr_position():
    class Engine:
        def __init__(self, applied):
            self.was_step_applied = lambda: applied

    assert step_applied(Engine(True)) and not step_applied(Engine(False)) and step_applied(object())
    s = _Sched(7)
    realign_lr(s, 5)
    assert s.last_step == 5
    realign_lr(None, 3)


class _State:
    def __init__(self, step, stage, position, batches):
        self.step, self.stage, self.data_position, self.data_batches = step, stage, position, batches


def test_rollback_windows_cover_what_the_failed_attempt_read():
    from trainer.config.stages import Stage

    stages = [Stage(0, 64, 10, 0, 8, 4, 1e-3, 0, "", 0, 5), Stage(1, 128, 10, 10, 4, 2, 1e-3, 0, "", 0, 5)]
    # same stage: [p_c, p_f); dp=1 -> 2 micro-batches per step in stage 0
    assert consumed_windows(_State(6, 0, 48, 12), _State(9, 0, 72, 18), stages, 1) == [
        {"stage": 0, "start": 48, "end": 72, "start_batch": 12, "end_batch": 18}]
    # across a stage boundary: the rest of stage 0, then stage 1 from its start; a boundary checkpoint adds nothing
    assert consumed_windows(_State(7, 0, 56, 14), _State(13, 1, 12, 6), stages, 1) == [
        {"stage": 0, "start": 56, "end": 80, "start_batch": 14, "end_batch": 20},
        {"stage": 1, "start": 0, "end": 12, "start_batch": 0, "end_batch": 6}]
    assert consumed_windows(_State(10, 0, 80, 20), _State(12, 1, 8, 4), stages, 1) == [
        {"stage": 1, "start": 0, "end": 8, "start_batch": 0, "end_batch": 4}]
    skips = merge_windows([{"stage": 0, "start": 48, "end": 72}], [{"stage": 0, "start": 48, "end": 72},
                                                                    {"stage": 1, "start": 0, "end": 8}])
    assert len(skips) == 2
    assert window_at(_State(6, 0, 48, 0), skips)["end"] == 72 and window_at(_State(6, 0, 72, 0), skips) is None
    assert window_at(_State(6, 1, 4, 0), skips)["end"] == 8


def test_checkpoints_after_the_onset_are_set_aside_and_latest_moves_back(tmp_path):
    from trainer.state.checkpoint import list_checkpoints, set_aside_checkpoints

    ck = str(tmp_path)
    for step in (3, 6, 9, 12):
        os.makedirs(os.path.join(ck, f"step{step:08d}"))
        json.dump({"step": step}, open(os.path.join(ck, f"step{step:08d}", "trainer_state.json"), "w"))
    assert set_aside_checkpoints(ck, 9, keep=1) == ["step00000009", "step00000012"]
    assert [s for s, _ in list_checkpoints(ck)] == [6, 3]
    assert open(os.path.join(ck, "latest")).read().strip() == "step00000006"
    assert os.listdir(os.path.join(ck, "diverged")) == ["step00000012"]  # keep=1: the newest set-aside one
    assert set_aside_checkpoints(ck, 0, keep=5) == ["step00000003", "step00000006"]
    assert not os.path.exists(os.path.join(ck, "latest"))


def test_rollback_reaches_wandb_as_a_history_row():
    from trainer.monitor.wandb_sink import WandbSink

    class Run:
        logged = []

        def log(self, data, step=None):
            self.logged.append((step, data))

    sink = WandbSink.__new__(WandbSink)  # no wandb.init: only the event hook is under test
    sink.run = Run()
    sink.event({"event": "alert", "title": "x"})
    sink.event({"event": "rollback", "rollback": 1, "from_step": 10, "to_step": 6, "skipped_samples": 32})
    assert sink.run.logged == [(10, {"rollback/count": 1, "rollback/to_step": 6, "rollback/skipped_samples": 32})]


@pytest.mark.parametrize("override, words", [("log.spike_budget=0.7", "log.spike_budget"),
                                             ("log.spike_factor=0.5", "0 (off) or > 1"),
                                             ("train.max_rollbacks=-1", "train.max_rollbacks"),
                                             ("train.blowup_steps=-2", "train.blowup_steps")])
def test_divergence_keys_are_validated(override, words):
    from trainer.config.schema import ConfigError, load_config
    from trainer.config.validate import validate_values

    validate_values(load_config(None, ["log.spike_factor=0", "train.max_rollbacks=0"]))  # off is fine
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate_values(load_config(None, [override]))
