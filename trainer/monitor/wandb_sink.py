"""W&B as a metrics sink: one W&B run per training run, reused across resumes and requeues.

* The run id lives in ``run.dir/wandb_run_id``; a resumed or requeued job continues the same W&B run
  (``resume="allow"``). After a crash W&B may already hold a few steps past the resumed checkpoint;
  W&B drops re-logged steps lower than its last one (a warning, not an error).
* Logged config: the resolved run config, the filled DeepSpeed config (``run.dir/ds_config.json``) and
  the model architecture; keys that look like credentials are removed (``scrub``).
* Metrics: the same flat names as ``metrics.jsonl`` (see trainer/monitor/monitor.py); sample grids as
  ``wandb.Image`` under ``samples``; evaluation results (``evals.jsonl``, written by
  ``trainer.evaluate``) under ``eval/*`` on their own step axis ``eval/step``.
* Offline mode (``log.wandb.mode=offline`` or ``WANDB_MODE=offline``) needs no network: the run lands in
  ``run.dir/wandb/offline-run-*/run-<id>.wandb``; upload later with ``wandb sync run.dir/wandb/offline-run-*``.
  ``read_run_records`` reads those files back (tests, debugging).
* No API key is written by us: W&B reads ``WANDB_API_KEY`` or ``~/.netrc`` itself. Any W&B failure
  (import, init, a log call) is reported and training goes on without it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import string
import struct
import sys

from trainer.config.schema import RunConfig, config_to_dict
from trainer.rundir import (DS_CONFIG, WANDB_RUN_ID as RUN_ID_FILE, WANDB_STATE, atomic_write_text, evals_path, read_json,
                            read_jsonl)

SECRET_KEY_RE = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def scrub(obj):
    """A copy without entries whose key looks like a credential (any depth)."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if not SECRET_KEY_RE.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _read_or_create_run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id style
    atomic_write_text(path, run_id + "\n")
    return run_id


def resolved_config(cfg: RunConfig, run_dir: str, state=None) -> dict:
    out = {"config": config_to_dict(cfg)}
    ds_path = os.path.join(run_dir, DS_CONFIG)
    if os.path.exists(ds_path):
        try:
            with open(ds_path) as f:
                out["deepspeed"] = json.load(f)
        except (OSError, ValueError):
            pass
    if state is not None and getattr(state, "model_config", None):
        out["model_arch"] = dict(state.model_config)
    env = {k: os.environ[k] for k in ("WORLD_SIZE", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES") if k in os.environ}
    if env:
        out["launch"] = env
    return scrub(out)


class WandbSink:
    def __init__(self, cfg: RunConfig, run_dir: str, state=None):
        import wandb

        self.wandb = wandb
        wb = cfg.log.wandb
        self.run_id = _read_or_create_run_id(run_dir)
        mode = os.environ.get("WANDB_MODE") or wb.mode  # the environment wins (e.g. offline on a node without network)
        self.run = wandb.init(
            project=wb.project, entity=wb.entity or None, group=wb.group or None, tags=list(wb.tags) or None,
            mode=mode, id=self.run_id, resume="allow", dir=run_dir, config=resolved_config(cfg, run_dir, state),
            name=cfg.run.name or os.path.basename(os.path.abspath(run_dir)),
            settings=wandb.Settings(console="off", silent=True),
        )
        self.mode = getattr(self.run.settings, "mode", mode)
        self.run.define_metric("eval/step")
        self.run.define_metric("eval/*", step_metric="eval/step")
        self.evals_path = evals_path(run_dir)
        # How many evals.jsonl records were already sent, kept in the run dir so a resumed run does not re-send.
        self.state_path = os.path.join(run_dir, WANDB_STATE)
        self._evals_seen = int((read_json(self.state_path) or {}).get("evals_sent", 0))

    def log(self, record: dict) -> None:
        step = record.get("step")
        data = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                and not isinstance(v, bool)}
        before = self._evals_seen
        data.update(self._new_evals())
        self.run.log(data, step=step)
        if self._evals_seen != before:  # recorded after the send: at most a crash's worth is sent twice
            atomic_write_text(self.state_path, json.dumps({"evals_sent": self._evals_seen}), fsync=False)

    def _new_evals(self) -> dict:
        """Evaluation records appended by ``trainer.evaluate`` since the last call (latest wins)."""
        if not os.path.exists(self.evals_path):
            return {}
        records = read_jsonl(self.evals_path)
        new, self._evals_seen = records[self._evals_seen:], len(records)
        out = {}
        for r in new:
            out["eval/step"] = r.get("step", 0)
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"eval/{k}"] = v
        return out

    def event(self, record: dict) -> None:
        """Rollbacks become a history row at the step that failed (the alert comes separately). W&B keeps one
        history per step and only moves forward: the steps trained again after a rollback (to_step+1 .. from_step)
        keep the failed attempt's values there; metrics.jsonl holds the ones that count."""
        if record.get("event") == "rollback":
            self.run.log({"rollback/count": record["rollback"], "rollback/to_step": record["to_step"],
                          "rollback/skipped_samples": record["skipped_samples"]}, step=record["from_step"])

    def log_image(self, step: int, key: str, path: str, info: dict | None = None) -> None:
        self.run.log({key: self.wandb.Image(path, caption=os.path.basename(path)),
                      **{f"{key}/{name}": value for name, value in (info or {}).items()}}, step=step)

    def alert(self, title: str, text: str, level: str = "WARN") -> None:
        if self.mode == "online":  # alerts need the server; offline runs keep them in events.jsonl
            level_enum = getattr(self.wandb.AlertLevel, level, self.wandb.AlertLevel.WARN)
            self.run.alert(title=title, text=text, level=level_enum, wait_duration=60)

    def close(self) -> None:
        pending = self._new_evals()  # an evaluation after the last logged step (e.g. at the final step)
        if pending:
            self.run.log(pending)
            atomic_write_text(self.state_path, json.dumps({"evals_sent": self._evals_seen}), fsync=False)
        self.run.finish()


def make_wandb_sink(cfg: RunConfig, run_dir: str, state=None):
    if cfg.log.wandb.mode == "disabled":
        return None
    try:
        sink = WandbSink(cfg, run_dir, state)
    except Exception as exc:  # noqa: BLE001 - W&B must never stop training
        print(f"[wandb] WARNING: W&B disabled for this run: {exc}", file=sys.stderr, flush=True)
        return None
    if state is not None:
        state.wandb_run_id = sink.run_id
    return sink


# --------------------------------------------------------------------------- reading run files back
# A ``run-<id>.wandb`` file is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version 0),
# then 32 KiB blocks of records, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
# 3 middle, 4 last); a block's tail shorter than a header is zero padding. Each complete record is a
# serialized ``wandb.proto.wandb_internal_pb2.Record``.
_BLOCK = 32768
_HEADER = 7


def iter_wandb_records(path: str):
    """Yield ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            payload, pending = pending + chunk, b""
        else:
            break
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def read_run_records(path: str) -> dict:
    """Summary of one run file: run id, config, history rows (dicts), alerts and file names."""
    out = {"run_id": None, "config": {}, "history": [], "files": [], "alerts": []}
    for rec in iter_wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                value = json.loads(item.value_json)
                if item.key:
                    row[item.key] = value
                else:  # a nested value (e.g. an image's fields) is stored one leaf per record item
                    node = row
                    for part in item.nested_key[:-1]:
                        node = node.setdefault(part, {})
                    node[item.nested_key[-1]] = value
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            out["history"].append(row)
        elif kind == "files":
            out["files"].extend(f.path for f in rec.files.files)
        elif kind == "alert":
            out["alerts"].append(rec.alert.title)
    return out
