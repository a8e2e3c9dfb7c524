"""An offline "VAE": a linear patch autoencoder fitted by PCA on the images themselves.

Pretrained VAE weights cannot be downloaded here, yet the demo's sample grids must show
recognisable pictures. Projecting non-overlapping p x p x 3 pixel patches onto their top-K
principal components gives latents shaped exactly like SD's VAE (64 px, p=8, K=4 -> 4 x 8 x 8),
and the transpose projection decodes them. PCA minimises the squared reconstruction error among
all K-dimensional linear codes, so it is the best a linear encoder of this shape can do.

The dataset-mean patch is subtracted before projecting and added back on decode, so the average
colour of the data survives even where the K components cannot carry it. One scalar
``scaling_factor`` (1 / std of the raw codes on the fitting data) brings latents to ~unit std,
playing the role of SD's 0.18215; latents keep pixel-space geometry (the projection is
orthonormal), so a latent MSE is a pixel MSE up to that scale.

Stored as ``.npz`` written with ``allow_pickle=False`` and read the same way.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable

import numpy as np
import torch

PCA_FILE_NAME = "pca_autoencoder.npz"
PCA_FORMAT = "patch-pca-autoencoder/v1"


def _patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H/p, W/p, 3*p*p), channel-major inside each patch."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)  # (N, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, h // patch, w // patch, c * patch * patch)


def _unpatch(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """(N, h, w, 3*p*p) -> (N, 3, h*p, w*p)."""
    n, h, w, _ = patches.shape
    x = patches.reshape(n, h, w, channels, patch, patch)  # (N, h, w, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, h * patch, w * patch)


class PatchPCAAutoencoder:
    def __init__(self, mean: np.ndarray, components: np.ndarray, patch_size: int, scaling_factor: float,
                 explained_variance: np.ndarray | None = None):
        self.patch_size = int(patch_size)
        self.mean = np.asarray(mean, dtype=np.float32)  # (D,)  D = 3 * p * p
        self.components = np.asarray(components, dtype=np.float32)  # (K, D) orthonormal rows
        self.scaling_factor = float(scaling_factor)
        self.explained_variance = (
            np.asarray(explained_variance, dtype=np.float32) if explained_variance is not None else np.zeros(len(self.components), np.float32)
        )
        if self.components.shape[1] != self.mean.shape[0] or self.mean.shape[0] != 3 * self.patch_size**2:
            raise ValueError(f"inconsistent PCA shapes: mean {self.mean.shape}, components {self.components.shape}, patch {patch_size}")
        self._mean_t = torch.from_numpy(self.mean)
        self._components_t = torch.from_numpy(self.components)

    @property
    def latent_channels(self) -> int:
        return int(self.components.shape[0])

    def to(self, device) -> "PatchPCAAutoencoder":
        """Move the projection to ``device`` (in place): decoding sample grids on the GPU that made them."""
        self._mean_t = self._mean_t.to(device)
        self._components_t = self._components_t.to(device)
        return self

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor], patch_size: int = 8, num_components: int = 4) -> "PatchPCAAutoencoder":
        """Fit from batches of (N, 3, H, W) images in [-1, 1], accumulating moments in float64."""
        dim = 3 * patch_size * patch_size
        total = np.zeros(dim, np.float64)
        outer = np.zeros((dim, dim), np.float64)
        count = 0
        for images in batches:
            rows = _patches(images.float(), patch_size).reshape(-1, dim)  # (M, D) float32, values in [-1, 1]
            total += rows.sum(0, dtype=torch.float64).numpy()
            outer += (rows.T @ rows).double().numpy()  # per-batch float32 product, summed in float64
            count += rows.shape[0]
        if count < num_components + 1:
            raise ValueError(f"need more than {num_components} patches to fit PCA, got {count}")
        mean = total / count
        covariance = outer / count - np.outer(mean, mean)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
        order = np.argsort(eigenvalues)[::-1][:num_components]
        components = eigenvectors[:, order].T  # (K, D)
        # eigenvector signs are arbitrary; fix them so refits on the same data agree bit-for-bit in sign
        signs = np.sign(components[np.arange(num_components), np.abs(components).argmax(1)])
        components *= signs[:, None]
        variance = np.clip(eigenvalues[order], 0.0, None)
        raw_std = float(np.sqrt(variance.sum() / num_components))
        return cls(mean, components, patch_size, 1.0 / max(raw_std, 1e-8), explained_variance=variance)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, K, H/p, W/p), on the projection's device."""
        rows = _patches(images.float().to(self._mean_t.device), self.patch_size) - self._mean_t  # (N, h, w, D)
        codes = rows @ self._components_t.T  # (N, h, w, K)
        return codes.permute(0, 3, 1, 2).contiguous() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, K, h, w) -> images (N, 3, h*p, w*p), roughly in [-1, 1], on the projection's device."""
        codes = latents.float().to(self._components_t.device).permute(0, 2, 3, 1) / self.scaling_factor  # (N, h, w, K)
        rows = codes @ self._components_t + self._mean_t  # (N, h, w, D)
        return _unpatch(rows, self.patch_size)

    def save(self, path: str) -> str:
        """Atomic npz write; returns the file's sha256 so manifests can pin the exact encoder."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
        os.close(fd)
        os.chmod(tmp, 0o644)
        try:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    format=np.array(PCA_FORMAT),
                    patch_size=np.array(self.patch_size, np.int64),
                    mean=self.mean,
                    components=self.components,
                    scaling_factor=np.array(self.scaling_factor, np.float64),
                    explained_variance=self.explained_variance,
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return file_sha256(path)

    @classmethod
    def load(cls, path: str) -> "PatchPCAAutoencoder":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PCA autoencoder file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != PCA_FORMAT:
                raise ValueError(f"{path}: format {str(data['format'])!r}, expected {PCA_FORMAT!r}")
            return cls(
                data["mean"],
                data["components"],
                int(data["patch_size"]),
                float(data["scaling_factor"]),
                explained_variance=data["explained_variance"],
            )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
