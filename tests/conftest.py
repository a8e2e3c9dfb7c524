"""Shared fixtures: the embedded demo shards (built once per session) and run launchers."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Demo latent shards at 64 and 128 px (real photos → PCA latents), shared by the trainer tests."""
    from data_pipeline.demo_data import build_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    build_demo_data(str(root), resolutions=(64, 128), seed=0, vae="pca")
    return str(root)


# The Slurm cluster and the reference run, shared by tests/test_slurm_jobs.py and tests/test_slurm_multinode.py.
from tests.slurm_support import reference_run, slurm  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (benchmarks/gpu_check.sh runs these); skipped with "
                                       "the reason where torch sees none")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); benchmarks/gpu_check.sh runs these on a GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
