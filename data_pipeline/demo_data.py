"""Embedded demo data: real photos from scikit-image's wheel -> class-conditional latent shards.

``python -m data_pipeline.demo_data --out DIR --resolutions 64 128`` needs no download: each
colour photo shipped in ``skimage/data`` becomes one class, sampled as seeded random square
crops (scale, position, mirror), encoded and written by the same EncodeJob the encode tool uses.
The encoder (``--vae``): ``trained`` (default) a small diffusers AutoencoderKL trained on the training
crops in a few minutes (data_pipeline/demo_vae.py) and saved beside the shards in OUT/vae/, loaded like a
hub VAE; ``pca`` the offline patch-PCA autoencoder (seconds; blocky samples; what the fast tests use).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .encode import EncodeJob, crop_batches, fit_pca, fit_subset
from .images import ImageItem, ImageSource, load_rgb
from .pca_autoencoder import PCA_FILE_NAME
from .vae import PCAVAE, DiffusersVAE

log = logging.getLogger(__name__)

# (class name, file in skimage/data): the colour photographs; greyscale, binary, synthetic and
# text images (camera, horse, chessboard, page, ...) are left out.
DEMO_PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("cat", "chelsea.png"),
    ("coffee", "coffee.png"),
    ("galaxies", "hubble_deep_field.jpg"),
    ("tissue", "ihc.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
)
# Smallest crop side as a fraction of the photo's short side. Why 0.8: a class is then one scene seen with small
# shifts, scales and mirrors, which a few CPU minutes of DiT training can learn; with 0.45 the same recipe's samples
# kept each class's colours but no layout (README, "How the recipe was chosen").
MIN_CROP_FRACTION = 0.8


def skimage_data_dir() -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def available_photos() -> list[tuple[str, str]]:
    """(class name, path) for the demo photos present in this scikit-image install."""
    directory = skimage_data_dir()
    found = [(name, os.path.join(directory, file)) for name, file in DEMO_PHOTOS if os.path.isfile(os.path.join(directory, file))]
    missing = [file for _, file in DEMO_PHOTOS if not os.path.isfile(os.path.join(directory, file))]
    if missing:
        log.warning("demo photos missing from %s: %s", directory, missing)
    if len(found) < 2:
        raise FileNotFoundError(f"need at least 2 demo photos in {directory}, found {[p for _, p in found]}")
    return found


class DemoPhotoSource(ImageSource):
    """Seeded random square crops of each photo; crop j of class c depends only on (seed, c, j)."""

    def __init__(self, resolutions: Sequence[int], samples_per_class: int, seed: int = 0):
        photos = available_photos()
        # pre-shrink so the smallest crop still covers the largest resolution without upsampling
        target_short = math.ceil(max(resolutions) / MIN_CROP_FRACTION)
        self.photos = []
        for _, path in photos:
            image = load_rgb(path)
            scale = min(1.0, target_short / min(image.size))
            if scale < 1.0:
                image = image.resize(tuple(max(1, round(s * scale)) for s in image.size), resample=Image.BOX)
            self.photos.append(image)
        self.crops = []
        items = []
        for label, image in enumerate(self.photos):
            rng = np.random.default_rng([seed, label])
            width, height = image.size
            for j in range(samples_per_class):
                side = int(round(min(width, height) * rng.uniform(MIN_CROP_FRACTION, 1.0)))
                left = int(rng.integers(0, width - side + 1))
                top = int(rng.integers(0, height - side + 1))
                flip = bool(rng.random() < 0.5)
                self.crops.append((label, (left, top, left + side, top + side), flip))
                items.append(ImageItem(f"{photos[label][1]}#crop{j}", label))
        description = {"kind": "skimage-demo", "path": skimage_data_dir(), "photos": [os.path.basename(p) for _, p in photos],
                       "samples_per_class": samples_per_class, "seed": seed}
        super().__init__(items, [name for name, _ in photos], description)

    def load(self, index: int) -> Image.Image:
        label, box, flip = self.crops[index]
        crop = self.photos[label].crop(box)
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop


def export_demo_photos(out_dir: str) -> str:
    """Copy the demo photos into an ImageNet-layout folder (OUT/<class>/<file>) for the encode tool."""
    for name, path in available_photos():
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        target = os.path.join(out_dir, name, os.path.basename(path))
        with open(path, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
    return out_dir


def validation_source(resolutions: Sequence[int], samples_per_class: int, per_class: int, seed: int = 0):
    """The first ``per_class`` crops per class drawn after the ``samples_per_class`` training crops that are not
    the same crop (box and mirror) as a training crop of their class: never trained on.

    Why the check: with crops of 80-100 % of a photo pre-shrunk to 160 px the crop space is small, and 6 of the
    160 crops drawn next repeated a training crop exactly (an exact copy in the held-out set)."""
    from .val_split import SubsetSource

    total = samples_per_class + 4 * per_class  # candidates; crop j depends on (seed, c, j) only
    every = DemoPhotoSource(resolutions, total, seed)
    held = []
    for c in range(len(every.class_names)):
        trained = {every.crops[c * total + j][1:] for j in range(samples_per_class)}  # (box, flip)
        fresh = [c * total + j for j in range(samples_per_class, total) if every.crops[c * total + j][1:] not in trained]
        if len(fresh) < per_class:
            raise ValueError(f"class {every.class_names[c]}: only {len(fresh)} crops differ from the training crops, "
                             f"{per_class} validation crops asked for")
        held += fresh[:per_class]
    return SubsetSource(every, held, "validation", {"extra_crops_per_class": per_class, "seed": seed,
                                                    "distinct_from_training": True})


def vae_training_images(source: ImageSource, resolution: int, fit_images: int, seed: int = 0) -> torch.Tensor:
    """The demo VAE's training images: the seeded subset of training crops the PCA is fitted on, at ``resolution``."""
    chosen = fit_subset(len(source), fit_images, seed)
    return torch.cat([b[resolution] for b in crop_batches(source, chosen, [resolution])])  # (N, 3, R, R)


def build_demo_data(out: str, resolutions: Sequence[int] = (64, 128), samples_per_class: int = 200, seed: int = 0,
                    samples_per_shard: int = 400, fit_images: int = 400, progress: bool = False,
                    val_fraction: float | None = 0.1, vae: str = "trained", vae_train: dict | None = None) -> dict[int, dict]:
    """Write OUT/<res>/{manifest.json, classes.json, pca_autoencoder.npz, latents-*.tar}; return manifests.

    ``val_fraction`` (default 0.1; None or 0: none): ``round(val_fraction × samples_per_class)`` further crops per
    class, drawn after the training crops from the same seeded streams, are written as the validation shard set
    OUT/val/<res>/ (data_pipeline/val_split.py) and recorded in the training manifests. The training crops are the
    same with or without a validation set, and the PCA is fitted on them only. A rerun into the same folder reuses
    the fitted PCA (or trained VAE, OUT/vae/) and skips finished shards. ``vae``: "trained" or "pca"; ``vae_train``:
    training settings over data_pipeline/demo_vae.py's ``TRAIN_DEFAULTS``.
    """
    from .val_split import VAL_KEY_PREFIX, link_validation, val_root

    resolutions = sorted(int(r) for r in resolutions)
    source = DemoPhotoSource(resolutions, samples_per_class, seed)
    os.makedirs(out, exist_ok=True)
    if vae == "pca":
        vae_file = os.path.join(out, PCA_FILE_NAME)
        if not os.path.exists(vae_file):
            fit_pca(source, resolutions, max_images=fit_images, seed=seed).save(vae_file)
        make_adapter = lambda: PCAVAE.from_file(vae_file)  # noqa: E731
    elif vae == "trained":
        from .demo_vae import DEMO_VAE_DIR, train_and_save

        vae_file = None
        folder = os.path.abspath(os.path.join(out, DEMO_VAE_DIR))
        image_sets = [vae_training_images(source, r, fit_images, seed) for r in resolutions]  # [(N, 3, R, R), ...]
        teacher = fit_pca(source, resolutions, max_images=fit_images, seed=seed)  # the distillation warm start's targets
        train_and_save(image_sets, folder, teacher=teacher, progress=progress, **dict({"seed": seed}, **(vae_train or {})))
        make_adapter = lambda: DiffusersVAE(folder)  # noqa: E731
    else:
        raise ValueError(f"vae must be 'trained' or 'pca', got {vae!r}")

    def job(src, root, prefix=""):
        return EncodeJob(src, root, resolutions, make_adapter(), samples_per_shard=samples_per_shard,
                         batch_size=256 if vae == "pca" else 64, vae_file=vae_file, progress=progress, key_prefix=prefix).run()

    manifests = job(source, out)
    per_class = int(round((val_fraction or 0.0) * samples_per_class))
    if per_class > 0:
        job(validation_source(resolutions, samples_per_class, per_class, seed), val_root(out), VAL_KEY_PREFIX)
        link_validation(out, resolutions)
        manifests = {r: json.load(open(os.path.join(out, str(r), "manifest.json"))) for r in resolutions}
    return manifests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data root; shard sets go to OUT/<resolution>/")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], choices=(64, 128, 256, 512))
    parser.add_argument("--samples-per-class", type=int, default=200)
    parser.add_argument("--samples-per-shard", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="validation crops per class as a fraction of --samples-per-class, written to OUT/val/<res>/ "
                             "(0: none)")
    parser.add_argument("--export-photos", metavar="DIR", help="also copy the photos to DIR/<class>/ for the encode tool")
    parser.add_argument("--vae", choices=("trained", "pca"), default="trained",
                        help="trained (default): a small AutoencoderKL trained here in a few minutes, saved to OUT/vae/; "
                             "pca: the patch-PCA autoencoder (seconds, blocky samples)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    manifests = build_demo_data(args.out, args.resolutions, args.samples_per_class, args.seed,
                                samples_per_shard=args.samples_per_shard, progress=not args.no_progress,
                                val_fraction=args.val_fraction or None, vae=args.vae)
    for resolution, manifest in manifests.items():
        print(f"{os.path.join(args.out, str(resolution))}: {manifest['num_samples']} samples, "
              f"{manifest['num_classes']} classes, latent {manifest['latent_shape']} {manifest['latent_dtype']}, "
              f"{len(manifest['shards'])} shard(s)"
              + (f"; validation {manifest['validation']['num_samples']} samples in "
                 f"{os.path.join(args.out, str(resolution), manifest['validation']['dir'])}" if "validation" in manifest else ""))
    if args.export_photos:
        print(f"photos exported to {export_demo_photos(args.export_photos)}")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
