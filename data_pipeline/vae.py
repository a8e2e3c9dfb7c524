"""VAE adapters: one interface over diffusers AutoencoderKL models and the offline PCA encoder.

Every adapter maps images (N, 3, H, W) in [-1, 1] to *scaled* latents
``latent = (posterior_mean_or_sample - shift_factor) * scaling_factor`` and back (per channel
``(raw - latents_mean) * scaling_factor / latents_std`` for a VAE whose config carries those, as diffusers'
SDXL pipelines apply them, e.g. Playground v2.5's), and describes itself with a JSON-able ``spec`` stored
in the shard manifest. ``load_vae_from_manifest`` rebuilds the same encoder from that spec, so sampling decodes
with exactly the VAE the shards were made with (and refuses one whose scaling factors changed since).
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import torch

from .manifest import load_manifest
from .pca_autoencoder import PCA_FILE_NAME, PatchPCAAutoencoder, file_sha256


class VAEAdapter(Protocol):
    latent_channels: int
    downsample: int
    spec: dict

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def autocast_context(device: torch.device, precision: str):
    """fp32 on CPU by default; bf16 (or fp16) autocast on accelerators where requested or 'auto'."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else ("fp16" if device.type == "cuda" else "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


class PCAVAE:
    """Adapter around PatchPCAAutoencoder; the fitted file lives beside the shards.

    ``encode`` returns latents on the CPU (they go into shards); ``decode`` runs on ``device`` and returns images
    there, so a rank decodes its sample grid on its own GPU."""

    def __init__(self, autoencoder: PatchPCAAutoencoder, file_name: str = PCA_FILE_NAME, sha256: str | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = autoencoder.to(self.device)
        self.latent_channels = autoencoder.latent_channels
        self.downsample = autoencoder.patch_size
        self.scaling_factor = autoencoder.scaling_factor
        self.shift_factor = 0.0
        self.spec = {
            "type": "pca",
            "name": f"patch-pca-{autoencoder.patch_size}x{autoencoder.patch_size}-k{autoencoder.latent_channels}",
            "file": file_name,
            "sha256": sha256,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    @classmethod
    def from_file(cls, path: str, device: str | torch.device = "cpu") -> "PCAVAE":
        return cls(PatchPCAAutoencoder.load(path), os.path.basename(path), file_sha256(path), device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images).cpu()  # (N, K, H/p, W/p)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents).clamp(-1.0, 1.0)  # (N, 3, H, W) on self.device


class DiffusersVAE:
    """Any diffusers AutoencoderKL (SD, SDXL, 16-channel) by local folder or hub id."""

    def __init__(self, name_or_path: str, *, subfolder: str | None = None, revision: str | None = None,
                 device: str | torch.device = "cpu", precision: str = "auto", sample_posterior: bool = False,
                 seed: int = 0):
        from diffusers import AutoencoderKL

        kwargs = {"subfolder": subfolder} if subfolder else {}
        if revision:
            kwargs["revision"] = revision
        self.device = torch.device(device)
        self.precision = precision
        self.model = AutoencoderKL.from_pretrained(name_or_path, **kwargs).to(self.device).eval()
        config = self.model.config
        self.scaling_factor = float(config.scaling_factor if config.scaling_factor is not None else 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.latents_mean, self.latents_std = _channel_statistics(config, self.latent_channels, name_or_path)
        if self.latents_mean is not None and self.shift_factor:
            raise ValueError(f"VAE {name_or_path}: its config sets both latents_mean/latents_std and shift_factor "
                             f"({self.shift_factor}); diffusers' pipelines apply one or the other, so which one the "
                             "latents were made with is ambiguous")
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.sample_posterior = sample_posterior
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        stored_path = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
        self.spec = {
            "type": "diffusers",
            "name_or_path": stored_path,
            "subfolder": subfolder,
            "revision": revision,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": self.latents_mean,
            "latents_std": self.latents_std,
            "sample_posterior": sample_posterior,
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        with autocast_context(self.device, self.precision):
            posterior = self.model.encode(images).latent_dist
            raw = posterior.sample(generator=self._generator) if self.sample_posterior else posterior.mean
        raw = raw.float()  # (N, C, H/f, W/f)
        if self.latents_mean is not None:
            mean, std = self._channel_tensors(raw.device)
            return ((raw - mean) * self.scaling_factor / std).cpu()
        return ((raw - self.shift_factor) * self.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device).float()  # (N, C, H/f, W/f)
        if self.latents_mean is not None:
            mean, std = self._channel_tensors(self.device)
            raw = latents * std / self.scaling_factor + mean
        else:
            raw = latents / self.scaling_factor + self.shift_factor
        with autocast_context(self.device, self.precision):
            images = self.model.decode(raw).sample
        return images.float().clamp(-1.0, 1.0)  # (N, 3, H, W) on self.device

    def _channel_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:  # (1, C, 1, 1) each
        shape = (1, self.latent_channels, 1, 1)
        return (torch.tensor(self.latents_mean, device=device).view(shape),
                torch.tensor(self.latents_std, device=device).view(shape))


def _channel_statistics(config, channels: int, name: str) -> tuple[list | None, list | None]:
    """The config's per-channel ``latents_mean``/``latents_std`` as float lists, or (None, None) when unset."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError(f"VAE {name}: its config sets only one of latents_mean and latents_std")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"VAE {name}: latents_mean/latents_std have {len(mean)}/{len(std)} values for "
                         f"{channels} latent channels")
    if min(std) <= 0:
        raise ValueError(f"VAE {name}: latents_std must be positive, got {std}")
    return mean, std


# what a manifest's VAE spec fixes about the latents: the reloaded VAE must agree or it decodes other latents
_LATENT_SCALING_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def load_vae(spec: dict, directory: str | None = None, *, device: str | torch.device = "cpu", precision: str = "auto"):
    """Rebuild an adapter from its spec; ``directory`` resolves the PCA file named by the spec."""
    kind = spec.get("type")
    if kind == "pca":
        path = os.path.join(directory or ".", spec["file"])
        adapter = PCAVAE.from_file(path, device)
        if spec.get("sha256") and adapter.spec["sha256"] != spec["sha256"]:
            raise ValueError(f"{path}: sha256 {adapter.spec['sha256']} differs from the manifest's {spec['sha256']}")
        return adapter
    if kind == "diffusers":
        adapter = DiffusersVAE(
            spec["name_or_path"],
            subfolder=spec.get("subfolder"),
            revision=spec.get("revision"),
            device=device,
            precision=precision,
            sample_posterior=bool(spec.get("sample_posterior", False)),
        )
        for key in _LATENT_SCALING_KEYS:
            if key in spec and spec[key] != adapter.spec[key]:
                raise ValueError(f"VAE {spec['name_or_path']}: {key} is {adapter.spec[key]} now but the shards were "
                                 f"encoded with {spec[key]}; decoding would scale the latents wrongly")
        return adapter
    raise ValueError(f"unknown VAE type {kind!r} in spec {spec!r}")


def load_vae_from_manifest(manifest_or_dir: str | dict, *, directory: str | None = None,
                           device: str | torch.device = "cpu", precision: str = "auto"):
    """The decoder for sampled latents: the very VAE that encoded this shard set.

    Pass a shard-set folder or manifest path; a manifest dict needs ``directory`` when its
    encoder is a file (PCA) stored beside the shards.
    """
    manifest, found_directory = load_manifest(manifest_or_dir)
    return load_vae(manifest["vae"], directory or found_directory, device=device, precision=precision)
