"""``DiTArgs``: the one typed record of "which DiT is this".

It builds the model (``DiTArgs.build``), is written into every checkpoint (``to_dict``, plain JSON), is read
back (``from_dict``) and compared on resume, and names presets (``DiTArgs.from_preset("DiT-XL/2")``). Frozen, so
a progressive stage that changes the token grid makes a new record (``with_input_size``) instead of mutating a
shared dict that a checkpoint may already hold.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .moe import MoEConfig

MODEL_SIZES = {  # name -> (depth, hidden_size, num_heads): the DiT paper's table
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PRESET_NAMES = tuple(f"DiT-{size}/{patch}" for size in MODEL_SIZES for patch in (2, 4, 8))


def preset_kwargs(name: str) -> dict:
    """Architecture of a named preset ("DiT-XL/2"): depth, hidden_size, num_heads, patch_size (ValueError if unknown).

    The one table of presets: DiTArgs.from_preset, the trainer's config (model.name), the planner and the
    benchmarks all read it here.
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(PRESET_NAMES)}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden_size, num_heads = MODEL_SIZES[size]
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(patch))


@dataclass(frozen=True)
class DiTArgs:
    input_size: int = 32  # latent side (pixels / VAE downsampling)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    qk_norm: Optional[str] = None  # None, "layernorm" or "rmsnorm"
    ffn: str = "gelu"  # "gelu" (reference) or "swiglu"
    norm: str = "layernorm"  # "layernorm" (reference) or "rmsnorm"
    output_conv: int = 0  # 3x3 conv layers over the unpatchified output, across token borders (0 off; models/layers.py)
    moe: Optional[MoEConfig] = None  # MoE feed-forward in every moe.every-th block
    # Latent side whose token grid the position table's coordinates are scaled to (PixArt pe_interpolation: the
    # first progressive stage's size); None: token indices, the reference table. Part of the architecture: a model
    # trained with scaled coordinates and rebuilt without them sees other positions (every grid, FID and export
    # rebuilds the model from this record).
    pe_base_size: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "moe", MoEConfig.from_any(self.moe))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DiTArgs":
        return cls(**{**preset_kwargs(name), **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "DiTArgs":
        """From ``to_dict`` output (a checkpoint's ``model_config``); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiT argument(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain JSON; ``moe`` is left out for a dense model and ``output_conv`` when off (as in checkpoints written
        before either existed, which ``from_dict`` reads back to the same record)."""
        out = dataclasses.asdict(self)
        if self.moe is None:
            del out["moe"]
        if not self.output_conv:
            del out["output_conv"]
        if self.pe_base_size is None:
            del out["pe_base_size"]
        return out

    def with_input_size(self, input_size: int) -> "DiTArgs":
        return dataclasses.replace(self, input_size=input_size)

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def differences(self, other: "DiTArgs", ignore: tuple = ("input_size",)) -> list[str]:
        """``name: mine vs other`` for every differing field outside ``ignore``."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in dataclasses.fields(self)
                if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]

    def build(self, grad_checkpoint: int = 0, **model_options: Any):
        """The DiT these arguments describe (``model_options``: DiT keyword-only options such as pe_interpolation)."""
        from .dit import DiT

        kwargs = dataclasses.asdict(self)
        kwargs["moe"] = self.moe
        return DiT(**kwargs, grad_checkpoint=grad_checkpoint, **model_options)
