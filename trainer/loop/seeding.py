"""Random streams that make runs reproducible across resumes and layouts.

With the elastic data stream (the default) every training sample draws its noise, timestep and label drop from
its own generator, a pure function of (seed, stage, global sample position): the same on 1 or 64 data-parallel
ranks, after a resume, and under any tensor/pipeline/expert layout. The resampled stream has no global positions;
its streams are keyed by (seed, data-parallel rank, step, micro-step), which still makes a resumed run equal an
uninterrupted one on the same layout, and TP/PP equal one process.
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


def sample_generator(seed: int, stage: int, position: int) -> torch.Generator:
    """The random stream of one training sample: (seed, stage, global sample position) and nothing else, so the
    sample gets the same noise, timestep and label drop on any data-parallel size, micro-batch or worker count."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5A4D, int(stage), int(position)])
    g = torch.Generator(device="cpu")
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
    return g


def per_sample_randomness(seed: int, stage: int, positions, shape, objective, class_dropout_prob: float):
    """(timesteps (N,), noise (N, C, H, W), label-drop flags (N,)) on CPU, drawn per sample from its own stream,
    always in the order timestep, noise, drop."""
    ts, noises, drops = [], [], []
    for p in positions.tolist():
        g = sample_generator(seed, stage, p)
        ts.append(objective.sample_timesteps(1, generator=g))
        noises.append(torch.randn(tuple(shape[1:]), generator=g))
        drops.append(torch.rand(1, generator=g) < class_dropout_prob)
    return torch.cat(ts), torch.stack(noises), torch.cat(drops).long()


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
