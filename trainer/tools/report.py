"""``python -m trainer.report RUN_DIR [--out DIR]``: PNG plots and a markdown summary of a run.

Writes into ``RUN_DIR/report/`` (or ``--out``): ``loss.png`` (loss, mse/vb and loss by timestep
quartile), ``throughput.png`` (samples/s, MFU, step-time split), ``optim.png`` (lr, grad norm),
``memory.png``, ``validation.png`` (held-out loss, raw and EMA, per timestep bucket, stage boundaries marked) when
the run validates, ``fid.png`` when evaluations exist, and ``report.md`` linking them with the run's
status, final numbers, alerts, checkpoints and sample grids. Reads only the run directory
(matplotlib with the Agg backend; no torch, no display).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from trainer.rundir import events_path, evals_path, is_val_record, read_jsonl, read_metrics
from trainer.tools.status import format_duration, run_status
from trainer.tools.val_summary import bucket_keys, val_records


def _series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _smooth(ys: list[float], points: int = 40) -> list[float]:
    """Centred moving average over ~1/points of the run: no lag, unlike an EMA, so a falling loss is drawn
    where it falls."""
    half = max(1, len(ys) // points) // 2
    out = []
    for i in range(len(ys)):
        window = ys[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _stage_starts(records: list[dict]) -> list[tuple[int, int, int]]:
    """(first logged step, stage, resolution) of every progressive stage present in the records."""
    starts, last = [], None
    for r in records:
        stage = r.get("stage")
        if stage is not None and stage != last and "step" in r:
            starts.append((r["step"], stage, r.get("resolution", 0)))
            last = stage
    return starts


def _plot(path: str, panels: list[tuple[str, list[tuple[str, str, bool]]]], records: list[dict],
          title: str) -> str | None:
    """One figure, one row per panel; each panel a list of (metric key, label, smoothed?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = [(name, lines) for name, lines in panels if any(_series(records, k)[0] for k, _, _ in lines)]
    if not used:
        return None
    fig, axes = plt.subplots(len(used), 1, figsize=(9, 2.8 * len(used)), sharex=True, squeeze=False)
    stages = _stage_starts(records)
    for ax, (name, lines) in zip(axes[:, 0], used):
        if len(stages) > 1:  # progressive run: mark where each stage (resolution) begins
            for step, stage, resolution in stages:
                ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
                ax.text(step, 1.0, f" stage {stage}: {resolution} px", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=7, color="dimgrey")
        for key, label, smooth in lines:
            xs, ys = _series(records, key)
            if not xs:
                continue
            if smooth and len(ys) > 10:
                ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
                ax.plot(xs, _smooth(ys), label=f"{label} (moving average)", color=ax.lines[-1].get_color())
            else:
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _buckets(vals: list[dict]) -> list[tuple[str, object]]:
    """(val/loss_t{i}, its timestep) of the newest validation record."""
    last = vals[-1] if vals else {}
    ts = last.get("val/timesteps") or []
    return [(k, ts[i] if i < len(ts) else i) for i, k in enumerate(bucket_keys(last))]


def _last(records: list[dict], key: str):
    for r in reversed(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return v
    return None


def _fmt(v, spec=".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def loss_panels(records: list[dict]) -> list:
    """loss.png's panels. The vb panel only when some step has a variational-bound term: a rectified flow (and a
    diffusion without learned sigma) logs vb = 0 at every step, a flat line that says nothing."""
    panels = [("loss", [("loss", "loss", True), ("mse", "mse", True)])]
    if any(r.get("vb") for r in records):
        panels.append(("vb", [("vb", "vb", True)]))
    panels.append(("loss by t quartile", [(f"loss_q{k}", f"q{k} ({'low' if k == 0 else 'high' if k == 3 else 'mid'} noise)",
                                           True) for k in range(4)]))
    return panels


def write_report(run_dir: str, out_dir: str | None = None) -> str:
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    every = [r for r in read_metrics(run_dir) if "step" in r]
    by_step = {}
    for r in every:  # a resumed run may log a step twice; the later record wins
        if not is_val_record(r):
            by_step[r["step"]] = r
    records = [by_step[s] for s in sorted(by_step)]
    vals = val_records(every)  # validation records: their own plot, per timestep bucket
    evals = read_jsonl(evals_path(run_dir))
    events = read_jsonl(events_path(run_dir))
    status = run_status(run_dir, query_slurm=False)
    name = status["name"]
    plots = {
        "loss": _plot(os.path.join(out_dir, "loss.png"), loss_panels(records), records, f"{name}: loss"),
        "throughput": _plot(os.path.join(out_dir, "throughput.png"), [
            ("samples/s", [("samples_per_sec", "samples/s (global)", True)]),
            ("MFU", [("mfu", "MFU", True)]),
            ("s / step", [("step_time", "step", False), ("data_time", "data wait", False),
                          ("fwd_time", "forward", False), ("bwd_time", "backward", False),
                          ("opt_time", "optimizer", False), ("sync_time", "sync", False)]),
        ], records, f"{name}: throughput"),
        "optim": _plot(os.path.join(out_dir, "optim.png"), [
            ("lr", [("lr", "lr", False)]),
            ("grad norm", [("grad_norm", "grad norm", True)]),
            ("skipped steps", [("skipped_steps", "non-finite steps skipped (total)", False)]),
        ], records, f"{name}: optimisation"),
        "memory": _plot(os.path.join(out_dir, "memory.png"), [
            ("GB", [("mem_allocated_gb", "GPU allocated", False), ("mem_reserved_gb", "GPU reserved", False),
                    ("rss_gb", "host RSS", False)]),
        ], records, f"{name}: memory"),
        "validation": _plot(os.path.join(out_dir, "validation.png"), [
            ("loss", [("loss", "training loss (batch, random t)", True), ("val/loss", "held-out, raw weights", False),
                      ("val/ema_loss", "held-out, EMA weights", False)]),
            ("raw, by timestep", [(k, f"t={t}", False) for k, t in _buckets(vals)]),
            ("EMA, by timestep", [(k.replace("val/loss_t", "val/ema_loss_t"), f"t={t}", False) for k, t in _buckets(vals)]),
        ], sorted(vals + records, key=lambda r: r["step"]),
            f"{name}: validation loss (fixed held-out latents, timesteps and noise)") if vals else None,
        "fid": _plot(os.path.join(out_dir, "fid.png"), [("FID", [("fid", "FID", False)])],
                     [e for e in evals if "step" in e], f"{name}: FID") if evals else None,
    }
    lines = [f"# Run report: {name}", "", f"Run directory: `{status['run_dir']}`", ""]
    lines += ["| | |", "|---|---|",
              f"| state | **{status['state']}** {' '.join('`' + f + '`' for f in status['flags'])} |",
              f"| step | {status['step']} / {status['total_steps']} |",
              f"| stage / resolution | {status['stage']} / {status['resolution']} px |",
              f"| last loss (mean of last window) | {_fmt(status['loss'])} ({_fmt(status['loss_trend']['recent_mean'])}) |",
              f"| samples/s | {_fmt(_last(records, 'samples_per_sec'), '.1f')} |",
              f"| MFU | {_fmt(None if _last(records, 'mfu') is None else 100 * _last(records, 'mfu'), '.2f')} % "
              f"(peak {_fmt(_last(records, 'peak_tflops'), '.3g')} TFLOP/s per device) |",
              f"| ETA | {format_duration(status['eta_sec'])} |",
              f"| skipped (non-finite) steps | {int(status['skipped_steps'] or 0)} |",
              f"| last checkpoint | {status['last_checkpoint']['tag'] or 'none'} |",
              f"| samples seen | {_last(records, 'samples_seen') or 0} |", ""]
    if status["reason"] and status["state"] != "finished":
        lines += [f"Why {status['state']}: {status['reason']}", ""]
    if status.get("validation"):
        v = status["validation"]
        lines += [f"Validation (step {v['step']}): raw {_fmt(v['loss'])}, EMA {_fmt(v['ema_loss'])} ({v['trend']}); "
                  f"best EMA {_fmt(v['best_ema_loss'])} at step {v['best_step']}, {v['evaluations']} evaluations", ""]
    for key in ("loss", "validation", "throughput", "optim", "memory", "fid"):
        if plots[key]:
            lines += [f"![{key}]({os.path.relpath(plots[key], out_dir)})", ""]
    if evals:
        lines += ["## Evaluations", "", "| step | samples | cfg | sampler | FID | IS |", "|---|---|---|---|---|---|"]
        for e in evals:
            lines.append(f"| {e.get('step')} | {e.get('num_samples')} | {e.get('cfg_scale')} | {e.get('sampler')} "
                         f"{e.get('sampling_steps')} | {_fmt(e.get('fid', next((v for k, v in e.items() if k.startswith('fd_')), None)), '.2f')} | {_fmt(e.get('inception_score'), '.2f')} |")
        lines.append("")
    alerts = [e for e in events if e.get("event") in ("alert", "error")]
    if alerts:
        lines += ["## Alerts and errors", ""]
        lines += [f"- step {a.get('step', '?')}: **{a.get('title') or a.get('kind')}** {a.get('text') or a.get('message', '')}"
                  for a in alerts[-30:]]
        lines.append("")
    images = [e for e in events if e.get("event") == "image" and os.path.exists(str(e.get("path")))]
    if images:
        lines += ["## EMA sample grids", ""]
        for e in images[-6:]:
            lines += [f"step {e['step']}:", "", f"![step {e['step']}]({os.path.relpath(e['path'], out_dir)})", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plots (PNG) and a markdown summary of a DiT training run.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"error: not a directory: {args.run_dir}", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
