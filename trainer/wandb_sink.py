"""W&B as a metrics sink: one W&B run per training run, reused across resumes and requeues.

The run id lives in ``run.dir/wandb_run_id`` so a resumed or requeued job continues the same W&B
run (``resume="allow"``). Offline mode writes real run files that ``wandb sync`` uploads later.
Any W&B failure is reported and training goes on without it.
"""
from __future__ import annotations

import os
import sys

from trainer.config import RunConfig, config_to_dict

RUN_ID_FILE = "wandb_run_id"


def _read_or_create_run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    import wandb

    run_id = wandb.util.generate_id()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class WandbSink:
    def __init__(self, cfg: RunConfig, run_dir: str):
        import wandb

        self.wandb = wandb
        wb = cfg.log.wandb
        self.run_id = _read_or_create_run_id(run_dir)
        self.run = wandb.init(
            project=wb.project, entity=wb.entity or None, group=wb.group or None, tags=list(wb.tags) or None,
            mode=wb.mode, id=self.run_id, resume="allow", dir=run_dir, config=config_to_dict(cfg),
            name=cfg.run.name or os.path.basename(os.path.abspath(run_dir)),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict) -> None:
        step = record.get("step")
        data = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(data, step=step)

    def event(self, record: dict) -> None:
        pass

    def log_image(self, step: int, key: str, path: str) -> None:
        self.run.log({key: self.wandb.Image(path)}, step=step)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        level_enum = getattr(self.wandb.AlertLevel, level, self.wandb.AlertLevel.WARN)
        if self.run.settings.mode == "online":
            self.run.alert(title=title, text=text, level=level_enum)

    def close(self) -> None:
        self.run.finish()


def make_wandb_sink(cfg: RunConfig, run_dir: str, state=None):
    if cfg.log.wandb.mode == "disabled":
        return None
    try:
        sink = WandbSink(cfg, run_dir)
    except Exception as exc:  # noqa: BLE001 - W&B must never stop training
        print(f"[wandb] WARNING: W&B disabled for this run: {exc}", file=sys.stderr, flush=True)
        return None
    if state is not None:
        state.wandb_run_id = sink.run_id
    return sink
