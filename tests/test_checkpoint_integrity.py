"""Checkpoint checksums on real files: same-length corruption anywhere (first byte, a 4 KiB page boundary, the last
byte) is caught and named with both hashes; truncation at a page boundary is caught by size alone; markers from
before checksums still verify by size. Plus the metrics rewind that keeps a resumed run from logging a step twice,
and the claim that nothing read from a run directory is unpickled."""
import ast
import json
import os

import pytest

from trainer.rundir import truncate_after_step
from trainer.state import integrity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(root):
    ck = root / "step00000010"
    ck.mkdir()
    (ck / "big.pt").write_bytes(os.urandom(3 * 4096 + 123))
    (ck / "small.json").write_text('{"step": 10}')
    integrity.seal(str(ck))
    return ck


@pytest.mark.parametrize("offset", [0, 4096, 3 * 4096 + 122])
def test_one_flipped_byte_is_named_with_both_hashes(tmp_path, offset):
    ck = make_checkpoint(tmp_path)
    assert integrity.check_sizes(str(ck)) is None and integrity.check_hashes(str(ck)) == []
    recorded = json.loads((ck / "COMPLETE.json").read_text())["files"]["big.pt"]["xxh3_128"]
    with open(ck / "big.pt", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    assert integrity.check_sizes(str(ck)) is None  # same length: sizes cannot see it
    (problem,) = integrity.check_hashes(str(ck))
    actual = integrity.file_digest(str(ck / "big.pt"))
    assert str(ck / "big.pt") in problem and recorded in problem and actual in problem and actual != recorded


def test_page_aligned_truncation_and_missing_files_fail_by_size(tmp_path):
    ck = make_checkpoint(tmp_path)
    os.truncate(ck / "big.pt", 2 * 4096)
    assert "has 8192 bytes, expected 12411" in integrity.check_sizes(str(ck))
    other = make_checkpoint(tmp_path / "other" if (tmp_path / "other").mkdir() is None else None)
    os.remove(other / "small.json")
    assert "small.json is missing" in integrity.check_sizes(str(other))


def test_markers_without_checksums_verify_by_size(tmp_path):
    ck = tmp_path / "old"
    ck.mkdir()
    (ck / "a.pt").write_bytes(b"x" * 10)
    (ck / "COMPLETE.json").write_text(json.dumps({"files": {"a.pt": 10}}))
    assert integrity.check_sizes(str(ck)) is None and integrity.check_hashes(str(ck)) == []
    assert not integrity.has_checksums(str(ck))
    (ck / "COMPLETE.json").write_text("{not json")
    assert "unreadable" in integrity.check_sizes(str(ck))


def test_hashing_is_split_evenly_over_ranks():
    sizes = {"opt0": 400, "opt1": 400, "model": 300, "ema": 300, "rng0": 1, "rng1": 1}
    shares = integrity.assign(sizes, 2)
    assert sorted(sum(shares, [])) == sorted(sizes)
    loads = [sum(sizes[r] for r in s) for s in shares]
    assert max(loads) - min(loads) <= 1


def test_metrics_rewind_drops_steps_after_the_resume_point_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 9)]
    path.write_text("\n".join(lines) + '\n{"step": 9, "lo')
    assert truncate_after_step(str(path), 5) == 4  # steps 6, 7, 8 and the torn 9
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert truncate_after_step(str(path), 5) == 0 and truncate_after_step(str(tmp_path / "none"), 0) == 0
    assert truncate_after_step(str(path), 0) == 5 and path.read_text() == ""


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if dotted == name:
                yield node


def test_nothing_read_from_a_run_directory_or_a_shard_is_unpickled():
    """README: files are read back with torch.load(weights_only=True); no pickle, no np.load(allow_pickle)."""
    problems = []
    for package in ("trainer", "data_pipeline", "cluster", "models"):
        for dirpath, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                tree = ast.parse(open(path).read())
                rel = os.path.relpath(path, REPO)
                for call in _calls(tree, "load"):
                    kw = {k.arg: k.value for k in call.keywords}
                    func = call.func
                    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
                    if owner == "torch" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                                 and kw["weights_only"].value is True):
                        problems.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
                    if owner in ("pickle", "dill", "cloudpickle"):
                        problems.append(f"{rel}:{call.lineno} {owner}.load")
                    if owner == "np" and isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                        problems.append(f"{rel}:{call.lineno} np.load(allow_pickle=True)")
    assert not problems, "\n".join(problems)
