"""Unit tests for trainer/engine/launch_env.py: Slurm node lists, tasks per node, torch.distributed mapping."""
from __future__ import annotations

import pytest

from trainer.engine import launch_env
from trainer.engine.launch_env import (expand_hostlist, first_host, parse_tasks_per_node, port_for_job,
                                       torch_env_from_slurm)


@pytest.mark.parametrize("nodelist, expected", [
    ("vm", ["vm"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("node[01-03,7],gpu7", ["node01", "node02", "node03", "node7", "gpu7"]),
    ("gpu-a[8-10]", ["gpu-a8", "gpu-a9", "gpu-a10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a1,b[2],c", ["a1", "b2", "c"]),
    ("", []),
])
def test_expand_hostlist(nodelist, expected):
    assert expand_hostlist(nodelist) == expected


@pytest.mark.parametrize("bad", ["node[1-2", "node1-2]", "node[a-b]", "node[3-1]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host("gpu[07-09],cpu1") == "gpu07"
    assert launch_env.hostnames("x[1-2]") == ["x1", "x2"]


@pytest.mark.parametrize("value, expected", [("8", [8]), ("2(x3),1", [2, 2, 2, 1]), ("4(x2)", [4, 4]), ("", [])])
def test_parse_tasks_per_node(value, expected):
    assert parse_tasks_per_node(value) == expected


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError):
        parse_tasks_per_node("two")


def test_port_is_deterministic_in_range_and_moves_with_restart():
    p0, p1 = port_for_job("123456"), port_for_job("123456", restart=1)
    assert p0 == port_for_job("123456") and p0 != p1
    assert all(20000 <= port_for_job(str(j), restart=r) < 40000 for j in range(0, 50000, 997) for r in range(3))
    assert port_for_job("not-a-number") == 20029


def test_torch_env_from_srun_task():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77", "MASTER_ADDR": "gpu01"}
    got = torch_env_from_slurm(env)
    assert got == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu01", "MASTER_PORT": str(port_for_job("77"))}


def test_torch_env_derives_master_and_local_world(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the parser, not scontrol
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
           "SLURM_TASKS_PER_NODE": "3,2", "SLURM_JOB_NODELIST": "cn[10-11]", "SLURM_JOB_ID": "9",
           "SLURM_RESTART_COUNT": "2", "MASTER_PORT": "31000"}
    got = torch_env_from_slurm(env)
    assert got["MASTER_ADDR"] == "cn10" and got["MASTER_PORT"] == "31000" and got["LOCAL_WORLD_SIZE"] == "2"
    env.pop("MASTER_PORT")
    assert torch_env_from_slurm(env)["MASTER_PORT"] == str(port_for_job("9", restart=2))


def test_torch_env_not_applied_outside_srun_or_when_set():
    assert torch_env_from_slurm({}) is None
    assert torch_env_from_slurm({"SLURM_JOB_ID": "1"}) is None  # batch shell without a step
    assert torch_env_from_slurm({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) is None


def test_apply_slurm_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "x")  # records the original state, so what apply_slurm_env sets is undone
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "vm")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    import os

    assert launch_env.apply_slurm_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")
    assert launch_env.apply_slurm_env() is False  # already set
