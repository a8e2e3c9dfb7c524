"""Loader throughput: LatentLoader vs a plain WebDataset reader on the same fp16 latent shards.

    python benchmarks/bench_loader.py [--seconds 4] [--out benchmarks/results/loader.json]

Shards are written to a temporary folder (random fp16 latents: throughput does not depend on the
values). Every configuration reads the resampled stream for ``--seconds`` after a warm-up; the
figures include tar parsing, npy header checks, label checks, NaN checks, shuffling and batching
into float32 tensors. MB/s counts latent payload bytes (fp16) delivered.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.loader import LatentLoader  # noqa: E402
from data_pipeline.manifest import MANIFEST_NAME, new_manifest, write_manifest  # noqa: E402
from data_pipeline.shard_writer import ShardWriter  # noqa: E402

SPEC = {"type": "diffusers", "name_or_path": "benchmark", "scaling_factor": 1.0, "shift_factor": 0.0}


def write_shards(directory: str, shape: tuple[int, int, int], num_shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    entries = []
    for s in range(num_shards):
        name = f"latents-{s:06d}.tar"
        with ShardWriter(os.path.join(directory, name)) as writer:
            latents = rng.standard_normal((per_shard, *shape), dtype=np.float32).astype(np.float16)
            for i in range(per_shard):
                writer.write(f"{s * per_shard + i:09d}", latents[i], i % 1000)
        entries.append((name, per_shard))
    write_manifest(os.path.join(directory, MANIFEST_NAME),
                   new_manifest(shards=entries, latent_shape=shape, latent_dtype="float16", vae=SPEC, num_classes=1000))
    return directory


def measure(batches, batch_size: int, seconds: float, warmup: int = 3) -> tuple[float, int]:
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        latents, labels = next(iterator)
        count += len(labels)
    return count / (time.perf_counter() - started), count


def plain_webdataset(directory: str, batch_size: int, num_workers: int):
    """The reference reader: wds.WebDataset + np.load(allow_pickle=False) + wds batching."""
    import webdataset as wds

    def decode(sample):
        return np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False), int(sample["cls"])

    def collate(samples):
        latents, labels = zip(*samples)
        return torch.from_numpy(np.stack(latents).astype(np.float32)), torch.tensor(labels)

    dataset = (wds.WebDataset(os.path.join(directory, "latents-{000000..000007}.tar"), resampled=True, shardshuffle=False,
                              nodesplitter=wds.split_by_node)
               .shuffle(1000).map(decode).batched(batch_size, collation_fn=collate))
    if num_workers == 0:
        return dataset
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "loader.json"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for side, per_shard in ((32, 1000), (64, 400)):
            shape = (4, side, side)
            directory = write_shards(os.path.join(tmp, str(side)), shape, num_shards=8, per_shard=per_shard)
            sample_mb = np.prod(shape) * 2 / 1e6
            for reader in ("LatentLoader", "webdataset"):
                for workers in (0, 2):
                    if reader == "LatentLoader":
                        batches = LatentLoader(directory, batch_size=args.batch_size, num_workers=workers, seed=0,
                                               shuffle_buffer=1000)
                    else:
                        batches = plain_webdataset(directory, args.batch_size, workers)
                    rate, count = measure(batches, args.batch_size, args.seconds)
                    row = {"reader": reader, "latent_shape": list(shape), "dtype": "float16", "num_workers": workers,
                           "batch_size": args.batch_size, "samples_per_sec": round(rate, 1),
                           "mb_per_sec": round(rate * sample_mb, 1), "samples_timed": count}
                    results.append(row)
                    print(f"{reader:13s} {side:3d}x{side:<3d}x4 fp16 workers={workers}: "
                          f"{rate:9.0f} samples/s {rate * sample_mb:7.1f} MB/s", flush=True)
    report = {
        "command": "python benchmarks/bench_loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "note": "resampled streams, shuffle_buffer 1000, includes tar parsing, validation and float32 batching",
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
