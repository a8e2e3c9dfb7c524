"""Per-rank, per-step random streams derived from (seed, data-parallel rank, step, micro-step).

Noise, timesteps and label dropout come from a generator that is a pure function of those four
numbers, never of the tensor/pipeline/expert rank or of how many steps ran in this process. That is
what makes a resumed run equal an uninterrupted one, and a TP=2 run equal a single-process run.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_MIX = np.uint64(0x9E3779B97F4A7C15)


def stream_seed(seed: int, dp_rank: int, step: int, micro: int = 0, purpose: int = 0) -> int:
    """A 63-bit seed from the tuple, via numpy's SeedSequence (well-mixed, stable across versions)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(dp_rank), int(step), int(micro), int(purpose)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, dp_rank: int, step: int, micro: int = 0) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, dp_rank, step, micro))
    return g


def seed_everything(seed: int) -> None:
    """Seed the global RNGs for anything outside our explicit streams (init, MoE noisy gating)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states for checkpoints (tensors and plain types only: loadable with weights_only=True)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    import ast

    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
