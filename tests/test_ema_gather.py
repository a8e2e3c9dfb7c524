"""The EMA gather of model-parallel layouts (issue 20 item 2): rank 0 receives one slice per model-parallel rank,
tensor by tensor, and nothing from data-parallel replicas; the merged state equals the old gather_object merge.

One 4-rank run (tests/ema_gather_check.py) builds the trainer's DP2×TP2 and PP2×DP2 engines in turn and counts the
bytes ``torch.distributed.recv`` delivers to rank 0.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema_gather") / "result.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "ema_gather_check.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_dp2_tp2_rank0_receives_only_the_other_tensor_slice(gathered):
    r = gathered["dp2tp2"]
    assert r["equal_to_gather_object"] and r["tensors"] > 0
    ranks = r["ranks"]
    # rank 1 = (data 0, tensor 1): its tensor-parallel slices are the only thing rank 0 lacks; its replicated
    # tensors are copies of rank 0's, and ranks 2, 3 are the data-parallel replica of ranks 0, 1
    assert ranks[0]["received_bytes"] == ranks[1]["split_bytes"] > 0
    assert r["per_sender"] == {"1": ranks[1]["split_bytes"]}
    assert ranks[2]["sent"] == ranks[3]["sent"] == 0
    # the old gather_object moved every rank's whole slice (three of them) to rank 0
    old = sum(x["slice_bytes"] for x in ranks[1:])
    assert ranks[0]["received_bytes"] < old / 3


def test_pp2_dp2_rank0_receives_the_second_stage_once(gathered):
    r = gathered["pp2dp2"]
    assert r["equal_to_gather_object"]
    ranks = r["ranks"]
    second_stage = [x for x in ranks if x["layout"]["pipe"] == 1 and x["layout"]["data"] == 0][0]
    assert ranks[0]["received_bytes"] == second_stage["slice_bytes"] > 0
    assert r["per_sender"] == {str(second_stage["rank"]): second_stage["slice_bytes"]}
    replicas = [x for x in ranks if x["layout"]["data"] == 1]
    assert replicas and all(x["sent"] == 0 for x in replicas)
