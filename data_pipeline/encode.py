"""Encode images into latent shard sets: ``python -m data_pipeline.encode ...`` (console script ``dit-encode``).

Subcommands::

    encode (default)   images -> ADM centre crop per resolution -> VAE -> ROOT/<res>/latents-*.tar
    fit-pca            fit the offline PCA autoencoder once, to pass to every part of a sharded encode
    merge-manifests    combine manifest-partNNN.json files into manifest.json

Scaling out: part p of P (``--shard-index``/``--num-shards-total``, defaulting to the Slurm array
variables) encodes a contiguous slice of the deterministic item order and names its shards
``latents-PPP-NNNNNN.tar``, so parts never collide. Each finished shard is renamed into place
atomically; a rerun skips shards that exist. The last part to finish writes manifest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from typing import Sequence

import numpy as np
import torch

from .images import ImageSource, center_crop_arr, file_list_source, folder_source, uint8_to_model
from .manifest import (
    MANIFEST_NAME,
    merge_part_manifests,
    new_manifest,
    part_manifest_name,
    shard_file_name,
    write_classes,
    write_json_atomic,
    write_manifest,
)
from .pca_autoencoder import PCA_FILE_NAME, PatchPCAAutoencoder, file_sha256
from .safety import ShardError
from .shard_writer import ShardWriter, count_shard_samples
from .vae import DiffusersVAE, PCAVAE

log = logging.getLogger(__name__)
SUBCOMMANDS = ("encode", "fit-pca", "merge-manifests")


def plan_items(num_images: int, hflip: bool, shuffle_seed: int | None = 0) -> list[tuple[int, bool]]:
    """(image index, flipped) in a fixed order; the position in this list is the sample key.

    Images are permuted with ``shuffle_seed`` so each shard mixes classes (an ImageNet folder walk
    would put one or two classes per shard, which a loader's shuffle buffer cannot undo).
    """
    order = np.arange(num_images) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(num_images)
    return [(int(i), flip) for i in order for flip in ((False, True) if hflip else (False,))]


def part_range(num_items: int, num_parts: int, part: int) -> tuple[int, int]:
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} outside 0..{num_parts - 1}")
    return num_items * part // num_parts, num_items * (part + 1) // num_parts


def slurm_part_defaults() -> tuple[int, int]:
    """(num_parts, part) from a Slurm job array; array ids may start at any --array minimum."""
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if count is None or task is None:
        return 1, 0
    return int(count), int(task) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))


def _load_or_none(source: ImageSource, index: int):
    try:
        return source.load(index)
    except Exception as error:  # unreadable image: skip it, keep the job alive
        log.warning("skipping unreadable image %s (%s)", getattr(source.items[index], "path", index), error)
        return None


def crop_batches(source: ImageSource, indices: Sequence[int], resolutions: Sequence[int], batch_images: int = 64):
    """Yield {resolution: (N, 3, R, R) tensor in [-1, 1]} for deterministic batches of images."""
    for begin in range(0, len(indices), batch_images):
        crops: dict[int, list[np.ndarray]] = {r: [] for r in resolutions}
        for index in indices[begin : begin + batch_images]:
            image = _load_or_none(source, index)
            if image is None:
                continue
            for resolution in resolutions:
                crops[resolution].append(center_crop_arr(image, resolution))
        if crops[resolutions[0]]:
            yield {r: uint8_to_model(arrays) for r, arrays in crops.items()}


def fit_subset(num_images: int, max_images: int, seed: int = 0) -> list[int]:
    """The seeded, sorted subset of image indices an encoder is fitted on (PCA or the demo's trained VAE)."""
    count = min(num_images, max_images)
    return sorted(np.random.default_rng(seed).choice(num_images, size=count, replace=False).tolist())


def fit_pca(source: ImageSource, resolutions: Sequence[int], *, patch_size: int = 8, num_components: int = 4,
            max_images: int = 2000, seed: int = 0) -> PatchPCAAutoencoder:
    """Fit on a seeded subset of the images at every requested resolution (same subset in every job)."""
    indices = fit_subset(len(source), max_images, seed)
    batches = (batch[r] for batch in crop_batches(source, indices, resolutions) for r in resolutions)
    return PatchPCAAutoencoder.fit(batches, patch_size=patch_size, num_components=num_components)


class EncodeJob:
    """One part of an encode: writes its shards for every resolution, then its part manifests."""

    def __init__(self, source: ImageSource, out_root: str, resolutions: Sequence[int], vae, *,
                 samples_per_shard: int = 1000, batch_size: int = 32, hflip: bool = False, num_parts: int = 1,
                 part: int = 0, latent_dtype: str = "float16", vae_file: str | None = None, progress: bool = True,
                 shuffle_seed: int | None = 0, loader_threads: int = 4, key_prefix: str = ""):
        if samples_per_shard < 1 or batch_size < 1:
            raise ValueError("samples_per_shard and batch_size must be >= 1")
        for resolution in resolutions:
            if resolution % vae.downsample:
                raise ValueError(f"resolution {resolution} is not a multiple of the VAE downsample factor {vae.downsample}")
        self.source = source
        self.out_root = out_root
        self.resolutions = sorted(int(r) for r in resolutions)
        self.vae = vae
        self.samples_per_shard = samples_per_shard
        self.batch_size = batch_size
        self.hflip = hflip
        self.num_parts = num_parts
        self.part = part
        self.latent_dtype = np.dtype(latent_dtype)
        self.vae_file = vae_file
        self.progress = progress
        self.shuffle_seed = shuffle_seed
        self.loader_threads = max(1, loader_threads)
        self.key_prefix = key_prefix  # "val-" for a validation shard set (data_pipeline/val_split.py)
        items = plan_items(len(source), hflip, shuffle_seed)
        self.first_item, stop = part_range(len(items), num_parts, part)
        self.items = items[self.first_item : stop]

    def directory(self, resolution: int) -> str:
        return os.path.join(self.out_root, str(resolution))

    def fingerprint(self) -> dict:
        return {
            "vae": self.vae.spec, "samples_per_shard": self.samples_per_shard, "hflip": self.hflip,
            "num_parts": self.num_parts, "part": self.part, "latent_dtype": str(self.latent_dtype),
            "shuffle_seed": self.shuffle_seed,
            "source": self.source.description, "num_images": len(self.source),
            **({"key_prefix": self.key_prefix} if self.key_prefix else {}),
        }

    def _guard_rerun(self, resolution: int) -> None:
        """A rerun may only resume the same job; mixing shards from two configurations is refused."""
        path = os.path.join(self.directory(resolution), f".encode-config-part{self.part:03d}.json")
        wanted = json.loads(json.dumps(self.fingerprint()))
        if os.path.exists(path):
            with open(path) as handle:
                found = json.load(handle)
            if found != wanted:
                changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise ValueError(f"{self.directory(resolution)} holds part {self.part} shards from a different encode "
                                 f"configuration (changed: {changed}); use a fresh --out folder")
        else:
            write_json_atomic(path, wanted)

    def _prepare(self) -> None:
        for resolution in self.resolutions:
            directory = self.directory(resolution)
            os.makedirs(directory, exist_ok=True)
            self._guard_rerun(resolution)
            if self.vae_file is not None:
                target = os.path.join(directory, os.path.basename(self.vae_file))
                if not os.path.exists(target) or file_sha256(target) != file_sha256(self.vae_file):
                    shutil.copyfile(self.vae_file, target + ".tmp")
                    os.replace(target + ".tmp", target)
            write_classes(directory, self.source.class_names)

    def _encode_images(self, images: torch.Tensor) -> np.ndarray:
        """(N, 3, R, R) in [-1, 1] -> (N, C, R/f, R/f) in the shard dtype."""
        return self.vae.encode(images).numpy().astype(self.latent_dtype)

    def _crops(self, image_index: int, resolutions: Sequence[int]) -> dict[int, np.ndarray] | None:
        image = _load_or_none(self.source, image_index)
        return None if image is None else {r: center_crop_arr(image, r) for r in resolutions}

    def _write_shard(self, index: int, items: list[tuple[int, bool]], missing: list[int], pool) -> dict[int, int]:
        """Stream one shard per missing resolution, a VAE batch at a time (bounded memory at 512 px)."""
        writers = {
            r: ShardWriter(os.path.join(self.directory(r), shard_file_name(index, self.part, self.num_parts)))
            for r in missing
        }
        try:
            for begin in range(0, len(items), self.batch_size):
                batch = items[begin : begin + self.batch_size]
                unique = sorted({image for image, _ in batch})
                crops = dict(zip(unique, pool.map(lambda i: self._crops(i, missing), unique)))  # ordered: deterministic
                kept = [(offset, image, flip) for offset, (image, flip) in enumerate(batch, begin) if crops[image] is not None]
                if not kept:
                    continue
                keys = [f"{self.key_prefix}{self.first_item + index * self.samples_per_shard + offset:010d}" for offset, _, _ in kept]
                labels = [self.source.label(image) for _, image, _ in kept]
                for resolution, writer in writers.items():
                    arrays = [np.ascontiguousarray(crops[image][resolution][:, ::-1]) if flip else crops[image][resolution]
                              for _, image, flip in kept]
                    latents = self._encode_images(uint8_to_model(arrays))  # (N, C, h, w)
                    for key, latent, label in zip(keys, latents, labels):
                        writer.write(key, latent, label)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for writer in writers.values():
            writer.close()
        return {r: writer.num_samples for r, writer in writers.items()}

    def run(self) -> dict[int, dict]:
        """Encode (skipping finished shards) and return {resolution: part manifest}."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        self._prepare()
        pool = ThreadPoolExecutor(max_workers=self.loader_threads)  # PIL decodes and resizes outside the GIL
        num_shards = math.ceil(len(self.items) / self.samples_per_shard)
        counts: dict[int, list[int]] = {r: [0] * num_shards for r in self.resolutions}
        skipped = 0
        bar = tqdm(total=len(self.items), desc=f"encode part {self.part}/{self.num_parts}", unit="img", disable=not self.progress)
        for index in range(num_shards):
            items = self.items[index * self.samples_per_shard : (index + 1) * self.samples_per_shard]
            missing = []
            for resolution in self.resolutions:
                path = os.path.join(self.directory(resolution), shard_file_name(index, self.part, self.num_parts))
                if os.path.exists(path):
                    try:
                        counts[resolution][index] = count_shard_samples(path)
                        continue
                    except ShardError as broken:  # e.g. cut by an interrupted copy: encode it again
                        log.warning("re-encoding broken existing shard: %s", broken)
                missing.append(resolution)
            if missing:
                for resolution, count in self._write_shard(index, items, missing, pool).items():
                    counts[resolution][index] = count
            else:
                skipped += 1
            bar.update(len(items))
        bar.close()
        pool.shutdown()
        if skipped:
            log.info("part %d: %d finished shard(s) found and skipped", self.part, skipped)
        self.skipped_existing_shards = skipped
        return {r: self._finish(r, counts[r]) for r in self.resolutions}

    def _finish(self, resolution: int, counts: list[int]) -> dict:
        side = resolution // self.vae.downsample
        manifest = new_manifest(
            shards=[(shard_file_name(i, self.part, self.num_parts), c) for i, c in enumerate(counts)],
            latent_shape=[self.vae.latent_channels, side, side],
            latent_dtype=str(self.latent_dtype),
            vae=self.vae.spec,
            resolution=resolution,
            class_names=self.source.class_names,
            source=dict(self.source.description, num_images=len({i for i, _ in self.items}), hflip=self.hflip),
            part=(self.part, self.num_parts),
            created_by="data_pipeline.encode",
        )
        directory = self.directory(resolution)
        write_manifest(os.path.join(directory, part_manifest_name(self.part)), manifest)
        try:
            merge_part_manifests(directory, self.num_parts)
        except FileNotFoundError as waiting:
            log.info("manifest.json not written yet: %s", waiting)
        return manifest


def build_source(args) -> ImageSource:
    if bool(args.input) == bool(args.file_list):
        raise SystemExit("give exactly one of --input DIR or --file-list FILE")
    return folder_source(args.input) if args.input else file_list_source(args.file_list, args.base_dir)


def build_vae(args, source: ImageSource, num_parts: int):
    """Return (adapter, file to copy beside the shards or None)."""
    if args.vae != "pca":
        return DiffusersVAE(args.vae, subfolder=args.vae_subfolder, revision=args.vae_revision, device=args.device,
                            precision=args.precision, sample_posterior=args.sample_posterior, seed=args.seed), None
    if args.pca_file:
        return PCAVAE.from_file(args.pca_file), args.pca_file
    if num_parts > 1:
        raise SystemExit("--vae pca with several parts needs one shared --pca-file: fit it once with "
                         "`python -m data_pipeline.encode fit-pca ... --out FILE` and pass it to every part")
    path = os.path.join(args.out, PCA_FILE_NAME)
    if os.path.exists(path):  # a rerun resumes with the encoder its finished shards were made with
        log.info("reusing fitted PCA autoencoder %s", path)
    else:
        fit_pca(source, args.resolutions, patch_size=args.pca_patch_size, num_components=args.pca_components,
                max_images=args.fit_max_images, seed=args.seed).save(path)
    return PCAVAE.from_file(path), path


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="folder with one subfolder per class (ImageNet layout)")
    parser.add_argument("--file-list", help="text file of 'path<TAB>label' lines")
    parser.add_argument("--base-dir", help="folder that relative paths in --file-list are relative to")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256], help="pixel resolutions to encode")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> dict[str, argparse.ArgumentParser]:
    encode = argparse.ArgumentParser(prog="dit-encode", description="images -> latent WebDataset shards")
    _add_source_args(encode)
    encode.add_argument("--out", required=True, help="data root; shards go to OUT/<resolution>/")
    encode.add_argument("--vae", default="pca", help="'pca' (offline) or a diffusers AutoencoderKL folder / hub id")
    encode.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' when pointing at a full pipeline")
    encode.add_argument("--vae-revision", default=None)
    encode.add_argument("--sample-posterior", action="store_true", help="sample the posterior instead of its mean")
    encode.add_argument("--pca-file", help="fitted PCA autoencoder (.npz) shared by all parts")
    encode.add_argument("--pca-patch-size", type=int, default=8)
    encode.add_argument("--pca-components", type=int, default=4)
    encode.add_argument("--fit-max-images", type=int, default=2000)
    encode.add_argument("--hflip", action="store_true", help="also store a horizontally flipped copy of every image")
    encode.add_argument("--samples-per-shard", type=int, default=1000)
    encode.add_argument("--no-shuffle", action="store_true", help="keep input order in shards (default: seeded shuffle)")
    encode.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    encode.add_argument("--loader-threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding and cropping images")
    encode.add_argument("--latent-dtype", choices=("float16", "float32"), default="float16")
    parts, part = slurm_part_defaults()
    encode.add_argument("--num-shards-total", type=int, default=parts, help="number of parts (default: Slurm array size)")
    encode.add_argument("--shard-index", type=int, default=part, help="this part (default: Slurm array task id)")
    encode.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    encode.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast on GPU (auto: bf16 where supported); CPU runs fp32 unless told otherwise")
    encode.add_argument("--no-progress", action="store_true")
    held = encode.add_mutually_exclusive_group()
    held.add_argument("--val-fraction", type=float, default=None,
                      help="hold out this fraction of each class's images as a validation shard set in OUT/val/<res>/")
    held.add_argument("--val-list", default=None, help="file of image paths (one a line) to hold out for validation")

    fit = argparse.ArgumentParser(prog="dit-encode fit-pca", description="fit the offline PCA autoencoder once")
    _add_source_args(fit)
    fit.add_argument("--out", required=True, help="output .npz file")
    fit.add_argument("--patch-size", type=int, default=8)
    fit.add_argument("--components", type=int, default=4)
    fit.add_argument("--max-images", type=int, default=2000)

    merge = argparse.ArgumentParser(prog="dit-encode merge-manifests", description="write manifest.json from part manifests")
    merge.add_argument("--out", required=True, help="data root (or one shard-set folder)")
    merge.add_argument("--resolutions", type=int, nargs="*", help="default: every numeric subfolder")
    merge.add_argument("--num-parts", type=int, default=None)
    return {"encode": encode, "fit-pca": fit, "merge-manifests": merge}


def run_encode(args) -> dict[int, dict]:
    source = build_source(args)
    os.makedirs(args.out, exist_ok=True)
    fraction, val_list = getattr(args, "val_fraction", None), getattr(args, "val_list", None)
    val_source = None
    if fraction is not None or val_list is not None:
        from .val_split import split_source

        source, val_source = split_source(source, fraction=fraction, val_list=val_list, seed=args.seed)
    vae, vae_file = build_vae(args, source, args.num_shards_total)  # PCA fitted on training images only

    def job(src, out, prefix=""):
        return EncodeJob(src, out, args.resolutions, vae, samples_per_shard=args.samples_per_shard,
                         batch_size=args.batch_size, hflip=args.hflip, num_parts=args.num_shards_total,
                         part=args.shard_index, latent_dtype=args.latent_dtype, vae_file=vae_file,
                         progress=not args.no_progress, shuffle_seed=None if args.no_shuffle else args.seed,
                         loader_threads=args.loader_threads, key_prefix=prefix).run()

    manifests = job(source, args.out)
    if val_source is not None:
        from .val_split import VAL_KEY_PREFIX, link_validation, val_root

        job(val_source, val_root(args.out), VAL_KEY_PREFIX)
        link_validation(args.out, args.resolutions)
    return manifests


def run_merge(args) -> list[str]:
    if os.path.exists(os.path.join(args.out, "manifest-part000.json")):
        directories = [args.out]
    else:
        resolutions = args.resolutions or sorted(int(d) for d in os.listdir(args.out) if d.isdigit())
        directories = [os.path.join(args.out, str(r)) for r in resolutions]
    for directory in directories:
        merged = merge_part_manifests(directory, args.num_parts)
        print(f"{os.path.join(directory, MANIFEST_NAME)}: {merged['num_samples']} samples in {len(merged['shards'])} shards")
    from .val_split import link_validation, val_root

    if os.path.isdir(val_root(args.out)):  # a validation split encoded in parts: merge it and link it too
        for r in sorted(int(d) for d in os.listdir(val_root(args.out)) if d.isdigit()):
            merge_part_manifests(os.path.join(val_root(args.out), str(r)), args.num_parts)
        link_validation(args.out, [int(os.path.basename(d)) for d in directories if os.path.basename(d).isdigit()])
    return directories


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "encode"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser()[command].parse_args(argv)
    if command == "fit-pca":
        model = fit_pca(build_source(args), args.resolutions, patch_size=args.patch_size,
                        num_components=args.components, max_images=args.max_images, seed=args.seed)
        digest = model.save(args.out)
        print(f"{args.out}: {model.latent_channels} components, patch {model.patch_size}, sha256 {digest}")
    elif command == "merge-manifests":
        run_merge(args)
    else:
        for resolution, manifest in run_encode(args).items():
            print(f"{resolution}px: part {args.shard_index}/{args.num_shards_total} wrote {manifest['num_samples']} "
                  f"samples in {len(manifest['shards'])} shard(s) of {manifest['latent_shape']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
