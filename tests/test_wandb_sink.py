"""The W&B sink in-process, offline: run id file, resolved/scrubbed config, eval records on their own axis,
resume into the same run, alerts kept out of offline runs, and the run-file reader."""
import glob
import json
import os

import pytest

from trainer.config.schema import load_config
from trainer.monitor.wandb_sink import RUN_ID_FILE, make_wandb_sink, read_run_records


class _State:
    model_config = {"depth": 2, "hidden_size": 64}
    wandb_run_id = ""


def _complete(path):
    """The W&B service may finish writing the run file just after ``finish()`` returns: wait for its exit record."""
    from tests.runs import wait_for
    from trainer.monitor.wandb_sink import iter_wandb_records

    def done():
        try:
            return any(r.WhichOneof("record_type") == "exit" for r in iter_wandb_records(path))
        except Exception:  # noqa: BLE001 - a half-written record
            return False

    wait_for(done, 60, f"the exit record of {path}")
    return read_run_records(path)


def _files(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")), key=os.path.getmtime)


def test_offline_sink_round_trip_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = str(tmp_path)
    cfg = load_config(None, ["log.wandb.mode=offline", "log.wandb.tags=[a,b]", f"run.dir={run_dir}"])
    with open(os.path.join(run_dir, "ds_config.json"), "w") as f:
        json.dump({"train_batch_size": 8, "zero_optimization": {"stage": 2}}, f)
    state = _State()
    sink = make_wandb_sink(cfg, run_dir, state)
    assert sink is not None and sink.mode == "offline"
    run_id = open(os.path.join(run_dir, RUN_ID_FILE)).read().strip()
    assert state.wandb_run_id == run_id and len(run_id) == 8
    sink.log({"step": 1, "loss": 0.5, "resolution": 64, "note": "strings are not W&B scalars"})
    with open(os.path.join(run_dir, "evals.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "fid": 42.0, "num_samples": 16, "npz": "/x.npz"}) + "\n")
    sink.log({"step": 2, "loss": 0.25})
    sink.log({"step": 3, "loss": 0.2})  # the eval record is forwarded once
    sink.alert("stall", "no step", "ERROR")  # offline: no wandb.alert (events.jsonl keeps it)
    sink.close()

    rec = _complete(_files(run_dir)[0])
    assert rec["run_id"] == run_id and not rec["alerts"]
    assert rec["config"]["config"]["log"]["wandb"]["tags"] == ["a", "b"]
    assert rec["config"]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert rec["config"]["model_arch"] == {"depth": 2, "hidden_size": 64}
    rows = {r["_step"]: r for r in rec["history"]}
    assert rows[1]["loss"] == 0.5 and "note" not in rows[1]
    assert rows[2]["eval/fid"] == 42.0 and rows[2]["eval/step"] == 1 and rows[2]["eval/num_samples"] == 16
    assert "eval/fid" not in rows[3]

    again = make_wandb_sink(cfg, run_dir, _State())  # a resume / requeue: same id, same W&B run
    assert again.run_id == run_id
    again.log({"step": 4, "loss": 0.1})  # the eval sent before the resume is not sent again
    with open(os.path.join(run_dir, "evals.jsonl"), "a") as f:
        f.write(json.dumps({"step": 4, "fid": 40.0, "num_samples": 16}) + "\n")
    again.log({"step": 5, "loss": 0.1})  # ...but one recorded after it is
    again.close()
    files = _files(run_dir)
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    history = {r["_step"]: r for r in _complete(files[1])["history"]}
    assert sorted(history) == [4, 5]
    assert "eval/fid" not in history[4] and history[5]["eval/fid"] == 40.0 and history[5]["eval/step"] == 4


def test_disabled_mode_makes_no_sink(tmp_path):
    cfg = load_config(None, ["log.wandb.mode=disabled"])
    assert make_wandb_sink(cfg, str(tmp_path)) is None
    assert not os.path.exists(os.path.join(str(tmp_path), RUN_ID_FILE))


def test_reader_rejects_other_files(tmp_path):
    p = tmp_path / "x.wandb"
    p.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError):
        read_run_records(str(p))
