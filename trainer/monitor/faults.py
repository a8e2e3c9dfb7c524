"""Fault-injection hooks for tests: the only ones in the trainer, all read from the environment.

``DIT_FAULT_NAN_STEPS=5,6`` makes the loss of optimizer steps 5 and 6 (1-based, the step being computed)
NaN on global rank 0, first micro-batch (``loss + nan``: its gradient is finite, so this exercises the loop's own
agreement and no-op step only); ``DIT_FAULT_PAUSE_AFTER_CHECKPOINT=8`` makes every rank sleep (60 s, or
``8:SECONDS``) right after the step-8 checkpoint is published, so a test can SIGKILL a run at a known point
instead of racing a fast one.

``DIT_FAULT_ACTIVATION="steps=3;ranks=1;micro=1;block=0;kind=overflow"`` breaks the network itself, which is what a
diverging bf16 run does and what ``loss + nan`` does not: a forward hook on DiT block ``block`` (0-based; on
whichever pipeline stage holds it) of the chosen global ``ranks`` (default 0), on micro-step ``micro`` (0-based;
default every micro-step) of the chosen steps.

  kind=overflow   the block's output is multiplied by 1e30 twice: activations leave the fp32/bf16 range (inf), the
                  next LayerNorm turns them into NaN, the loss is NaN and backward yields NaN gradients inside
                  DeepSpeed's buckets (NaN x 0 is NaN, so the loop's ``loss * 0`` cannot clean them).
  kind=grad_nan   the forward is untouched (the loss is finite) but the gradient flowing back through the block's
                  output is NaN: the case where only DeepSpeed's own overflow check can see the problem.

``steps=A,B`` (1-based, the step being computed) fires on every attempt at those steps, so after a rollback the same
steps fail again; ``samples=LO-HI`` fires on the steps whose global batch holds any sample position in [LO, HI]
(inclusive), i.e. it follows the data, so skipping that data window (a rollback) makes it go away.

Several faults: separate their specs with ``|`` (e.g. an overflow at step 3 on rank 1 and NaN gradients at step 4 on
rank 0: ``"steps=3;ranks=1 | steps=4;ranks=0;kind=grad_nan"``).

``DIT_FAULT_LOSS_SCALE="samples=112-151;factor=10"`` multiplies the loss (and so its gradients) by ``factor`` on
the selected steps, every rank: a loss blow-up for the spike detector and the rollback it triggers.

``DIT_FAULT_PERTURB_WEIGHTS="from=40;scale=0.05"`` (optionally ``until=60``) adds Gaussian noise of ``scale`` × each
parameter's standard deviation (taken at the first perturbed step, so the damage is a random walk, not a blow-up) to
the trained weights before every step from step ``from`` (1-based) on, the same noise on every rank (seeded by step
and parameter): weights corrupted mid-run, for the rising-validation alert.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Optional

FAULT_NAN_ENV = "DIT_FAULT_NAN_STEPS"
FAULT_PAUSE_ENV = "DIT_FAULT_PAUSE_AFTER_CHECKPOINT"
FAULT_ACTIVATION_ENV = "DIT_FAULT_ACTIVATION"
FAULT_LOSS_SCALE_ENV = "DIT_FAULT_LOSS_SCALE"
FAULT_PERTURB_ENV = "DIT_FAULT_PERTURB_WEIGHTS"
OVERFLOW_FACTOR = 1e30  # applied twice: any |activation| > 3.4e-22 leaves the fp32 range


def fault_nan_steps(environ=None) -> frozenset:
    """Steps whose loss the test hook makes NaN (empty unless DIT_FAULT_NAN_STEPS is set)."""
    raw = (environ if environ is not None else os.environ).get(FAULT_NAN_ENV, "")
    return frozenset(int(s) for s in raw.replace(" ", "").split(",") if s)


def fault_pause_after_checkpoint(step: int, environ=None) -> None:
    """The pause test hook (see the module docstring); does nothing unless its variable names ``step``."""
    raw = (environ if environ is not None else os.environ).get(FAULT_PAUSE_ENV, "")
    if not raw:
        return
    target, _, seconds = raw.partition(":")
    if int(target) == step:
        time.sleep(float(seconds or 60))


# --------------------------------------------------------------------------- which steps a fault hits
@dataclass(frozen=True)
class FaultSpec:
    """Where a fault fires: by step number and/or by sample position, on some ranks and micro-steps."""

    steps: frozenset = frozenset()
    samples: Optional[tuple] = None  # (lo, hi) inclusive global sample positions
    ranks: frozenset = frozenset({0})
    micro: Optional[int] = None  # None: every micro-step of a selected step
    block: int = 0
    kind: str = "overflow"
    factor: float = 10.0

    def hits_step(self, step: int, position: int, global_batch: int) -> bool:
        """``step`` is 1-based (the step being computed); its global batch is [position, position + global_batch)."""
        if step in self.steps:
            return True
        if self.samples is not None:
            lo, hi = self.samples
            return position <= hi and lo < position + global_batch
        return False


def parse_fault_spec(raw: str, name: str = FAULT_ACTIVATION_ENV) -> Optional[FaultSpec]:
    """``"steps=3,4;samples=56-71;ranks=1;micro=0;block=2;kind=grad_nan;factor=10"`` -> FaultSpec (None if empty)."""
    raw = raw.strip()
    if not raw:
        return None
    fields: dict = {}
    for part in raw.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip().replace(" ", "")
        if not sep:
            raise ValueError(f"{name}: '{part}' is not key=value")
        if key == "steps":
            fields["steps"] = frozenset(int(s) for s in value.split(",") if s)
        elif key == "samples":
            m = re.fullmatch(r"(\d+)-(\d+)", value)
            if not m or int(m.group(1)) > int(m.group(2)):
                raise ValueError(f"{name}: samples must be LO-HI, got '{value}'")
            fields["samples"] = (int(m.group(1)), int(m.group(2)))
        elif key == "ranks":
            fields["ranks"] = frozenset(int(s) for s in value.split(",") if s)
        elif key in ("micro", "block"):
            fields[key] = int(value)
        elif key == "kind":
            if value not in ("overflow", "grad_nan"):
                raise ValueError(f"{name}: kind must be overflow or grad_nan, got '{value}'")
            fields["kind"] = value
        elif key == "factor":
            fields["factor"] = float(value)
        else:
            raise ValueError(f"{name}: unknown field '{key}' (steps, samples, ranks, micro, block, kind, factor)")
    if not fields.get("steps") and "samples" not in fields:
        raise ValueError(f"{name}: give steps=... or samples=LO-HI")
    return FaultSpec(**fields)


def fault_spec(name: str, environ=None) -> Optional[FaultSpec]:
    return parse_fault_spec((environ if environ is not None else os.environ).get(name, ""), name)


def fault_specs(name: str, environ=None) -> list[FaultSpec]:
    """Every ``|``-separated spec of the variable (empty list when unset)."""
    raw = (environ if environ is not None else os.environ).get(name, "")
    return [spec for spec in (parse_fault_spec(part, name) for part in raw.split("|")) if spec is not None]


# --------------------------------------------------------------------------- the network hook
def dit_blocks(module) -> dict:
    """{block index: DiTBlock} of the blocks this rank holds: ``blocks.i`` in a DiT (plain, ZeRO-3, tensor parallel)
    or ``L.block`` in a pipeline stage, where layer L holds block L - 1 (layer 0 is the embedder)."""
    found = {}
    for name, sub in module.named_modules():
        m = re.fullmatch(r"(?:.*\.)?blocks\.(\d+)", name)
        if m:
            found[int(m.group(1))] = sub
            continue
        m = re.fullmatch(r"(?:.*\.)?(\d+)\.block", name)
        if m:
            found[int(m.group(1)) - 1] = sub
    return found


class ActivationFault:
    """The ``DIT_FAULT_ACTIVATION`` hooks on this rank (see the module docstring).

    A forward pre-hook on the root module counts micro-steps (the root runs once per micro-batch; activation
    checkpointing re-runs blocks, not the root); a forward hook on each chosen block breaks its output while its
    spec is armed. ``begin_step`` arms the specs that select the step.
    """

    def __init__(self, specs: list, module, rank: int):
        blocks = dit_blocks(module)
        self.specs = [(spec, blocks[spec.block]) for spec in specs if rank in spec.ranks and spec.block in blocks]
        self.armed: set = set()
        self.micro = -1
        self.fired = 0
        self.handles = []
        if self.specs:
            self.handles.append(module.register_forward_pre_hook(self._count))
        for i, (_, block) in enumerate(self.specs):
            self.handles.append(block.register_forward_hook(lambda mod, args, out, i=i: self._break(i, out)))

    @classmethod
    def from_env(cls, module, rank: int, environ=None) -> Optional["ActivationFault"]:
        specs = fault_specs(FAULT_ACTIVATION_ENV, environ)
        return cls(specs, module, rank) if specs else None

    def begin_step(self, step: int, position: int, global_batch: int) -> None:
        self.armed = {i for i, (spec, _) in enumerate(self.specs) if spec.hits_step(step, position, global_batch)}
        self.micro = -1

    def _count(self, module, args) -> None:
        self.micro += 1

    def _break(self, i: int, output):
        spec = self.specs[i][0]
        if i not in self.armed or spec.micro is not None and spec.micro != self.micro:
            return None
        self.fired += 1
        if spec.kind == "grad_nan":
            if output.requires_grad:
                output.register_hook(lambda grad: grad * float("nan"))  # NaN x 0 is NaN: every element
            return None
        return output * OVERFLOW_FACTOR * OVERFLOW_FACTOR  # (N, T, D): beyond the float range -> inf

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# --------------------------------------------------------------------------- weight corruption
def perturb_spec(environ=None) -> Optional[dict]:
    """``DIT_FAULT_PERTURB_WEIGHTS`` -> {"from", "until", "scale"} (None when unset)."""
    raw = (environ if environ is not None else os.environ).get(FAULT_PERTURB_ENV, "").strip()
    if not raw:
        return None
    fields = {"from": None, "until": None, "scale": 0.05}
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in fields:
            raise ValueError(f"{FAULT_PERTURB_ENV}: '{part}' is not from=N, until=M or scale=S")
        fields[key.strip()] = float(value) if key.strip() == "scale" else int(value)
    if fields["from"] is None:
        raise ValueError(f"{FAULT_PERTURB_ENV}: give from=N (the first step whose weights are perturbed)")
    return fields


def perturb_weights(tensors, step: int, spec: Optional[dict]) -> bool:
    """Add the fault's noise to ``tensors`` (this rank's local parameter tensors) if ``step`` is selected."""
    if spec is None or step < spec["from"] or (spec["until"] is not None and step > spec["until"]):
        return False
    import torch

    with torch.no_grad():
        stds = spec.setdefault("stds", [float(t.float().std()) if t.numel() > 1 else 0.0 for t in tensors])
        for i, t in enumerate(tensors):
            g = torch.Generator(device="cpu").manual_seed(1_000_003 * step + i)
            noise = torch.randn(tuple(t.shape), generator=g).to(device=t.device, dtype=t.dtype)
            t.add_(noise * spec["scale"] * max(stds[i], 1e-4))
    return True
