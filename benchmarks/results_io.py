"""Writing a benchmark's JSON record under benchmarks/results/ (one place, one format)."""
from __future__ import annotations

import json
import os


def write_results(path: str, record: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")
    return path
