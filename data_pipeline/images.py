"""Image-side helpers: ADM preprocessing, [-1, 1] tensors, PNG grids, image sources.

The crop must match ADM/DiT exactly (box-halving then bicubic, then centre crop), because
latents produced with a different resize are a different data distribution from the one the
reference checkpoints and FID statistics assume.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing: returns a (image_size, image_size, 3) uint8 array.

    Halving with BOX while the short side is at least twice the target keeps the bicubic step
    from aliasing on large downscales.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    array = np.asarray(pil_image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def load_rgb(path: str) -> Image.Image:
    """Open any Pillow-readable file as RGB (grey, palette and alpha images are converted)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def uint8_to_model(arrays: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    batch = np.stack(arrays) if not isinstance(arrays, np.ndarray) else arrays
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return tensor.div_(127.5).sub_(1.0)


def model_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8, rounding rather than truncating."""
    images = images.detach().float().cpu().clamp(-1.0, 1.0)
    array = ((images + 1.0) * 127.5).round().to(torch.uint8)  # (N, 3, H, W)
    return array.permute(0, 2, 3, 1).numpy()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((reference.double() - reconstruction.double().clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


def save_image_grid(images: torch.Tensor | np.ndarray, path: str, nrow: int = 8, padding: int = 2) -> str:
    """Write (N, 3, H, W) images in [-1, 1] (or (N, H, W, 3) uint8) as one PNG grid."""
    array = images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else model_to_uint8(torch.as_tensor(images))
    count, height, width, _ = array.shape
    columns = max(1, min(nrow, count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top : top + height, left : left + width] = array[index]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def read_image_grid(path: str, tile: int, padding: int = 2) -> np.ndarray:
    """The tiles of a PNG written by ``save_image_grid`` as (N, tile, tile, 3) uint8, row by row."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    rows = (grid.shape[0] - padding) // (tile + padding)
    columns = (grid.shape[1] - padding) // (tile + padding)
    if rows * (tile + padding) + padding != grid.shape[0] or columns * (tile + padding) + padding != grid.shape[1]:
        raise ValueError(f"{path}: {grid.shape[1]}x{grid.shape[0]} px is not a grid of {tile} px tiles with {padding} px padding")
    corners = [(padding + r * (tile + padding), padding + c * (tile + padding)) for r in range(rows) for c in range(columns)]
    return np.stack([grid[top : top + tile, left : left + tile] for top, left in corners])  # (N, tile, tile, 3)


def block_seam_ratios(images: np.ndarray, periods: Sequence[int] = (8,)) -> dict[int, float]:
    """Per period p: mean |step| between neighbouring pixels across the lines at multiples of p (and of no larger
    listed period) / the mean |step| across no line.

    Why: a decoder that works per 8x8 latent block (the patch-PCA) draws seams on the 8-pixel lines, and a DiT
    whose tokens cover 2x2 latents draws them on the 16-pixel lines until it has learned to join its tokens;
    natural photos and seamless images score about 1.0. ``images``: (N, H, W, C), uint8 pixels or float latents
    moved channels-last (bench_demo_seams.py --run measures the token lines in the DiT's latents).
    """
    pixels = images.astype(np.float64)  # (N, H, W, C)
    across_rows = np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2, 3))  # (H-1,): step between rows i and i+1
    across_columns = np.abs(np.diff(pixels, axis=2)).mean(axis=(0, 1, 3))  # (W-1,)
    steps = np.concatenate([across_rows, across_columns])
    line = np.concatenate([np.arange(1, len(across_rows) + 1), np.arange(1, len(across_columns) + 1)])
    on_no_line = np.all([line % p != 0 for p in periods], axis=0)
    baseline = max(steps[on_no_line].mean(), 1e-12)
    ratios = {}
    for p in sorted(periods):
        mask = (line % p == 0) & np.all([line % q != 0 for q in periods if q > p], axis=0)
        ratios[p] = float(steps[mask].mean() / baseline)
    return ratios


def periodic_texture_ratios(images: np.ndarray, periods: Sequence[int] = (8, 16), reach: int = 2) -> dict[int, float]:
    """Per period p: the spectral power at the frequencies of a p-pixel repeat / the power at their neighbours.

    Why: ``block_seam_ratios`` sees sharp steps on the grid lines, not a soft bump repeated in every token (a blob
    per 16-pixel cell scores ≈ 1 there while the eye sees a grid). A pattern that repeats every p pixels puts
    power at the multiples of W/p cycles per tile; a photo's spectrum is smooth there, so it scores ≈ 1.
    Power is |FFT|² of the pixel differences along each row and each column of each tile, averaged; a frequency
    shared by two listed periods counts for the smaller one (a period-8 pattern repeats every 16 pixels too).
    Neighbours are the frequencies within ``reach`` that belong to no listed period. ``images``: (N, H, W, 3)
    uint8, H and W multiples of every period.
    """
    pixels = images.astype(np.float64)  # (N, H, W, 3)
    height, width = pixels.shape[1:3]
    for p in periods:
        if height % p or width % p:
            raise ValueError(f"tiles of {height}x{width} px are not a whole number of {p}-pixel periods")

    def spectrum(axis: int, size: int) -> np.ndarray:  # (size // 2 + 1,): mean power per frequency along ``axis``
        power = (np.abs(np.fft.rfft(pixels, axis=axis)) ** 2).mean(axis=tuple(a for a in range(4) if a != axis))
        # of the (circular) pixel differences, not the pixels: whitens a photo's ~1/f² fall so that neighbours on
        # either side of a low frequency compare fairly (a repeated pattern's differences repeat all the same)
        return power * 4 * np.sin(np.pi * np.arange(len(power)) / size) ** 2

    ratios = {}
    for size, power in ((height, spectrum(1, height)), (width, spectrum(2, width))):
        frequencies = np.arange(len(power))
        owner = np.zeros(len(power), dtype=np.int64)  # the smallest listed period a frequency belongs to (0: none)
        for p in sorted(periods, reverse=True):
            owner[(frequencies > 0) & (frequencies % (size // p) == 0)] = p
        for p in periods:
            peaks = frequencies[owner == p]
            near = {int(f + d) for f in peaks for d in range(-reach, reach + 1) if d}
            near = [f for f in sorted(near) if 0 < f < len(power) and owner[f] == 0]
            ratios.setdefault(p, []).append(power[peaks].mean() / max(power[near].mean(), 1e-12))
    return {p: float(np.mean(values)) for p, values in ratios.items()}


@dataclass(frozen=True)
class ImageItem:
    path: str
    label: int


class ImageSource:
    """An ordered list of labelled images; order defines sample keys and shard contents."""

    def __init__(self, items: list[ImageItem], class_names: list[str], description: dict):
        self.items = items
        self.class_names = class_names
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def label(self, index: int) -> int:
        return self.items[index].label

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.items[index].path)


def folder_source(root: str) -> ImageSource:
    """ImageNet layout: one subfolder per class; classes and files sorted so every job agrees."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_names:
        raise ValueError(f"{root}: no class subfolders (expected ROOT/<class>/<image>)")
    items = []
    for label, name in enumerate(class_names):
        for directory, subdirs, files in os.walk(os.path.join(root, name)):
            subdirs.sort()
            for file_name in sorted(files):
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    items.append(ImageItem(os.path.join(directory, file_name), label))
    if not items:
        raise ValueError(f"{root}: class subfolders hold no images with extensions {IMAGE_EXTENSIONS}")
    return ImageSource(items, class_names, {"kind": "folder", "path": os.path.abspath(root)})


def file_list_source(list_path: str, base_dir: str | None = None) -> ImageSource:
    """Lines of ``path<TAB>label``; relative paths resolve against ``base_dir`` or the list's folder."""
    base = base_dir or os.path.dirname(os.path.abspath(list_path))
    items = []
    with open(list_path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            path, tab, label = line.rpartition("\t")
            if not tab or not label.strip().isdigit():
                raise ValueError(f"{list_path}:{number}: expected 'path<TAB>label', got {line!r}")
            items.append(ImageItem(path if os.path.isabs(path) else os.path.join(base, path), int(label)))
    if not items:
        raise ValueError(f"{list_path}: no entries")
    num_classes = max(item.label for item in items) + 1
    return ImageSource(items, [str(i) for i in range(num_classes)], {"kind": "file_list", "path": os.path.abspath(list_path)})
