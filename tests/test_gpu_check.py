"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step on CPU with tiny shapes (issue 20 item 12).

On CPU the device tests are collected and skip with their reason, the timing runs a 2-block DiT pair, and the
record is written where asked (never into benchmarks/results/, which holds GPU records only).
"""
import glob
import json
import os
import resource
import subprocess
import sys
import time
import warnings

from tests.runs import REPO


def test_dry_run_walks_the_whole_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_dryrun.json"
    results_before = set(glob.glob(os.path.join(REPO, "benchmarks", "results", "gpu_*.json")))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="2")
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.time()
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.time() - wall
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["benchmark"] == "gpu_check"
    # step 1: every device test was collected and skipped with the reason
    tests = record["device_tests"]
    assert tests["ran"] and tests["failed"] == 0 and len(tests["cases"]) >= 10
    assert all(c["outcome"].startswith("skipped: needs a CUDA GPU") for c in tests["cases"].values())
    # step 2: both implementations timed, with the figures the GPU record carries
    rows = {(r["impl"], r["compiled"]): r for r in record["rows"]}
    for impl in ("ours", "diffusers"):
        r = rows[(impl, False)]
        assert r["batch"] == 2 and r["samples_per_s"] > 0 and r["tflops"] > 0 and r["mfu_measured"] > 0
    assert record["ratios"][0]["ours_over_diffusers"] > 0
    assert record["environment"]["torch"] and record["environment"]["diffusers"]
    # step 3: the real Trainer ran its steps from latent shards and timed them between log steps
    trainer = json.loads((tmp_path / "gpu_dryrun_trainer.json").read_text())
    assert trainer["benchmark"] == "gpu_trainer" and trainer["dry_run"] is True
    run = trainer["variants"]["eager"]
    assert run["exit_code"] == 0 and run["window"] == [11, 15] and run["samples_per_s"] > 0
    assert [r["step"] for r in run["trainer_records"]] == [10, 20, 24]
    assert all(r["loss"] == r["loss"] and r["samples_per_sec"] > 0 for r in run["trainer_records"])
    assert "syncs" not in run  # CUDA's sync-debug mode has nothing to count on CPU
    # the record fills docs/performance.md's GPU table
    table = subprocess.run([sys.executable, "benchmarks/bench_gpu_step.py", "--markdown", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=120).stdout
    assert "| 64 | ours | no | 2 |" in table and "| 64 | diffusers | no | 2 |" in table and "ours ÷ diffusers" in table
    # nothing fetched, nothing written where GPU records live
    assert not os.path.exists(tmp_path / "hf") or not os.listdir(tmp_path / "hf")
    assert set(glob.glob(os.path.join(REPO, "benchmarks", "results", "gpu_*.json"))) == results_before
    # under a minute of work (CPU seconds, which a loaded shared machine does not inflate the way it does wall time)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    assert cpu < 60, f"dry run used {cpu:.0f} CPU seconds ({wall:.0f} s wall)"


def test_cuda_sync_warnings_are_attributed_like_the_cpu_counter():
    """bench_gpu_trainer's recorder files each of CUDA's "called a synchronizing CUDA operation" warnings under its
    step and the innermost frame outside torch, the warnings machinery and the benchmark (tests/host_syncs.py's
    rule); other warnings pass through."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_gpu_trainer import SYNC_WARNING, SyncRecorder

    recorder = SyncRecorder()
    recorder.step = 3
    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        warnings.showwarning = recorder.showwarning

        def reads_a_device_tensor():
            warnings.warn(SYNC_WARNING)  # how torch's C++ TORCH_WARN reaches Python
            return sys._getframe().f_lineno - 1

        line = reads_a_device_tensor()
        warnings.warn("something else")
    assert recorder.records == [(3, "trainer", f"tests/test_gpu_check.py:{line} reads_a_device_tensor")]
    assert [str(w.message) for w in passed] == ["something else"]
