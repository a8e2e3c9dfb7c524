"""FID and Inception Score from Inception features, and loading a local Inception feature extractor.

Fréchet distance between Gaussians N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017; the ADM/DiT evaluator
computes the same with scipy's sqrtm)::

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2: the product of two
symmetric positive semi-definite matrices is similar to S1^(1/2) S2 S1^(1/2), so its eigenvalues are
real and >= 0 (tiny negative or imaginary parts are rounding and are clipped).

Inception Score (Salimans et al. 2016), per split: exp(mean_x KL(p(y|x) || p(y))), mean over splits.

Nothing is downloaded. ``load_feature_extractor(path)`` takes a local TorchScript file, e.g. NVIDIA's
``inception-2015-12-05.pt`` used by StyleGAN-ADA/EDM (called as ``m(uint8 NCHW, return_features=True)`` →
2048-d pool features; ``return_features=False`` → class probabilities), or any TorchScript module that
maps uint8 NCHW images to features (a tensor) or to ``(features, logits)``.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def feature_moments(features: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, sum, sum of outer products) of (N, D) features in float64: the part of the Gaussian statistics that
    ranks can add up (an all-reduce of D + D² numbers) instead of gathering every feature vector on one rank."""
    x = np.asarray(features, dtype=np.float64)
    return len(x), x.sum(axis=0), x.T @ x


def statistics_from_moments(count: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from ``feature_moments`` summed over ranks (equal to ``gaussian_statistics`` of
    the concatenated features up to float64 rounding)."""
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {count}")
    mu = np.asarray(total, np.float64) / count
    sigma = (np.asarray(outer, np.float64) - count * np.outer(mu, mu)) / (count - 1)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))) for (N, K) class probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    scores = []
    for part in np.array_split(p, splits):
        if len(part) == 0:
            continue
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(py, 1e-12, None)))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


INCEPTION_NAME = "inception-v3-pool3"
INCEPTION_DIM = 2048


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "features"


class FeatureExtractor:
    """A local TorchScript Inception (or compatible) network: uint8 NHWC arrays → features [, probabilities].

    ``name`` (default: the file's name), ``dim`` (the feature width, known after the first batch) and ``sha256`` (of
    the weights file) identify it in every record. It is taken for Inception-v3 pool3 (and its distance called FID)
    only when its name says Inception and its features are 2048-d (``is_inception``); any other network's distance
    is ``fd_<name>``. Whether ``forward`` takes ``return_features`` is read from its TorchScript schema once: an
    error raised inside the network propagates, it is never retried another way."""

    def __init__(self, path: str, device="cpu", name: Optional[str] = None):
        import torch

        from data_pipeline.pca_autoencoder import file_sha256

        self.torch = torch
        self.device = torch.device(device)
        self.model = torch.jit.load(path, map_location=self.device).eval()
        self.path = path
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.sha256 = file_sha256(path)
        self.dim: Optional[int] = None
        try:
            arguments = [a.name for a in self.model.forward.schema.arguments]
        except AttributeError:  # not a scripted forward (e.g. a traced module): no keyword
            arguments = []
        self.takes_flag = "return_features" in arguments

    @property
    def is_inception(self) -> bool:
        return "inception" in self.name.lower() and self.dim == INCEPTION_DIM

    def describe(self) -> dict:
        return {"name": INCEPTION_NAME if self.is_inception else self.name, "file": os.path.abspath(self.path),
                "dim": self.dim, "sha256": self.sha256}

    def metric_name(self) -> str:
        """``fid`` for Inception-v3 pool3 features, else ``fd_<extractor name>``."""
        return "fid" if self.is_inception else f"fd_{slug(self.name)}"

    def _call(self, x, features: bool):
        return self.model(x, return_features=features) if self.takes_flag else self.model(x)

    def __call__(self, images_nhwc_uint8: np.ndarray, batch_size: int = 100) -> tuple[np.ndarray, Optional[np.ndarray]]:
        torch = self.torch
        feats, probs = [], []
        with torch.no_grad():
            for i in range(0, len(images_nhwc_uint8), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images_nhwc_uint8[i:i + batch_size])).permute(0, 3, 1, 2)
                x = x.to(self.device)
                out = self._call(x, True)
                if isinstance(out, (tuple, list)):
                    feats.append(out[0].float().cpu().numpy())
                    probs.append(torch.softmax(out[1].float(), dim=1).cpu().numpy())
                    continue
                feats.append(out.float().cpu().numpy())
                if self.takes_flag:
                    p = self._call(x, False)
                    if not isinstance(p, (tuple, list)) and p.shape[-1] != out.shape[-1]:
                        probs.append(p.float().cpu().numpy())
        features = np.concatenate(feats)
        self.dim = int(features.shape[1])
        return features, (np.concatenate(probs) if probs else None)


def load_feature_extractor(path: str, device="cpu", name: Optional[str] = None) -> FeatureExtractor:
    return FeatureExtractor(path, device, name)


def reference_statistics(ref_npz: str, extractor: Optional[FeatureExtractor]) -> tuple[np.ndarray, np.ndarray]:
    """``mu``/``sigma`` stored in an ADM-style reference batch, else computed from its ``arr_0`` images."""
    with np.load(ref_npz) as data:
        if "mu" in data and "sigma" in data:
            return data["mu"], data["sigma"]
        if extractor is None:
            raise ValueError(f"{ref_npz} has no mu/sigma and no feature extractor was given")
        feats, _ = extractor(data["arr_0"])
    return gaussian_statistics(feats)
