"""The loss-spike detector measured: false alarms on healthy runs, and how fast it sees a 10x loss excursion.

The detector (trainer/monitor/divergence.py) works on logged records only (``metrics.jsonl``: the all-reduced loss
and loss by timestep quartile of each log step), so this script REPLAYS the metrics.jsonl of real runs through it,
with the settings each run was trained with (its config.yaml: log.every, log.spike_factor, log.spike_budget):

* healthy runs: every alert is a false alarm. The rule it replaced (a logged loss above 3x the median of the last
  50) is replayed beside it on the same records;
* ablation: the same detector on the logged loss alone (``by_timestep=False``), to show what the timestep
  matching buys;
* injected excursions: for every possible onset after the detector's warm-up, the losses of 5 consecutive
  training steps are multiplied by 10 and the records rebuilt from them, and the detection delay (first alerting
  step minus onset, in steps) is recorded. With log.every = 1 a record is one step. With log.every = k a record's
  quartile losses are means over its k steps (sample counts equal per step), so an excursion step scales its
  record's quartiles by (1 + 9 j / k) for j of its k steps inside the excursion, and the record's ``loss`` (the
  logged step alone) by 10 when that step is inside.

    python benchmarks/bench_divergence.py --demo runs/demo --tiny runs/tiny1000 [--train-tiny]

``--train-tiny`` first trains the 1,000-step tiny run (configs/tiny.yaml, log.every=1, one process) into
``--tiny``; the demo run comes from ``bash cluster/run_demo.sh`` (RUN_DIR=...).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FACTOR, LENGTH = 10.0, 5  # the injected excursion: 10x for 5 steps
KEYS = ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3")


def load_run(run_dir: str) -> tuple[list[dict], dict]:
    import yaml

    from trainer.rundir import read_metrics

    records = [r for r in read_metrics(run_dir) if "step" in r]
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    return records, cfg


def detector_for(cfg: dict, by_timestep: bool = True):
    from trainer.monitor.divergence import DivergenceDetector, sustain_records

    log = cfg.get("log", {})
    return DivergenceDetector(factor=float(log.get("spike_factor", 3.0)), budget=float(log.get("spike_budget", 1e-4)),
                              log_every=int(log.get("every", 1)),
                              sustain=sustain_records(int(cfg.get("train", {}).get("blowup_steps", 20)),
                                                      int(log.get("every", 1))), by_timestep=by_timestep)


def old_rule_alerts(records: list[dict], factor: float = 3.0, window: int = 50, min_history: int = 10) -> int:
    """The replaced rule: a logged loss above ``factor`` x the median of the last ``window`` finite logged losses."""
    hist, alerts = [], 0
    for r in records:
        loss = _num(r.get("loss"))
        if loss is None:
            continue
        if len(hist) >= min_history and loss > factor * statistics.median(hist[-window:]):
            alerts += 1
        hist.append(loss)
    return alerts


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def replay(records: list[dict], cfg: dict, by_timestep: bool = True) -> dict:
    d = detector_for(cfg, by_timestep)
    verdicts = [v for v in (d.update(r) for r in records) if v is not None]
    alerts = [v for v in verdicts if v.alert]
    margin = min(v.threshold / v.statistic for v in verdicts)
    return {"records": len(records), "judged_records": len(verdicts), "false_alarms": len(alerts),
            "false_alarm_steps": [v.step for v in alerts], "sustained_blowups": sum(v.sustained for v in verdicts),
            "max_statistic": max(v.statistic for v in verdicts),
            "threshold_min": min(v.threshold for v in verdicts), "threshold_max": max(v.threshold for v in verdicts),
            "min_threshold_over_statistic": margin,
            "rate_upper_95": 3.0 / len(verdicts),  # rule of three: 0 events in n trials
            "old_rule_alerts": old_rule_alerts(records)}


def with_excursion(records: list[dict], every: int, onset: int) -> list[dict]:
    """``records`` with the losses of steps [onset, onset + LENGTH) multiplied by FACTOR (see the module docstring)."""
    out = []
    for r in records:
        step = int(r["step"])
        first = step - every + 1  # the record covers steps first..step
        inside = sum(1 for s in range(first, step + 1) if onset <= s < onset + LENGTH)
        if inside:
            r = dict(r)
            q_scale = 1.0 + (FACTOR - 1.0) * inside / every
            for k in KEYS[1:]:
                if _num(r.get(k)) is not None:
                    r[k] = float(r[k]) * q_scale
            if _num(r.get("loss")) is not None and onset <= step < onset + LENGTH:
                r["loss"] = float(r["loss"]) * FACTOR
        out.append(r)
    return out


def excursions(records: list[dict], cfg: dict, warmup_records: int = 60, by_timestep: bool = True) -> dict:
    """Onsets are tried at every step whose record has ``warmup_records`` records of its stage before it (the
    detector needs a baseline: it starts afresh at each stage) and whose excursion ends inside that stage."""
    every = int(cfg.get("log", {}).get("every", 1))
    ok_steps = set()
    index_in_stage, stage = 0, None
    for r in records:
        index_in_stage = index_in_stage + 1 if r.get("stage") == stage else 0
        stage = r.get("stage")
        if index_in_stage >= warmup_records:
            ok_steps.update(range(int(r["step"]) - every + 1, int(r["step"]) + 1))
    last = int(records[-1]["step"])
    delays, missed, within, tried = [], [], 0, 0
    for onset in sorted(ok_steps):
        if not all(s in ok_steps for s in range(onset, onset + LENGTH + 2 * every)) or onset + LENGTH + 2 * every > last:
            continue
        tried += 1
        d = detector_for(cfg, by_timestep)
        found = None
        for r in with_excursion(records, every, onset):
            v = d.update(r)
            if v is not None and v.alert and int(r["step"]) >= onset:
                found = int(r["step"]) - onset
                break
        if found is None:
            missed.append(onset)
        else:
            delays.append(found)
            within += found < LENGTH
    return {"log_every": every, "onsets_tried": tried, "detected": len(delays), "missed": len(missed),
            "missed_onsets": missed[:20], "detected_within_excursion": within,
            "delay_steps_max": max(delays) if delays else None,
            "delay_steps_median": statistics.median(delays) if delays else None,
            "delay_steps_histogram": {str(k): delays.count(k) for k in sorted(set(delays))}}


def train_tiny(run_dir: str, data_root: str) -> float:
    cmd = [sys.executable, os.path.join(REPO, "trainer", "main.py"), "--config", os.path.join(REPO, "configs/tiny.yaml"),
           "--ds_config", "zero2.json", f"data.root={data_root}", f"run.dir={run_dir}", "train.max_steps=1000",
           "log.every=1", "checkpoint.every=1000"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default=os.path.join(REPO, "runs", "demo"), help="run dir of cluster/run_demo.sh")
    p.add_argument("--tiny", default=os.path.join(REPO, "runs", "tiny1000"), help="run dir of the 1,000-step tiny run")
    p.add_argument("--train-tiny", action="store_true", help="train the tiny run into --tiny first")
    p.add_argument("--data-root", default=os.path.join(REPO, "data", "demo"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "divergence.json"))
    args = p.parse_args(argv)

    from results_io import write_results

    record = {"what": "trainer/monitor/divergence.py replayed on the metrics.jsonl of real runs (the detector sees "
                      "logged records only): the demo run as trained by cluster/run_demo.sh (configs/demo.yaml, "
                      "2 ranks ZeRO-2, 1,500 steps, log.every=10) and a 1,000-step configs/tiny.yaml run with "
                      "log.every=1 (one process, trainer/main.py, see --train-tiny)",
              "excursion": {"factor": FACTOR, "steps": LENGTH}, "command": " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
              "runs": {}}
    if args.train_tiny:
        record["tiny_train_seconds"] = train_tiny(args.tiny, args.data_root)
    for name, run_dir in (("tiny_1000_log_every_1", args.tiny), ("demo", args.demo)):
        records, cfg = load_run(run_dir)
        res = {"run_dir": os.path.abspath(run_dir), "steps": int(records[-1]["step"]),
               "log_every": int(cfg.get("log", {}).get("every", 1)),
               "spike_factor": float(cfg.get("log", {}).get("spike_factor", 3.0)),
               "healthy": replay(records, cfg), "injected": excursions(records, cfg),
               # ablation: the same filter and budget on the logged loss alone (no timestep matching)
               "untimed_healthy": replay(records, cfg, by_timestep=False),
               "untimed_injected": excursions(records, cfg, by_timestep=False)}
        record["runs"][name] = res
        h, e = res["healthy"], res["injected"]
        print(f"{name}: {h['records']} records (log.every={res['log_every']}), false alarms {h['false_alarms']} "
              f"(old rule: {h['old_rule_alerts']}); max statistic {h['max_statistic']:.2f}x vs threshold "
              f"{h['threshold_min']:.2f}-{h['threshold_max']:.2f}x (closest: threshold = "
              f"{h['min_threshold_over_statistic']:.2f} x statistic); rate < {h['rate_upper_95']:.1e}/record (95%)")
        print(f"  10x for 5 steps at {e['onsets_tried']} onsets: detected {e['detected']}, missed {e['missed']}, "
              f"within the 5 steps {e['detected_within_excursion']}; delay max {e['delay_steps_max']} steps, "
              f"median {e['delay_steps_median']}, histogram {e['delay_steps_histogram']}")
        uh, ue = res["untimed_healthy"], res["untimed_injected"]
        print(f"  ablation, loss alone: false alarms {uh['false_alarms']}, threshold {uh['threshold_min']:.2f}-"
              f"{uh['threshold_max']:.2f}x, caught {ue['detected']}/{ue['onsets_tried']}, within the 5 steps "
              f"{ue['detected_within_excursion']}")
    write_results(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
