"""``python -m trainer.status RUN_DIR [RUN_DIR...] [--json] [--watch SECONDS]`` (console script ``dit-status``).

One glance per run, from the run directory alone (works on a login node: no torch, no GPU):
state, stage and resolution, step/total, loss and its trend, samples/s, MFU, ETA, last checkpoint and
its age, heartbeat age, alerts, latest FID, Slurm job state.

State (``state``), from the files alone (events.jsonl, heartbeat.json, lease.json; trainer/rundir.py):
  finished   a ``finished`` event after the last ``started`` event
  hung       a ``hang`` error event: a rank made no progress for ``run.hang_timeout_minutes`` and the job was torn
             down (exit 7); ``why`` names the stuck rank and its node first
  crashed    an ``error`` event (exception, NaN stop, divergence past ``train.max_rollbacks``; a rank failure names the rank that failed first and its node,
             then the ones that followed); or the lease holder died without a clean exit (its pid
             is gone on this host, or it has not heartbeaten for ``run.lease_timeout_minutes``); or the run
             ended without an end record; or nothing was ever written
  preempted  the run checkpointed for a requeue and released the run directory
  starting   the lease is taken but the first heartbeat is not written yet (engine build, resume)
  stalled    heartbeat fresh but no optimizer step for ``log.stall_minutes`` (0: never stalled)
  running    the lease holder heartbeats
``stall_minutes`` is the run's ``log.stall_minutes`` (config.yaml) unless ``--stall-minutes`` is given.
``writer`` names the host and pid that last wrote (the lease holder, else the last heartbeat); the newest
checkpoint's ``verified`` says whether its files match the sizes (and, with ``--verify``, the xxh3-128
checksums) in its COMPLETE.json; checkpoints the trainer rejected at resume are listed. ``rollbacks`` lists the automatic rollbacks (events.jsonl):
from which step to which checkpoint, why, and the data window skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Optional

from trainer.rundir import (CHECKPOINT_COMPLETE, CONFIG, LATEST, LEASE, LAUNCH_HISTORY, SLURM_JOB_ID, checkpoints_dir, evals_path,
                            events_path, heartbeat_path, is_val_record, launch_dir, metrics_path, read_json,
                            read_jsonl)
from trainer.state.integrity import check_hashes, check_sizes, has_checksums
from trainer.tools.val_summary import format_val, val_summary
from trainer.state.lease import last_beat, pid_alive

SPARK = "▁▂▃▄▅▆▇█"
DEFAULT_STALL_MINUTES = 30.0
DEFAULT_LEASE_TIMEOUT_MINUTES = 5.0


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "n/a"
    seconds = int(max(0, seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


TAIL_BYTES = 512 * 1024  # status reads only the tail of metrics files, which grow large


def _read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        return {}
    try:
        import yaml

        with open(path) as f:
            return yaml.safe_load(f) or {}
    except Exception:  # noqa: BLE001
        return {}


def _num(v) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)  # "nan" / "inf" as written by the metrics sink
        except ValueError:
            return None
    return None


def loss_trend(losses: list[float], window: int = 50) -> dict:
    """Mean of the latest window vs the one before it, and a sparkline of the latest losses."""
    finite = [x for x in losses if x == x and abs(x) != float("inf")]
    out = {"sparkline": "", "recent_mean": None, "previous_mean": None, "change": None}
    if not finite:
        return out
    if len(finite) > window:  # the latest window against the one before it
        recent, previous = finite[-window:], finite[-2 * window:-window]
    else:  # short runs: second half against first half
        half = len(finite) // 2
        recent, previous = finite[half:], finite[:half]
    out["recent_mean"] = sum(recent) / len(recent)
    if previous:
        out["previous_mean"] = sum(previous) / len(previous)
        if out["previous_mean"]:
            out["change"] = out["recent_mean"] / out["previous_mean"] - 1.0
    spark = finite[-24:]
    lo, hi = min(spark), max(spark)
    out["sparkline"] = "".join(SPARK[int((x - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 3] for x in spark)
    return out


def slurm_job_id(run_dir: str) -> Optional[str]:
    """From RUN_DIR/slurm_job_id, else the launcher's RUN_DIR/launch/history.jsonl or env-*.txt."""
    path = os.path.join(run_dir, SLURM_JOB_ID)
    if os.path.exists(path):
        with open(path) as f:
            job = f.read().strip()
        if job:
            return job
    launch = launch_dir(run_dir)
    history = read_jsonl(os.path.join(launch, LAUNCH_HISTORY))
    for rec in reversed(history):
        if rec.get("job_id"):
            return str(rec["job_id"])
    if os.path.isdir(launch):
        envs = sorted((os.path.join(launch, n) for n in os.listdir(launch) if n.startswith("env-")),
                      key=os.path.getmtime, reverse=True)
        for p in envs:
            with open(p, errors="replace") as f:
                for line in f:
                    if line.startswith("SLURM_JOB_ID="):
                        return line.split("=", 1)[1].strip().strip("'\"")
    return None


def slurm_state(job_id: Optional[str]) -> str:
    if not job_id:
        return "n/a"
    if not shutil.which("squeue"):
        return "n/a (no squeue here)"
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a (squeue failed)"
    state = out.stdout.strip().splitlines()
    if out.returncode != 0 and not state:
        return "not in queue"
    return state[0] if state else "not in queue"


def last_checkpoint(run_dir: str, now: float, deep: bool = False) -> dict:
    ck = checkpoints_dir(run_dir)
    latest = os.path.join(ck, LATEST)
    if not os.path.exists(latest):
        return {"tag": None, "step": None, "age_sec": None}
    with open(latest) as f:
        tag = f.read().strip()
    marker = os.path.join(ck, tag, CHECKPOINT_COMPLETE)
    mtime = os.path.getmtime(marker) if os.path.exists(marker) else os.path.getmtime(latest)
    step = int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None
    path = os.path.join(ck, tag)
    problem = check_sizes(path)
    if problem is None and deep:
        problems = check_hashes(path)
        problem = problems[0] if problems else None
    return {"tag": tag, "step": step, "age_sec": now - mtime, "complete": os.path.exists(marker),
            "checksums": has_checksums(path), "verified": problem is None,
            "verified_how": ("checksums re-hashed" if deep else "sizes (use --verify to re-hash)"),
            "problem": problem}


def run_status(run_dir: str, now: Optional[float] = None, stall_minutes: Optional[float] = None,
               query_slurm: bool = True, verify: bool = False) -> dict:
    now = time.time() if now is None else now
    cfg = _read_config(run_dir)
    log_cfg = cfg.get("log") or {}
    run_cfg = cfg.get("run") or {}
    if stall_minutes is None:  # 0 means the stall alert is off: never "stalled"
        stall_minutes = float(log_cfg.get("stall_minutes", DEFAULT_STALL_MINUTES))
    stall = stall_minutes * 60
    every = [r for r in read_jsonl(metrics_path(run_dir), max_bytes=TAIL_BYTES) if "step" in r]
    records = [r for r in every if not is_val_record(r)]  # training steps; validation: val_summary below
    events = read_jsonl(events_path(run_dir))
    heartbeat = read_json(heartbeat_path(run_dir))
    evals = read_jsonl(evals_path(run_dir))
    last = records[-1] if records else {}

    starts = [i for i, e in enumerate(events) if e.get("event") == "started"]
    current = events[starts[-1]:] if starts else events
    finished = any(e.get("event") == "finished" for e in current)
    errors = [e for e in current if e.get("event") == "error"]
    alerts = [e for e in events if e.get("event") == "alert"]

    hb_age = now - float(heartbeat["time"]) if heartbeat and "time" in heartbeat else None
    last_step_time = heartbeat.get("last_step_time") if heartbeat else None
    if last_step_time is None and last.get("time") is not None:
        last_step_time = _num(last.get("time"))
    idle = now - last_step_time if last_step_time is not None else None

    flags = []
    holder = read_json(os.path.join(run_dir, LEASE))
    writer = holder or heartbeat or {}
    where = f"host {writer.get('host', '?')} pid {writer.get('pid', '?')}"
    lease_timeout = 60 * float(run_cfg.get("lease_timeout_minutes", DEFAULT_LEASE_TIMEOUT_MINUTES))
    holder_dead = None
    if holder is not None:
        if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid", -1), holder.get("pid_start")):
            holder_dead = f"its process ({where}) is gone"
        elif now - last_beat(run_dir, holder) > lease_timeout:
            holder_dead = f"no heartbeat for {format_duration(now - last_beat(run_dir, holder))} from {where}"
    if finished:
        state, reason = "finished", "finished event"
    elif errors and errors[-1].get("kind") == "hang":
        state, reason = "hung", str(errors[-1].get("message", ""))[:600]
    elif errors and errors[-1].get("kind") == "rank_failure":
        state, reason = "crashed", f"first failure: {str(errors[-1].get('message', ''))[:600]}"
    elif errors:
        state, reason = "crashed", f"{errors[-1].get('kind', 'error')}: {str(errors[-1].get('message', ''))[:200]}"
    elif heartbeat is not None and heartbeat.get("state") == "preempted" and holder is None:
        state, reason = "preempted", f"checkpointed for requeue ({where})"
    elif holder_dead:
        state, reason = "crashed", f"lease holder died without a clean exit: {holder_dead}"
    elif holder is not None and heartbeat is None:
        state, reason = "starting", f"lease taken by {where}; building the engine / resuming"
    elif heartbeat is None:
        state, reason = "crashed", "no heartbeat file (never started, or died before training)"
    elif holder is None and heartbeat.get("state") == "running":
        state, reason = "crashed", f"the run ({where}) ended without a clean exit (no lease, no end event)"
    elif 0 < stall and (heartbeat.get("stalled") or (idle is not None and idle > stall)):
        state, reason = "stalled", f"no step for {format_duration(idle)} ({where})"
    elif holder is not None:
        state, reason = "running", ""
    else:
        state, reason = heartbeat.get("state") or "stopped", f"last written by {where}"
    if state == "stalled":
        flags.append("STALL")
    titles = {a.get("title") for a in alerts}
    if "non-finite loss" in titles or (_num(last.get("skipped_steps")) or 0) > 0:
        flags.append("NAN")
    if "loss spike" in titles:
        flags.append("SPIKE")
    if any(e.get("kind") == "nan_stop" for e in errors):
        flags.append("NAN-STOP")
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    if rollbacks:
        flags.append("ROLLBACK")
    if any(e.get("kind") == "diverged" for e in errors):
        flags.append("DIVERGED")
    if state == "crashed":
        flags.append("CRASHED")
    if state == "hung":
        flags.append("HUNG")

    losses = [_num(r.get("loss")) for r in records if _num(r.get("loss")) is not None]
    step = int(last.get("step", 0)) if last else (heartbeat or {}).get("step", 0)
    total = last.get("total_steps")
    if total is None:
        train = cfg.get("train") or {}
        stages = cfg.get("stages") or []
        total = sum(int(s.get("steps", 0)) for s in stages) if stages else train.get("max_steps")
    eta = _num(last.get("eta_sec")) if state in ("running", "stalled") else (0.0 if state == "finished" else None)
    job = slurm_job_id(run_dir)
    fid = next((e for e in reversed(evals) if "fid" in e or any(k.startswith("fd_") for k in e)), None)
    fd_key = next((k for k in (fid or {}) if k == "fid" or k.startswith("fd_")), None)
    return {
        "run_dir": os.path.abspath(run_dir),
        "name": (cfg.get("run") or {}).get("name") or os.path.basename(os.path.abspath(run_dir)),
        "state": state,
        "reason": reason,
        "flags": flags,
        "step": step,
        "total_steps": total,
        "stage": last.get("stage"),
        "resolution": last.get("resolution"),
        "loss": _num(last.get("loss")),
        "loss_trend": loss_trend(losses),
        "samples_per_sec": _num(last.get("samples_per_sec")),
        "mfu": _num(last.get("mfu")),
        "eta_sec": eta,
        "skipped_steps": _num(last.get("skipped_steps")),
        "last_checkpoint": last_checkpoint(run_dir, now, deep=verify),
        "rejected_checkpoints": [{"checkpoint": e.get("checkpoint"), "problem": e.get("problem"), "time": e.get("time")}
                                 for e in events if e.get("event") == "checkpoint_rejected"][-5:],
        "writer": {k: writer.get(k) for k in ("host", "pid", "rank", "slurm_job_id", "slurm_restart") if k in writer},
        "lease": {k: holder.get(k) for k in ("host", "pid", "slurm_job_id", "slurm_restart", "started")} if holder else None,
        "heartbeat_age_sec": hb_age,
        "seconds_since_step": idle,
        "failure": ({k: errors[-1].get(k) for k in ("kind", "first_rank", "first_host", "message", "time")}
                    if errors else None),
        "alerts": [{"title": a.get("title"), "text": a.get("text"), "level": a.get("level"), "time": a.get("time")}
                   for a in alerts[-10:]],
        "alert_count": len(alerts),
        "rollbacks": [{k: e.get(k) for k in ("rollback", "reason", "from_step", "to_step", "checkpoint", "windows",
                                             "skipped_samples", "time")} for e in rollbacks][-5:],
        "rollback_count": len(rollbacks),
        "fid": {"step": fid.get("step"), "metric": fd_key, "fid": fid.get(fd_key), "num_samples": fid.get("num_samples"),
                "feature_extractor": fid.get("feature_extractor")} if fid else None,
        "validation": val_summary(every),
        "slurm_job_id": job,
        "slurm_state": slurm_state(job) if query_slurm else "n/a",
    }


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None or v != v else format(v, spec)


def format_status(s: dict) -> str:
    tr = s["loss_trend"]
    change = "" if tr["change"] is None else f" ({tr['change'] * 100:+.1f}% vs previous window)"
    total = s["total_steps"]
    pct = f" ({100 * s['step'] / total:.1f}%)" if total else ""
    ck = s["last_checkpoint"]
    ck_text = "none"
    if ck["tag"]:
        check = "verified" if ck["verified"] else f"FAILED VERIFICATION: {ck['problem']}"
        ck_text = (f"{ck['tag']} ({format_duration(ck['age_sec'])} ago) {check} by {ck['verified_how']}"
                   f"{'' if ck['checksums'] else ', written without checksums'}")
    flags = (" " + " ".join(f"!{f}" for f in s["flags"])) if s["flags"] else ""
    lines = [
        f"{s['name']}  [{s['state'].upper()}]{flags}  {s['run_dir']}",
        f"  stage {s['stage'] if s['stage'] is not None else '?'} ({s['resolution'] or '?'} px)  "
        f"step {s['step']}/{total or '?'}{pct}  ETA {format_duration(s['eta_sec'])}",
        f"  loss {_fmt(s['loss'], '.4f')} {tr['sparkline']}{change}",
        f"  {_fmt(s['samples_per_sec'], '.1f')} samples/s  MFU {_fmt(None if s['mfu'] is None else 100 * s['mfu'], '.1f')}%"
        f"  skipped steps {int(s['skipped_steps'] or 0)}",
        f"  last checkpoint {ck_text}  heartbeat {format_duration(s['heartbeat_age_sec'])} ago"
        f"  last step {format_duration(s['seconds_since_step'])} ago",
    ]
    w = s["writer"]
    if w:
        lines.append(f"  written by host {w.get('host', '?')} pid {w.get('pid', '?')}"
                     + (f" (Slurm job {w['slurm_job_id']} attempt {w.get('slurm_restart', 0)})" if w.get("slurm_job_id") else "")
                     + ("  [holds the lease]" if s["lease"] else ""))
    if s["rollback_count"]:
        r = s["rollbacks"][-1]
        span = ", ".join(f"[{w['start']}, {w['end']}) stage {w['stage']}" for w in r["windows"] or []) or "none"
        lines.append(f"  rollbacks {s['rollback_count']}: last {r['reason']} at step {r['from_step']} -> "
                     f"{r['checkpoint']} (step {r['to_step']}), skipped samples {span}")
    for r in s["rejected_checkpoints"][-2:]:
        lines.append(f"  rejected at resume: {r['problem']}")
    if s["reason"] and s["state"] != "finished":
        lines.append(f"  why: {s['reason']}")
    if s.get("validation"):
        lines.append(format_val(s["validation"]))
    if s["fid"]:
        name = "FID" if s["fid"].get("metric", "fid") == "fid" else s["fid"]["metric"]
        lines.append(f"  {name} {_fmt(s['fid']['fid'], '.2f')} at step {s['fid']['step']} "
                     f"({s['fid']['num_samples']} samples)")
    if s["alerts"]:
        lines.append(f"  alerts ({s['alert_count']}): " + "; ".join(
            f"{a['title']}: {a['text']}" for a in s["alerts"][-3:]))
    lines.append(f"  slurm: job {s['slurm_job_id']} {s['slurm_state']}" if s["slurm_job_id"] else "  slurm: n/a")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="At-a-glance status of DiT training runs (from their run directories).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    p.add_argument("--watch", type=float, nargs="?", const=10.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 10) until interrupted")
    p.add_argument("--stall-minutes", type=float, default=None, help="override the runs' log.stall_minutes")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the newest checkpoint's files against their xxh3-128 checksums (reads it once)")
    args = p.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.isdir(d)]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        while True:
            statuses = [run_status(d, stall_minutes=args.stall_minutes, verify=args.verify) for d in args.run_dirs]
            if args.watch is not None and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            if args.json:
                print(json.dumps(statuses, indent=1))
            else:
                print("\n\n".join(format_status(s) for s in statuses))
            sys.stdout.flush()
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
