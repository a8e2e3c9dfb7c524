"""Slurm integration: the real cluster/*.slurm scripts, one-node jobs (CPU ranks, gloo).

They run on the session's two-node cluster (tests/slurm_support.py: node1 and node2, 2 CPUs each), where a
``--nodes=1 --ntasks-per-node=2`` job gets one node to itself, as on the single-node cluster these tests were written
for; Slurm picks the node. Job state is polled with ``scontrol show job`` (no accounting database here, so no sacct)
with bounded waits that fail with the job's output attached.

Jobs (2 CPU ranks each, tiny DiT, fp32 — deterministic, so losses compare exactly):
- an uninterrupted 60-step run of cluster/train_xl.slurm (also the reference trajectory; tests/slurm_support.py);
- the same job sent USR1 mid-run: checkpoint → exit 75 → self-requeue → resume → equal losses;
- `scontrol requeue` of an attempt that cannot exit cleanly: the requeued attempt reclaims its own lease at once;
- a config typo: FAILED in seconds with the key named;
- scancel: a checkpoint within KillWait, the job stays CANCELLED (no requeue);
- a killed rank: FAILED with the rank named, last checkpoint intact;
- an encode array of 2 tasks: disjoint shards covering every image exactly once.
The two-node jobs are in tests/test_slurm_multinode.py.
"""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import tarfile
import time

from tests.runs import losses_by_step as losses
from tests.slurm_support import (CPU_ALLOC, REPO, STEPS, TERMINAL, job_info, read_output, submit, train_env,
                                 wait_for, wait_job)
from trainer.rundir import read_metrics as metrics


def test_train_xl_runs_to_completion(reference_run):
    info, out, run_dir = reference_run["info"], reference_run["out"], reference_run["run_dir"]
    text = read_output(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info.get('JobState')}\n{text[-4000:]}"
    steps = sorted(losses(run_dir))
    assert steps == list(range(1, STEPS + 1)), f"metrics.jsonl steps {steps}"
    assert "world 2 (CPU)" in text and "launcher srun" in text
    # Launch record: resolved config, environment without secrets, the command.
    tag = f"{reference_run['job']}-0"
    launch = os.path.join(run_dir, "launch")
    env_text = read_output(os.path.join(launch, f"env-{tag}.txt"))
    assert "SLURM_JOB_ID=" in env_text and "MASTER_ADDR=" in env_text and "NCCL_DEBUG=" in env_text
    assert "must-not-leak" not in env_text and "WANDB_API_KEY" not in env_text and "TOKEN" not in env_text
    assert os.path.isfile(os.path.join(launch, f"config-{tag}.yaml"))
    assert "trainer/main.py" in read_output(os.path.join(launch, f"command-{tag}.sh"))


def test_usr1_checkpoints_requeues_and_resumes_identically(reference_run, demo_root, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    job = submit("cluster/train_xl.slurm", out, train_env(run_dir, demo_root), CPU_ALLOC)
    out = out.replace("%j", job)
    # Signal once some steps are logged, well before the end.
    wait_for(lambda: len(metrics(run_dir)) >= 8 or job_info(job).get("JobState") in TERMINAL, 150,
             "8 logged steps", lambda: read_output(out)[-4000:])
    seen = len(metrics(run_dir))
    assert seen < STEPS, f"run finished before the signal could be sent ({seen} steps)"
    sig = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr

    def finished_after_requeue(info):
        if info.get("JobState") in TERMINAL and int(info.get("Restarts", "0")) == 0:
            raise AssertionError(f"job ended ({info.get('JobState')}) without requeueing\n{read_output(out)[-5000:]}")
        return info.get("JobState") in TERMINAL and int(info.get("Restarts", "0")) >= 1

    info = wait_job(job, out, 200, "requeue and finish", finished_after_requeue)
    text = read_output(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info["Restarts"] == "1", info
    # The signal reached the python ranks (their own handler printed it), they saved and exited 75.
    assert re.search(r"^0: \[preemption\] received SIGUSR1", text, re.M), text[-5000:]
    assert re.search(r"^1: \[preemption\] received SIGUSR1", text, re.M), text[-5000:]
    m = re.search(r"preempted \(SIGUSR1\) at step (\d+)", text)
    assert m, text[-5000:]
    preempted_at = int(m.group(1))
    assert "requeueing job" in text
    # Second attempt (SLURM_RESTART_COUNT=1) resumed from that checkpoint; the output file was appended.
    assert f"job {job} attempt 1 (SLURM_RESTART_COUNT)" in text and f"job {job} attempt 0" in text
    assert f"resumed from {run_dir}/checkpoints/step{preempted_at:08d} at step {preempted_at}" in text
    history = [json.loads(line) for line in open(os.path.join(run_dir, "launch", "history.jsonl"))]
    assert [(h["restart"], h["outcome"]) for h in history] == [(0, "preempted"), (1, "finished")], history
    assert history[0]["requeued"] is True
    # One W&B run across both attempts, where the trainer could start W&B (offline mode writes
    # RUN_DIR/wandb/offline-run-<time>-<id> per attempt; the id lives in RUN_DIR/wandb_run_id).
    wandb_dirs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    if wandb_dirs:
        run_id = open(os.path.join(run_dir, "wandb_run_id")).read().strip()
        assert {d.rsplit("-", 1)[-1] for d in wandb_dirs} == {run_id}, wandb_dirs
        assert len(wandb_dirs) == 2, wandb_dirs
    # Loss trajectory equals the uninterrupted run's, step by step (fp32 CPU: exactly).
    ref, got = losses(reference_run["run_dir"]), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    mismatched = [(s, ref[s], got[s]) for s in ref if abs(ref[s] - got[s]) > 1e-6 * max(1.0, abs(ref[s]))]
    assert not mismatched, f"loss differs from the uninterrupted run at (step, ref, got): {mismatched[:5]}"


def test_requeue_of_a_killed_attempt_takes_its_own_lease_back_at_once(reference_run, demo_root, tmp_path):
    """`scontrol requeue` while the ranks sit in the post-checkpoint pause: TERM cannot end them before KillWait,
    so they are SIGKILLed and never release the run directory. The requeued attempt is the same job, so it takes
    its lease back at once (no 5-minute lease timeout), resumes, and logs every step exactly once."""
    from trainer.state.lease import read_lease

    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = dict(train_env(run_dir, demo_root, "checkpoint.every=10"), DIT_FAULT_PAUSE_AFTER_CHECKPOINT="10:300")
    job = submit("cluster/train_xl.slurm", out, env, CPU_ALLOC)
    out = out.replace("%j", job)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    wait_for(lambda: os.path.exists(latest) and open(latest).read().strip() == "step00000010"
             or job_info(job).get("JobState") in TERMINAL, 150, "the step-10 checkpoint", lambda: read_output(out)[-4000:])
    holder = read_lease(run_dir)
    assert holder["slurm_job_id"] == job and holder["slurm_restart"] == 0, holder
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    info = wait_job(job, out, 240, "requeue and finish",
                    lambda i: i.get("JobState") in TERMINAL and int(i.get("Restarts", "0")) >= 1)
    text = read_output(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    takeovers = [json.loads(line) for line in open(os.path.join(run_dir, "events.jsonl"))
                 if '"lease_takeover"' in line]
    assert len(takeovers) == 1, takeovers
    assert takeovers[0]["reason"] == f"same Slurm job {job} requeued (attempt 0 -> 1)", takeovers
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps
    ref, got = losses(reference_run["run_dir"]), losses(run_dir)
    assert all(abs(ref[s] - got[s]) <= 1e-6 * max(1.0, abs(ref[s])) for s in ref)


def test_invalid_config_fails_fast_naming_the_key(slurm, demo_root, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = {"CONFIG": "configs/tiny.yaml", "RUN_DIR": run_dir, "OVERRIDES": f"data.root={demo_root} train.max_step=5"}
    t0 = time.monotonic()
    job = submit("cluster/train_xl.slurm", out, env, CPU_ALLOC)
    out = out.replace("%j", job)
    info = wait_job(job, out, 60, "fail")
    elapsed = time.monotonic() - t0
    text = read_output(out)
    assert info["JobState"] == "FAILED", f"{info.get('JobState')}\n{text}"
    assert info["ExitCode"] != "0:0"
    assert re.search(r"^error: .*train\.max_step\b", text, re.M), text
    assert "starting 2 rank(s)" not in text  # nothing was launched
    assert elapsed < 60


def test_scancel_checkpoints_and_stays_cancelled(slurm, demo_root, tmp_path):
    """A user's scancel (TERM to every process) saves a checkpoint within KillWait but never requeues."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    job = submit("cluster/train_xl.slurm", out, train_env(run_dir, demo_root, "train.max_steps=400"), CPU_ALLOC)
    out = out.replace("%j", job)
    wait_for(lambda: len(metrics(run_dir)) >= 5 or job_info(job).get("JobState") in TERMINAL, 150,
             "5 logged steps", lambda: read_output(out)[-4000:])
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = wait_job(job, out, 90, "end after scancel")
    wait_for(lambda: "not requeueing" in read_output(out) or job_info(job).get("JobState") == "PENDING", 30,
             "the launcher's last line", lambda: read_output(out)[-3000:])
    info = job_info(job)
    text = read_output(out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info.get('JobState')}\n{text[-3000:]}"
    m = re.search(r"preempted \(SIG(?:TERM|USR1)\) at step (\d+)", text)
    assert m and "not requeueing" in text, text[-3000:]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == f"step{int(m.group(1)):08d}"


def _rank_pids(job_id: str, rank: str) -> list[int]:
    pids = []
    for env_path in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(env_path, "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            with open(env_path.replace("environ", "cmdline"), "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if (env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == rank.encode()
                and b"trainer/main.py" in cmdline and env.get(b"SLURM_STEP_ID") not in (None, b"batch")):
            pids.append(int(env_path.split("/")[2]))
    return pids


def test_killed_rank_fails_job_naming_rank_and_keeps_checkpoint(slurm, demo_root, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "job-%j.out")
    env = train_env(run_dir, demo_root, "checkpoint.every=5 train.max_steps=400")
    job = submit("cluster/train_xl.slurm", out, env, CPU_ALLOC)
    out = out.replace("%j", job)
    latest = os.path.join(run_dir, "checkpoints", "latest")
    wait_for(lambda: os.path.exists(latest) or job_info(job).get("JobState") in TERMINAL, 150,
             "a first checkpoint", lambda: read_output(out)[-4000:])
    pids = wait_for(lambda: _rank_pids(job, "1"), 30, "rank 1's process", lambda: read_output(out)[-3000:])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    info = wait_job(job, out, 120, "fail")
    text = read_output(out)
    assert info["JobState"] == "FAILED", f"{info.get('JobState')}\n{text[-4000:]}"
    assert info["ExitCode"] != "0:0" and int(info.get("Restarts", "0")) == 0
    assert re.search(r"^error: training FAILED: rank 1 on \S+: Killed", text, re.M), text[-4000:]
    # The last complete checkpoint is intact and resumable.
    tag = open(latest).read().strip()
    ckpt = os.path.join(run_dir, "checkpoints", tag)
    assert os.path.isdir(ckpt), f"latest points at missing {ckpt}"
    from trainer.state.checkpoint import find_resumable

    assert find_resumable(os.path.join(run_dir, "checkpoints")) == ckpt


def _png_class_folder(root: str) -> dict[str, str]:
    """Real photos from scikit-image's wheel in ImageNet layout (PNG): {relative path: class name}."""
    import skimage.data
    from PIL import Image

    src = os.path.dirname(skimage.data.__file__)
    photos = {"cat": ["chelsea.png", "coffee.png"], "space": ["astronaut.png", "rocket.jpg"],
              "street": ["motorcycle_left.png", "camera.png", "horse.png"]}
    files = {}
    for cls, names in sorted(photos.items()):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name in names:
            rel = os.path.join(cls, os.path.splitext(name)[0] + ".png")
            Image.open(os.path.join(src, name)).convert("RGB").save(os.path.join(root, rel))
            files[rel] = cls
    return files


def test_encode_array_writes_disjoint_shards_covering_every_image_once(slurm, tmp_path):
    images = str(tmp_path / "images")
    files = _png_class_folder(images)
    out_root = str(tmp_path / "latents")
    pca = str(tmp_path / "pca.npz")
    fit = subprocess.run(["python", "-m", "data_pipeline.encode", "fit-pca", "--input", images, "--resolutions", "64",
                          "--out", pca], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert fit.returncode == 0, fit.stderr[-3000:]
    env = {"INPUT": images, "OUT": out_root, "RESOLUTIONS": "64", "VAE": "pca", "PCA_FILE": pca,
           "ENCODE_ARGS": "--samples-per-shard 2"}
    out = str(tmp_path / "enc-%A_%a.out")
    job = submit("cluster/encode_array.slurm", out, env,
                 ["--array=0-1", "--cpus-per-task=1", "--gres=none"])
    outs = [out.replace("%A", job).replace("%a", str(i)) for i in range(2)]
    for i in range(2):
        task = f"{job}_{i}"
        info = wait_job(task, outs[i], 180, f"finish array task {i}")
        assert info["JobState"] == "COMPLETED", f"task {i}: {info.get('JobState')}\n{read_output(outs[i])[-3000:]}"
    shard_dir = os.path.join(out_root, "64")
    shards = sorted(glob.glob(os.path.join(shard_dir, "*.tar")))
    by_part: dict[int, set] = {}
    keys: list[str] = []
    for path in shards:
        m = re.search(r"latents-(\d+)-\d+\.tar$", os.path.basename(path))
        assert m, f"unexpected shard name {path}"
        with tarfile.open(path) as tar:
            shard_keys = {n.split(".", 1)[0] for n in tar.getnames()}
        by_part.setdefault(int(m.group(1)), set()).update(shard_keys)
        keys.extend(shard_keys)
    assert sorted(by_part) == [0, 1], f"shards per part: { {p: len(k) for p, k in by_part.items()} }"
    assert not (by_part[0] & by_part[1]), "the two array tasks wrote the same sample"
    assert len(keys) == len(set(keys)) == len(files), f"{len(keys)} samples for {len(files)} images"
    manifest = json.load(open(os.path.join(shard_dir, "manifest.json")))
    assert manifest["num_samples"] == len(files)
    # Each sample's label matches its image's class folder: every image exactly once.
    classes = sorted(set(files.values()))
    labels = []
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(member).read().decode().strip()))
    assert sorted(labels) == sorted(classes.index(c) for c in files.values())
