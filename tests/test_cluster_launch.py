"""Unit tests for the Slurm launcher and health checks (no Slurm needed)."""
from __future__ import annotations

import os
import shlex
import sys
import time

import pytest

from cluster import health_check, launch
from cluster.launch import (Allocation, LaunchError, TaskEnd, allocation_from_env, capture_env, classify,
                            make_hostfile, parse_srun_line, settings_from_env)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hosts(nodelist):
    from trainer.engine.launch_env import expand_hostlist

    return expand_hostlist(nodelist)


def slurm_env(**kw):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "10"}
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


# --------------------------------------------------------------------------- allocation


def test_allocation_gpu_nodes():
    a = allocation_from_env(slurm_env(SLURM_RESTART_COUNT="2"), resolve_hosts=hosts)
    assert a.nodes == ["gpu01", "gpu02"] and a.tasks_per_node == 8 and a.world_size == 16
    assert a.master_addr == "gpu01" and a.restart == 2 and a.cpus_per_task == 10 and a.tag == "4242-2"
    assert 20000 <= a.master_port < 40000


def test_allocation_cpu_tasks_from_ntasks_per_node():
    env = slurm_env(SLURM_GPUS_ON_NODE=None, SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="vm")
    a = allocation_from_env(env, resolve_hosts=hosts)
    assert (a.nodes, a.tasks_per_node, a.gpus_per_node, a.world_size) == (["vm"], 2, 0, 2)


def test_allocation_from_tasks_per_node_and_gpus_per_node():
    env = slurm_env(SLURM_NTASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="1(x2)", SLURM_GPUS_ON_NODE=None,
                    SLURM_GPUS_PER_NODE="a100:4")
    a = allocation_from_env(env, resolve_hosts=hosts)
    assert (a.tasks_per_node, a.gpus_per_node, a.world_size) == (4, 4, 8)


def test_allocation_rejects_task_gpu_mismatch_and_uneven_nodes():
    with pytest.raises(LaunchError, match="2 task.*8 GPU"):
        allocation_from_env(slurm_env(SLURM_NTASKS_PER_NODE="2"), resolve_hosts=hosts)
    with pytest.raises(LaunchError, match="uneven"):
        allocation_from_env(slurm_env(SLURM_NTASKS_PER_NODE=None, SLURM_GPUS_ON_NODE=None,
                                      SLURM_TASKS_PER_NODE="2,1"), resolve_hosts=hosts)
    with pytest.raises(LaunchError, match="sbatch"):
        allocation_from_env({}, resolve_hosts=hosts)


def test_settings_from_env():
    s = settings_from_env({"CONFIG": "configs/tiny.yaml", "OVERRIDES": "train.max_steps=5  run.dir='/a b'",
                           "LAUNCHER": "deepspeed", "SRUN_ARGS": "--container-image=x.sqsh"})
    assert s.overrides == ["train.max_steps=5", "run.dir=/a b"] and s.launcher == "deepspeed"
    assert s.ds_config == "zero2.json" and s.srun_args == ["--container-image=x.sqsh"] and s.health_check
    with pytest.raises(LaunchError, match="CONFIG"):
        settings_from_env({})
    with pytest.raises(LaunchError, match="key=value"):
        settings_from_env({"CONFIG": "c.yaml", "OVERRIDES": "train.max_steps"})
    with pytest.raises(LaunchError, match="LAUNCHER"):
        settings_from_env({"CONFIG": "c.yaml", "LAUNCHER": "mpirun"})


# --------------------------------------------------------------------------- launch record


def test_capture_env_keeps_launch_vars_and_drops_secrets():
    env = {"SLURM_JOB_ID": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "2", "NCCL_DEBUG": "WARN",
           "CUDA_VISIBLE_DEVICES": "0,1", "OVERRIDES": "a=b", "WANDB_API_KEY": "s3cret", "WANDB_PROJECT": "dit",
           "HF_TOKEN": "hf_x", "MY_PASSWORD": "p", "AWS_SECRET_ACCESS_KEY": "k", "SLURM_JOB_ACCOUNT_KEY": "k2",
           "nccl_ib_secret": "x", "HOME": "/root", "UNRELATED": "1"}
    got = capture_env(env)
    assert got == {"CUDA_VISIBLE_DEVICES": "0,1", "MASTER_ADDR": "n1", "MASTER_PORT": "2", "NCCL_DEBUG": "WARN",
                   "OVERRIDES": "a=b", "SLURM_JOB_ID": "1", "WANDB_PROJECT": "dit"}
    text = launch.format_env(got)
    assert "s3cret" not in text and "OVERRIDES=a=b\n" in text
    assert launch.format_env({"OVERRIDES": "a=1 b=2"}) == "OVERRIDES='a=1 b=2'\n"


def test_make_hostfile():
    assert make_hostfile(["gpu01", "gpu02"], 8) == "gpu01 slots=8\ngpu02 slots=8\n"
    with pytest.raises(LaunchError):
        make_hostfile([], 8)
    with pytest.raises(LaunchError):
        make_hostfile(["a"], 0)


def _alloc(**kw):
    base = dict(job_id="7", restart=0, nodes=["n1", "n2"], tasks_per_node=4, gpus_per_node=4, cpus_per_task=6)
    base.update(kw)
    return Allocation(**base)


def test_srun_command_one_task_per_gpu():
    s = settings_from_env({"CONFIG": "configs/x.yaml", "PYTHON": "python3"})
    cmd = launch.build_train_command(_alloc(), s, ["a=1"])
    assert cmd[:8] == ["srun", "--label", "--kill-on-bad-exit=1", "--unbuffered", "--nodes=2", "--ntasks=8",
                       "--ntasks-per-node=4", "--cpus-per-task=6"]
    assert cmd[8:] == ["python3", "-u", "trainer/main.py", "--config", "configs/x.yaml", "--ds_config", "zero2.json", "a=1"]


def test_deepspeed_command_one_launcher_per_node(tmp_path):
    s = settings_from_env({"CONFIG": "configs/x.yaml", "LAUNCHER": "deepspeed"})
    hostfile = str(tmp_path / "hostfile")
    cmd = launch.build_train_command(_alloc(), s, ["a=1"], hostfile)
    assert "--ntasks=2" in cmd and "--ntasks-per-node=1" in cmd and "--cpus-per-task=24" in cmd
    i = cmd.index("bash")
    assert 'trap "" USR1 TERM' in cmd[i + 2] and '--node_rank="$SLURM_NODEID"' in cmd[i + 2]
    assert cmd[i + 3:i + 7] == ["deepspeed", "--hostfile", hostfile, "--no_ssh"]
    assert "--master_addr" in cmd and cmd[cmd.index("--master_addr") + 1] == "n1"
    assert cmd[-6:] == ["trainer/main.py", "--config", "configs/x.yaml", "--ds_config", "zero2.json", "a=1"]
    with pytest.raises(LaunchError):
        launch.build_train_command(_alloc(), s, [])


def test_dry_run_writes_launch_record(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    env = {"SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "vm", "SLURM_NTASKS_PER_NODE": "2", "SLURM_RESTART_COUNT": "1",
           "CONFIG": os.path.join(REPO, "configs", "tiny.yaml"), "RUN_DIR": run_dir, "LAUNCHER": "deepspeed",
           "OVERRIDES": "train.max_steps=3", "WANDB_API_KEY": "nope-secret", "GITHUB_TOKEN": "nope-token"}
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    assert launch.main(["--dry-run"]) == 0
    rec = os.path.join(run_dir, "launch")
    assert sorted(os.listdir(rec)) == ["command-99-1.sh", "config-99-1.yaml", "env-99-1.txt", "hostfile-99-1"]
    assert open(os.path.join(rec, "hostfile-99-1")).read() == "vm slots=2\n"
    env_text = open(os.path.join(rec, "env-99-1.txt")).read()
    assert "nope-" not in env_text and "SLURM_JOB_ID=99" in env_text and "MASTER_ADDR=vm" in env_text
    cmd = shlex.split(open(os.path.join(rec, "command-99-1.sh")).read())
    assert f"run.dir={run_dir}" in cmd and "train.max_steps=3" in cmd
    import yaml

    cfg = yaml.safe_load(open(os.path.join(rec, "config-99-1.yaml")))
    assert cfg["run"]["dir"] == run_dir and cfg["train"]["max_steps"] == 3


def test_bad_override_fails_with_key_named(tmp_path, monkeypatch, capsys):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k, raising=False)
    for k, v in {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "vm", "CONFIG": os.path.join(REPO, "configs", "tiny.yaml"),
                 "RUN_DIR": str(tmp_path), "OVERRIDES": "train.max_step=5"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    assert launch.main(["--dry-run"]) == launch.EXIT_CONFIG_ERROR
    assert "train.max_step" in capsys.readouterr().err


# --------------------------------------------------------------------------- outcome


def test_parse_srun_lines():
    assert parse_srun_line("srun: error: gpu07: task 3: Exited with exit code 1") == [TaskEnd(3, "gpu07", "Exited with exit code 1")]
    ends = parse_srun_line("srun: error: vm: tasks 0-1,4: Exited with exit code 75\n")
    assert [e.task for e in ends] == [0, 1, 4] and all(e.code == 75 for e in ends)
    assert parse_srun_line("srun: error: vm: task 2: Killed")[0].code is None
    assert parse_srun_line("0: [trainer] step 1 loss 0.5") == []


def test_classify_outcomes():
    assert classify(0, []).status == "finished"
    pre = classify(75, parse_srun_line("srun: error: vm: tasks 0-1: Exited with exit code 75"))
    assert (pre.status, pre.exit_code) == ("preempted", 75)
    # One rank exits 75 first; srun's --kill-on-bad-exit ends the other: still a preemption.
    ends = parse_srun_line("srun: error: vm: task 1: Exited with exit code 75") + \
        parse_srun_line("srun: error: vm: task 0: Terminated")
    assert classify(75, ends).status == "preempted"
    # A crash names the failing rank first, then what followed.
    ends = parse_srun_line("srun: error: n2: task 5: Exited with exit code 3") + \
        parse_srun_line("srun: error: n1: tasks 0-4: Terminated")
    out = classify(3, ends)
    assert out.status == "failed" and out.exit_code == 3
    assert out.message.startswith("training FAILED: rank 5 on n2: Exited with exit code 3; after it: rank 0")
    killed = classify(137, parse_srun_line("srun: error: vm: task 1: Killed") + parse_srun_line("srun: error: vm: task 0: Terminated"))
    assert killed.status == "failed" and "rank 1 on vm: Killed" in killed.message and killed.exit_code == 137
    # A crash alongside 75s is still a failure (no requeue).
    mixed = parse_srun_line("srun: error: vm: task 0: Exited with exit code 75") + \
        parse_srun_line("srun: error: vm: task 1: Exited with exit code 1")
    assert classify(75, mixed).status == "failed"
    assert classify(1, []).status == "failed" and classify(-9, []).exit_code == 1


# --------------------------------------------------------------------------- health checks


def test_check_gpus():
    assert health_check.check_gpus(0, count_fn=lambda: 0) is None
    assert health_check.check_gpus(8, count_fn=lambda: 8) is None
    problem = health_check.check_gpus(8, count_fn=lambda: 4)
    assert "granted 8 GPU(s)" in problem and "sees 4" in problem

    def broken():
        raise RuntimeError("driver gone")

    assert "driver gone" in health_check.check_gpus(2, count_fn=broken)


def test_check_writable(tmp_path):
    assert health_check.check_writable(str(tmp_path / "new" / "dir")) is None
    assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in health_check.check_writable(str(blocker / "sub"))


def test_health_job_check_reports_trainer_error(tmp_path, capsys):
    rc = health_check.main(["job", "--world-size", "2", "--config", os.path.join(REPO, "configs", "tiny.yaml"), "--",
                            f"data.root={tmp_path}/missing", "train.max_step=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "trainer validation failed" in err and "train.max_step" in err


# --------------------------------------------------------------------------- first failure, hangs


def _verdict(kind, ranks, **kw):
    return dict({"kind": kind, "slurm_job_id": "7", "slurm_restart": 0, "timeout_seconds": 18.0,
                 "ranks": [{"rank": r, "host": h, "role": role, "what": what} for r, h, role, what in ranks]}, **kw)


def test_classify_names_the_verdicts_first_failure_not_sruns_order():
    """SIGKILL on node2's rank: its peer on node1 exits first and srun reports node1 first (what the issue saw)."""
    ends = parse_srun_line("srun: error: node1: task 0: Exited with exit code 1") + \
        parse_srun_line("srun: error: node2: task 1: Killed")
    assert classify(1, ends).message.startswith("training FAILED: rank 0 on node1")  # srun's order alone
    verdict = _verdict("failure", [(1, "node2", "first", "no sign of life since 12:00:01"),
                                   (0, "node1", "then", "RuntimeError: Connection reset by peer")])
    out = classify(1, ends, verdict=verdict)
    assert out.status == "failed" and out.exit_code == 1
    assert out.message == ("training FAILED: rank 1 on node2: Killed (no sign of life since 12:00:01); after it: "
                           "rank 0 on node1 (Exited with exit code 1 (RuntimeError: Connection reset by peer))")
    assert [(t.task, t.node) for t in out.failed_tasks] == [(1, "node2"), (0, "node1")]


def test_classify_hang_exit_7_names_the_stuck_rank():
    ends = parse_srun_line("srun: error: node1: task 0: Exited with exit code 7") + \
        parse_srun_line("srun: error: node2: task 1: Killed")
    verdict = _verdict("hang", [(1, "node2", "first", "no sign of life for 19 s"), (0, "node1", "then", "waiting")])
    out = classify(7, ends, verdict=verdict)
    assert (out.status, out.exit_code) == ("hung", launch.EXIT_HUNG) and launch.EXIT_HUNG == 7
    assert out.message == ("training HUNG, no progress for 18 s (run.hang_timeout_minutes): rank 1 on node2: no sign "
                           "of life for 19 s; after it: rank 0 on node1 (Exited with exit code 7 (waiting))")
    # Without a verdict (none could be written), exit 7 still means a hang, with the reporting task named.
    bare = classify(7, ends[:1])
    assert bare.status == "hung" and "rank 0 on node1" in bare.message
    # The deepspeed launcher: srun's tasks are node launchers, matched to the verdict's ranks by node.
    ds = classify(7, parse_srun_line("srun: error: node1: task 0: Exited with exit code 7"), "deepspeed", verdict)
    assert "rank 1 on node2: no sign of life" in ds.message and "rank 0 on node1 (Exited with exit code 7" in ds.message


def test_classify_step_killed_by_the_launcher():
    ends = parse_srun_line("srun: error: node1: task 0: Exited with exit code 7")
    verdict = _verdict("hang", [(1, "node2", "first", "no sign of life"), (0, "node1", "then", "waiting")])
    out = classify(-9, ends, verdict=verdict, killed="srun has not ended 15 s after the first task ended")
    assert out.status == "hung" and out.message.endswith("[srun has not ended 15 s after the first task ended: the "
                                                         "launcher killed the step]")
    assert classify(-9, [], killed="no rank alive").status == "failed"
    assert classify(0, [], killed="no rank alive").status == "failed"


def test_step_runner_kills_an_srun_that_waits_for_a_lost_node():
    """After the first task end, srun gets TEARDOWN_GRACE seconds; one waiting for a lost node is killed."""
    from cluster.step_runner import StepRunner

    fake_srun = [sys.executable, "-c", "import sys, time; sys.stderr.write('srun: error: node1: task 0: Exited with exit "
                                       "code 7\\n'); sys.stderr.flush(); time.sleep(120)"]
    runner = StepRunner(teardown_grace=1.0)
    t0 = time.monotonic()
    rc = runner.run(fake_srun)
    assert time.monotonic() - t0 < 20 and rc == -9
    assert runner.killed_reason.startswith("srun has not ended 1 s after the first task ended")
    assert [(e.task, e.node, e.code) for e in runner.ends] == [(0, "node1", 7)]
    # A step that ends by itself is left alone.
    runner = StepRunner(teardown_grace=1.0)
    assert runner.run([sys.executable, "-c", "pass"]) == 0 and runner.killed_reason is None


def test_silence_watch_fires_only_when_every_rank_is_silent(tmp_path):
    from cluster.step_runner import silence_watch
    from trainer.monitor.liveness import read_verdict, write_record

    run = str(tmp_path)
    clock = [1000.0]
    watch = silence_watch(run, "7", 0, 2, 18.0, clock=lambda: clock[0])
    assert watch() is None  # no records yet (ranks starting)
    for rank, host in ((0, "node1"), (1, "node2")):
        write_record(run, {"rank": rank, "host": host, "attempt": "tok", "slurm_job_id": "7", "slurm_restart": 0,
                           "step": 3, "phase": "backward", "progress_time": 990.0, "time": 1000.0 - 5 * rank})
    clock[0] = 1010.0
    assert watch() is None
    clock[0] = 1000.0 + 18 + 3 - 0.5  # rank 1 silent past the limit, rank 0 not yet
    assert watch() is None
    clock[0] = 1000.0 + 18 + 3 + 0.5
    reason = watch()
    assert reason and "no rank has written a liveness record" in reason
    verdict = read_verdict(run, job=("7", 0))
    assert verdict["kind"] == "hang" and [e["rank"] for e in verdict["ranks"]] == [1, 0]
    assert silence_watch(run, "7", 0, 2, 0.0, clock=lambda: 1e9)() is None  # hang watchdog off: never


def test_requeue_on_hang_is_a_config_choice(tmp_path, monkeypatch, capsys):
    """A hung attempt ends FAILED with exit 7 by default; with run.requeue_on_hang=true the launcher requeues it."""
    def launch_hung(extra):
        for k in list(os.environ):
            if k.startswith("SLURM_"):
                monkeypatch.delenv(k, raising=False)
        env = {"SLURM_JOB_ID": "31", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NTASKS_PER_NODE": "1",
               "CONFIG": os.path.join(REPO, "configs", "tiny.yaml"), "RUN_DIR": str(tmp_path / "run"),
               "HEALTH_CHECK": "0", "OVERRIDES": f"train.max_steps=3 {extra}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(REPO)
        requeued = []
        monkeypatch.setattr(launch, "requeue", lambda job: requeued.append(job) or True)

        def hung_step(self, cmd, env=None, forward=True, watch=None):
            from trainer.monitor.liveness import publish
            self.ends = parse_srun_line("srun: error: node1: task 0: Exited with exit code 7")
            publish(str(tmp_path / "run"), _verdict("hang", [(1, "node2", "first", "no sign of life"),
                                                             (0, "node1", "then", "waiting")], message="m",
                                                    slurm_job_id="31"))
            return 6

        monkeypatch.setattr(launch.StepRunner, "run", hung_step)
        return launch.main([]), requeued

    rc, requeued = launch_hung("")
    assert rc == 7 and requeued == []
    assert "error: training HUNG, no progress for 18 s (run.hang_timeout_minutes): rank 1 on node2" in capsys.readouterr().err
    os.unlink(tmp_path / "run" / "failure.json")
    rc, requeued = launch_hung("run.requeue_on_hang=true")
    assert rc == 0 and requeued == ["31"]
    from cluster.step_runner import StepRunner  # noqa: F401  (the class the launcher runs steps with)
    import json as _json
    hist = [_json.loads(line) for line in open(tmp_path / "run" / "launch" / "history.jsonl")]
    assert [(h["outcome"], h["exit_code"], h.get("requeued")) for h in hist] == [("hung", 7, None), ("hung", 7, True)]


# --------------------------------------------------------------------------- pre-flight across nodes


def test_compare_nodes_names_the_node_that_differs():
    base = {"python": "CPython 3.11.7", "torch": "2.13.0+cpu", "deepspeed": "0.19.8", "project": "0.1.0 source abc",
            "paths": {"deepspeed": "/site/deepspeed"}}
    records = {"node1": dict(base), "node2": dict(base, deepspeed="0.0.1", paths={"deepspeed": "/n2/deepspeed"})}
    assert health_check.compare_nodes({"node1": base, "node2": base}, ["node1", "node2"]) == []
    assert health_check.compare_nodes(records, ["node1", "node2"]) == [
        "node node2: deepspeed 0.0.1 from /n2/deepspeed (node node1: 0.19.8)"]
    # Three nodes: the majority is the reference, even against the first node.
    records3 = {"n1": dict(base, torch="2.12.0"), "n2": dict(base), "n3": dict(base)}
    problems = health_check.compare_nodes(records3, ["n1", "n2", "n3"])
    assert len(problems) == 1 and problems[0].startswith("node n1: torch 2.12.0") and "node n2,n3: 2.13.0+cpu" in problems[0]
    # A node that wrote no record (it could not write the run directory).
    assert health_check.compare_nodes({"n1": base}, ["n1", "n2"]) == [
        "node n2: no pre-flight record (could it write the run directory?)"]


def test_installed_version_reads_the_metadata_beside_what_import_resolves_to(tmp_path, monkeypatch):
    (tmp_path / "fakepkg_mn").mkdir()
    (tmp_path / "fakepkg_mn" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (tmp_path / "fakepkg_mn-3.1.4.dist-info").mkdir()
    (tmp_path / "fakepkg_mn-3.1.4.dist-info" / "METADATA").write_text("Name: fakepkg_mn\nVersion: 3.1.4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert health_check.installed_version("fakepkg_mn") == ("3.1.4", str(tmp_path / "fakepkg_mn"))
    assert health_check.installed_version("no_such_pkg_mn") == ("not installed", "-")
    versions = health_check.node_versions()
    import deepspeed.git_version_info as dsv  # noqa: F401  (the real one, for comparison)
    import torch
    assert versions["torch"] == torch.__version__ and versions["deepspeed"] == dsv.version
    assert versions["project"].split(" source ")[1] == health_check.source_fingerprint(REPO)


def test_source_fingerprint_changes_with_the_source(tmp_path):
    for pkg in health_check.PROJECT_PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("x = 1\n")
    before = health_check.source_fingerprint(str(tmp_path))
    (tmp_path / "trainer" / "__init__.py").write_text("x = 2\n")
    assert health_check.source_fingerprint(str(tmp_path)) != before
