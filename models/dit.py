"""DiT: a class-conditional latent diffusion transformer with adaLN-Zero blocks.

Layout, initialisation and forward maths follow facebookresearch/DiT (models.py), so its released
checkpoints load with strict=True and ours load there. Additions are opt-in and leave the official
layout untouched when off: any token grid (position table recomputed per grid), gradient checkpointing
every k-th block, MoE feed-forwards, qk-norm, SwiGLU, RMSNorm, n-channel classifier-free guidance.
The model is plain PyTorch; tensor/pipeline parallelism is applied from outside.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import PRESET_NAMES, DiTArgs, preset_kwargs
from .flops import dit_forward_flops
from .layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    OutputConv,
    PatchEmbed,
    TimestepEmbedder,
    make_ffn,
    make_norm,
    modulate,
)
from .moe import MoEConfig, MoEFeedForward
from .pos_embed import sincos_2d


def _as_grid(value: Any, what: str) -> tuple[int, int]:
    """An int or (h, w) pair of positive ints -> (h, w)."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{what} must be a positive int or an (height, width) pair of positive ints, got {value!r}")
    return pair


def _check_grad_checkpoint(every: Any) -> int:
    if isinstance(every, bool):
        every = int(every)
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"grad_checkpoint must be an int >= 0 (0 off, 1 every block, k every k-th), got {every!r}")
    return every


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: x (N, T, D), c (N, D) -> (N, T, D).

    `mlp` is a plain FFN or a MoE layer; a MoE layer returns (out, aux_loss, expert_counts) like
    deepspeed.moe.layer.MoE, and the block keeps the last aux loss and counts for the model to report.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: str | None = None,
        ffn: str = "gelu",
        norm: str = "layernorm",
        moe: MoEConfig | None = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = MoEFeedForward(hidden_size, mlp_ratio, moe, ffn) if moe is not None else make_ffn(ffn, hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.last_moe_aux: torch.Tensor | None = None
        self.last_moe_counts: torch.Tensor | None = None

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(h)
        if isinstance(out, tuple):  # MoE layer: (output, aux loss, per-expert token counts)
            out, self.last_moe_aux, self.last_moe_counts = out[0], out[1], out[2]
        return out

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + gate * branch as one fused addcmul: one pass over (N, T, D) instead of two (and under bf16
        # autocast the fp32 residual absorbs the bf16 branch without a separate cast)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.feed_forward(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # (N, T, D)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) tokens of a (gh, gw) grid -> (N, C, gh*p, gw*p) image latents."""
    p, c = patch_size, channels
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, gh * p, gw * p)


class TokenGridMixin:
    """The token grid and its fixed position table: shared by the DiT and the pipeline's embedding stage.

    Needs ``pos_embed`` (the (1, T, D) non-trainable parameter), ``hidden_size``, ``patch_size``, ``grid_size``,
    ``base_grid_size``, ``pe_interpolate``, ``pe_interpolation`` and a ``_pos_embed_cache`` dict.
    """

    def _table(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, T, D) float32 CPU sin-cos table for a grid under the current coordinate mode."""
        base = self.base_grid_size if self.pe_interpolate else None
        return sincos_2d(self.hidden_size, grid[0], grid[1], base, self.pe_interpolation).unsqueeze(0)

    def _fill_pos_embed(self) -> None:
        table = self._table(self.grid_size)
        if self.pos_embed.shape != table.shape:
            self.pos_embed.data = torch.empty(table.shape, dtype=self.pos_embed.dtype, device=self.pos_embed.device)
        self.pos_embed.data.copy_(table)
        self._pos_embed_cache.clear()

    def set_input_size(self, input_size: int | tuple[int, int], interpolate: bool = False) -> None:
        """Switch the token grid (progressive resolution); recomputes the pos_embed parameter in place.

        interpolate=False keeps the official table (coordinates = token indices); interpolate=True scales the
        coordinates to the construction-time grid (PixArt pe_interpolation), so all resolutions share a range.
        """
        hw = _as_grid(input_size, "input_size")
        if hw[0] % self.patch_size or hw[1] % self.patch_size:
            raise ValueError(f"input_size {input_size!r} is not divisible by patch_size {self.patch_size}")
        self.grid_size = (hw[0] // self.patch_size, hw[1] // self.patch_size)
        self.pe_interpolate = bool(interpolate)
        self._fill_pos_embed()

    def pos_embed_for(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(1, T, D) table for a grid: the parameter for the current grid, else a cached recomputed table."""
        if grid == self.grid_size:
            return self.pos_embed
        key = (grid, self.pe_interpolate, str(device))
        if key not in self._pos_embed_cache:
            self._pos_embed_cache[key] = self._table(grid).to(device)
        return self._pos_embed_cache[key]


class DiT(TokenGridMixin, nn.Module):
    """Diffusion transformer over (N, C, H, W) latents; returns (N, C_out, H, W), C_out = 2C with learn_sigma."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        grad_checkpoint: int = 0,
        moe: Any = None,
        qk_norm: str | None = None,
        ffn: str = "gelu",
        norm: str = "layernorm",
        output_conv: int = 0,
        pe_interpolation: float = 1.0,
        pe_base_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        for name, value in dict(patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                                depth=depth, num_heads=num_heads, num_classes=num_classes).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos table, got {hidden_size}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob!r}")
        if not pe_interpolation > 0:
            raise ValueError(f"pe_interpolation must be > 0, got {pe_interpolation!r}")
        input_hw = _as_grid(input_size, "input_size")
        if input_hw[0] % patch_size or input_hw[1] % patch_size:
            raise ValueError(f"input_size {input_size!r} is not divisible by patch_size {patch_size}")
        base_hw = input_hw if pe_base_size is None else _as_grid(pe_base_size, "pe_base_size")
        if base_hw[0] % patch_size or base_hw[1] % patch_size:
            raise ValueError(f"pe_base_size {pe_base_size!r} is not divisible by patch_size {patch_size}")
        moe_config = MoEConfig.from_any(moe)

        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, grad_checkpoint=grad_checkpoint, moe=moe_config,
            qk_norm=qk_norm, ffn=ffn, norm=norm, output_conv=output_conv, pe_interpolation=pe_interpolation,
            pe_base_size=pe_base_size,
        )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.moe_config = moe_config
        self.grad_checkpoint = _check_grad_checkpoint(grad_checkpoint)
        self.pe_interpolation = pe_interpolation
        # coordinates: token indices (the official table), or with pe_base_size scaled to that size's grid (PixArt)
        self.base_grid_size = (base_hw[0] // patch_size, base_hw[1] // patch_size)
        self.grid_size = (input_hw[0] // patch_size, input_hw[1] // patch_size)
        self.pe_interpolate = pe_base_size is not None  # False: token indices; True: PixArt-scaled coordinates
        self._pos_embed_cache: dict[tuple, torch.Tensor] = {}

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_tokens = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, ffn, norm,
                     moe_config if moe_config is not None and (i + 1) % moe_config.every == 0 else None)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm)
        # Each token writes its own p x p output patch from its own hidden vector, so until the tokens agree (long
        # training) neighbouring patches disagree at their shared edge: a grid of seams every p latent pixels.
        # Optional (off = the reference DiT): one or two 3x3 convolutions over the unpatchified output, added
        # residually and zero-initialised (the model starts as the plain DiT, and its construction draws nothing from the global
        # generator, so the same seed gives the same weights), lets every output pixel see its neighbours across
        # token borders, as U-ViT's final conv block does.
        self.output_conv = None
        if output_conv != 0 or isinstance(output_conv, float):  # OutputConv refuses anything but 1 and 2
            with torch.random.fork_rng(devices=[]):
                self.output_conv = OutputConv(self.out_channels, output_conv)
        self.initialize_weights()

    # ------------------------------------------------------------------ initialisation
    def initialize_weights(self) -> None:
        """The reference init: xavier linears with zero bias, N(0, 0.02) embeddings, zeroed adaLN and head."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(basic_init)
        self._fill_pos_embed()
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """A checkpoint from another resolution carries a pos_embed of another length: use ours instead."""
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = self.pos_embed.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ options
    def set_grad_checkpointing(self, every: int = 1) -> None:
        """0 off, 1 every block, k every k-th block (blocks 0, k, 2k, ...); non-reentrant torch checkpoint."""
        self.grad_checkpoint = _check_grad_checkpoint(every)

    # ------------------------------------------------------------------ forward
    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        return unpatchify(x, grid, self.patch_size, self.out_channels)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels; force_drop_ids (N,) 1 = use the null class.

        Under autocast the output is returned as float32 so that losses are computed in float32.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {(h, w)} is not divisible by patch_size {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        x = self.x_embedder(x) + self.pos_embed_for(grid, x.device)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        every = self.grad_checkpoint
        for i, block in enumerate(self.blocks):
            if every and i % every == 0 and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        x = self.unpatchify(x, grid)  # (N, C_out, H, W)
        if self.output_conv is not None:
            x = self.output_conv(x)  # (N, C_out, H, W): x + convs(x), mixes across token borders
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return x

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int | None = None
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null labels.

        Only the first half of x is used (duplicated), as in the reference. cfg_channels=None guides all
        in_channels (the whole eps); cfg_channels=3 reproduces the reference, which guides eps[:, :3] only.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (cond half, uncond half), got {x.shape[0]}")
        guided = self.in_channels if cfg_channels is None else cfg_channels
        if not isinstance(guided, int) or not 1 <= guided <= self.out_channels:
            raise ValueError(f"cfg_channels must be None or an int in [1, {self.out_channels}], got {cfg_channels!r}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    # ------------------------------------------------------------------ reporting
    def moe_aux_loss(self) -> torch.Tensor:
        """sum over MoE blocks of aux_loss_coef * balance loss of the last forward (a 0 tensor without MoE).

        Add it to the diffusion loss as is: the coefficient is already applied.
        """
        total = torch.zeros((), device=self.pos_embed.device)
        for block in self.blocks:
            if block.last_moe_aux is not None:
                total = total + self.moe_config.aux_loss_coef * block.last_moe_aux
        return total

    def moe_stats(self) -> list[dict[str, Any]]:
        """Per MoE block, from the last forward (detached): expert token counts, dropped share, balance loss."""
        stats = []
        for i, block in enumerate(self.blocks):
            # MoEFeedForward or models/parallel/moe.py's DeepSpeed adapter (same attributes)
            if hasattr(block.mlp, "last_dropped_fraction") and block.last_moe_counts is not None:
                stats.append(dict(
                    block=i,
                    expert_counts=block.last_moe_counts.detach().cpu(),
                    dropped_fraction=float(block.mlp.last_dropped_fraction),
                    balance_loss=float(block.last_moe_aux.detach()),
                ))
        return stats

    def flops_per_sample(self, train: bool = True, input_size: int | tuple[int, int] | None = None) -> int:
        """Model FLOPs of one sample (see models/flops.py); train=True counts forward + backward = 3x forward."""
        grid = None
        if input_size is not None:
            hw = _as_grid(input_size, "input_size")
            grid = (hw[0] // self.patch_size, hw[1] // self.patch_size)
        forward = dit_forward_flops(self, grid)
        return 3 * forward if train else forward


def _preset_builder(name: str):
    """The official repo's ``DiT_models[name](**kwargs)`` factory, through ``DiTArgs`` (the one way to build)."""
    fields = {f.name for f in dataclasses.fields(DiTArgs)}

    def build(**kwargs: Any) -> DiT:
        args = DiTArgs.from_preset(name, **{k: v for k, v in kwargs.items() if k in fields})
        return args.build(**{k: v for k, v in kwargs.items() if k not in fields})

    build.__name__ = "DiT_" + name.removeprefix("DiT-").replace("/", "_")
    build.__doc__ = f"{name}: {preset_kwargs(name)}"
    return build


DiT_models = {name: _preset_builder(name) for name in PRESET_NAMES}
