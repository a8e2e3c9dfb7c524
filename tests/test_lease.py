"""The run-directory lease on real files: refusal naming the holder, the three takeover rules, fencing, and a race
of many processes for one dead holder's lease (exactly one wins)."""
import json
import multiprocessing
import os
import time

import pytest

from trainer.state.lease import LOCK_NAME, LOCK_STALE_SECONDS, Lease, RunDirBusy, read_lease

HOST = "node1"


def other(host="node9", pid=424242, job="", restart=0):
    return {"host": host, "pid": pid, "slurm_job_id": job, "slurm_restart": restart}


def past(seconds):
    """A clock ``seconds`` behind: a holder that started that long ago."""
    return lambda: time.time() - seconds


def beat(run_dir, lease, age, clock_now):
    with open(os.path.join(run_dir, "heartbeat.json"), "w") as f:
        json.dump({"time": clock_now - age, "lease_token": lease.token}, f)


def test_second_launch_is_refused_naming_the_holder(tmp_path):
    first = Lease(str(tmp_path), timeout=300, me=other("node3", 1111, job="77", restart=0))
    assert first.acquire() is None
    beat(str(tmp_path), first, age=5, clock_now=time.time())
    second = Lease(str(tmp_path), timeout=300, me=other("node4", 2222))
    with pytest.raises(RunDirBusy) as err:
        second.acquire()
    msg = str(err.value)
    assert "host node3 pid 1111" in msg and "Slurm job 77 attempt 0" in msg and "--takeover" in msg
    assert read_lease(str(tmp_path))["token"] == first.token and first.still_ours()


def test_stale_heartbeat_is_taken_over_and_the_old_holder_is_fenced(tmp_path):
    run = str(tmp_path)
    old = Lease(run, timeout=60, me=other("node3", 1111), clock=past(3600))
    old.acquire()
    beat(run, old, age=61, clock_now=time.time())
    new = Lease(run, timeout=60, me=other("node4", 2222))
    taken = new.acquire()
    assert taken["previous"]["host"] == "node3" and "no heartbeat for 61 s" in taken["reason"]
    assert new.still_ours() and not old.still_ours()
    old_token = old.token
    old.release()  # a fenced holder's release leaves the new lease alone
    assert read_lease(run)["token"] == new.token
    assert os.path.exists(os.path.join(run, f"lease.{old_token}.taken"))


def test_fresh_heartbeat_on_another_host_is_not_taken(tmp_path):
    run = str(tmp_path)
    old = Lease(run, timeout=60, me=other("node3", 1111), clock=past(3600))
    old.acquire()
    beat(run, old, age=59, clock_now=time.time())
    with pytest.raises(RunDirBusy):
        Lease(run, timeout=60, me=other("node4", 2222)).acquire()


def test_dead_pid_on_this_host_is_taken_over_at_once(tmp_path):
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()  # a pid that existed on this host and is gone now
    run = str(tmp_path)
    me = other(os.uname().nodename, os.getpid())
    dead = Lease(run, timeout=3600, me=dict(me, pid=proc.pid))
    dead.acquire()
    beat(run, dead, age=0, clock_now=time.time())  # heartbeat still fresh: only the pid check can tell
    taken = Lease(run, timeout=3600, me=me).acquire()
    assert f"process {proc.pid}" in taken["reason"] and "is gone" in taken["reason"]


def test_requeued_slurm_job_takes_its_own_lease_back_at_once(tmp_path):
    run = str(tmp_path)
    old = Lease(run, timeout=3600, me=other("node3", 1111, job="4242", restart=0))
    old.acquire()
    beat(run, old, age=0, clock_now=time.time())
    other_job = Lease(run, timeout=3600, me=other("node5", 3333, job="9999", restart=1))
    with pytest.raises(RunDirBusy):
        other_job.acquire()  # a different job never reclaims by job id
    taken = Lease(run, timeout=3600, me=other("node5", 3333, job="4242", restart=1)).acquire()
    assert "same Slurm job 4242 requeued (attempt 0 -> 1)" in taken["reason"]


def test_force_takes_over_a_live_holder(tmp_path):
    run = str(tmp_path)
    live = Lease(run, timeout=3600, me=other("node3", 1111))
    live.acquire()
    beat(run, live, age=0, clock_now=time.time())
    taken = Lease(run, timeout=3600, me=other("node4", 2222)).acquire(force=True)
    assert taken["reason"].startswith("forced") and not live.still_ours()


def test_release_lets_the_next_launch_in_without_waiting(tmp_path):
    run = str(tmp_path)
    first = Lease(run, timeout=3600, me=other("node3", 1111))
    first.acquire()
    first.release()
    assert read_lease(run) is None
    assert Lease(run, timeout=3600, me=other("node4", 2222)).acquire() is None


def test_a_takeover_lock_left_by_a_dead_taker_expires(tmp_path):
    run = str(tmp_path)
    old = Lease(run, timeout=10, me=other("node3", 1111), clock=past(3600))
    old.acquire()
    beat(run, old, age=100, clock_now=time.time())
    lock = os.path.join(run, LOCK_NAME)
    os.mkdir(lock)
    os.utime(lock, (time.time() - LOCK_STALE_SECONDS - 1,) * 2)
    assert Lease(run, timeout=10, me=other("node4", 2222)).acquire() is not None
    assert not os.path.exists(lock)


def _race(run, index, results, start):
    lease = Lease(run, timeout=10, me=other(f"racer{index}", 10_000 + index))
    start.wait()  # all launchers judge the dead holder at the same moment
    try:
        taken = lease.acquire()
        results.put((index, "won", lease.token, bool(taken)))
    except RunDirBusy:
        results.put((index, "busy", "", False))


def test_many_launchers_racing_for_a_dead_holders_lease_elect_exactly_one(tmp_path):
    run = str(tmp_path)
    dead = Lease(run, timeout=10, me=other("node3", 1111), clock=past(3600))
    dead.acquire()
    beat(run, dead, age=100, clock_now=time.time())
    ctx = multiprocessing.get_context("fork")
    results, start = ctx.Queue(), ctx.Barrier(12)
    procs = [ctx.Process(target=_race, args=(run, i, results, start)) for i in range(12)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = [results.get(timeout=5) for _ in procs]
    winners = [o for o in outcomes if o[1] == "won"]
    assert len(winners) == 1, outcomes
    assert read_lease(run)["token"] == winners[0][2] and winners[0][3]


def test_a_taker_that_judged_an_old_holder_never_displaces_a_newer_one(tmp_path, monkeypatch):
    """The interleaving a race can produce, forced: A judges the dead holder D; before A acts, B takes over and
    heartbeats. A must then find B (not D) in lease.json and back off instead of renaming B's lease away."""
    import trainer.state.lease as lease_mod

    run = str(tmp_path)
    dead = Lease(run, timeout=10, me=other("node3", 1111), clock=past(3600))
    dead.acquire()
    beat(run, dead, age=100, clock_now=time.time())
    b = Lease(run, timeout=10, me=other("nodeB", 2))
    real = lease_mod.holder_gone
    calls = []

    def judged_then_overtaken(run_dir, holder, me, timeout, now):
        reason = real(run_dir, holder, me, timeout, now)
        if me["host"] == "nodeA" and not calls:
            calls.append(holder["token"])
            assert b.acquire() is not None  # B overtakes A between A's judgement and A's takeover
            beat(run, b, age=0, clock_now=time.time())
        return reason

    monkeypatch.setattr(lease_mod, "holder_gone", judged_then_overtaken)
    with pytest.raises(RunDirBusy, match="host nodeB pid 2"):
        Lease(run, timeout=10, me=other("nodeA", 1)).acquire()
    assert calls == [dead.token] and b.still_ours()


def test_a_killed_but_unreaped_holder_and_a_reused_pid_count_as_dead():
    """In a container whose init does not reap, a SIGKILLed holder lingers as a zombie; os.kill(pid, 0) still
    succeeds on it. A pid whose start time differs from the recorded one belongs to another process."""
    from trainer.state.lease import pid_alive, process_start_time

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        from trainer.state.lease import _proc_stat

        deadline = time.time() + 30  # exited, not reaped: a zombie once the (possibly busy) kernel has run it
        while (_proc_stat(pid) or ["Z"])[0] != "Z" and time.time() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid)
        assert pid_alive(os.getpid(), process_start_time(os.getpid()))
        assert not pid_alive(os.getpid(), process_start_time(os.getpid()) + 1)  # same pid, another process
    finally:
        os.waitpid(pid, 0)
