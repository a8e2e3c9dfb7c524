"""Validation records of metrics.jsonl (trainer/loop/validation.py) summarised for ``status`` and ``report``.

Torch-free: the status command must run on a login node.
"""
from __future__ import annotations

from typing import Optional

from trainer.rundir import is_val_record


def val_records(records: list[dict]) -> list[dict]:
    """The validation records, one per step (a resumed run's later record of a step wins), in step order."""
    by_step = {}
    for r in records:
        if is_val_record(r) and "step" in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def bucket_keys(record: dict, ema: bool = False) -> list[str]:
    prefix = "val/ema_loss_t" if ema else "val/loss_t"
    return sorted((k for k in record if k.startswith(prefix) and k[len(prefix):].isdigit()),
                  key=lambda k: int(k[len(prefix):]))


def val_summary(records: list[dict]) -> Optional[dict]:
    """Latest raw and EMA validation loss, their change since the previous evaluation (trend), the best EMA loss and
    its step, how many evaluations in a row the EMA loss rose, the per-timestep losses; None without validation."""
    vals = val_records(records)
    if not vals:
        return None
    last = vals[-1]
    prev = vals[-2] if len(vals) > 1 else None
    best = min(vals, key=lambda r: float(r["val/ema_loss"]))
    rising = 0
    for a, b in zip(vals[-2::-1], vals[::-1]):  # newest pairs first
        if float(b["val/ema_loss"]) > float(a["val/ema_loss"]):
            rising += 1
        else:
            break

    def change(key):
        return None if prev is None or not float(prev[key]) else float(last[key]) / float(prev[key]) - 1.0

    return {
        "step": int(last["step"]), "stage": last.get("stage"), "resolution": last.get("resolution"),
        "loss": float(last["val/loss"]), "ema_loss": float(last["val/ema_loss"]),
        "loss_change": change("val/loss"), "ema_loss_change": change("val/ema_loss"),
        "trend": "n/a" if prev is None else ("rising" if rising else "falling"),
        "rising_evals": rising,
        "best_step": int(best["step"]), "best_ema_loss": float(best["val/ema_loss"]),
        "evaluations": len(vals),
        "timesteps": last.get("val/timesteps"),
        "loss_t": [float(last[k]) for k in bucket_keys(last)],
        "ema_loss_t": [float(last[k]) for k in bucket_keys(last, ema=True)],
    }


def format_val(v: Optional[dict]) -> Optional[str]:
    if not v:
        return None
    pct = "" if v["ema_loss_change"] is None else f" ({v['ema_loss_change'] * 100:+.2f}% vs previous)"
    return (f"  validation (step {v['step']}): loss {v['loss']:.4f}  EMA {v['ema_loss']:.4f}{pct}  {v['trend']}"
            f"{' ' + str(v['rising_evals']) + ' in a row' if v['rising_evals'] else ''}  best EMA "
            f"{v['best_ema_loss']:.4f} at step {v['best_step']}")
