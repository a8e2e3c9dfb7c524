"""Build (or check) the member-offset indexes of a shard set: ``python -m data_pipeline.index_shards DIR``.

Shards written by this project's encoder are indexed already; this is for shard sets from
elsewhere or from before indexes existed, so that N training processes do not all scan the same
files at start-up: run it once (or as ``--part i --num-parts n`` slices in parallel) beforehand.
Prints one line per shard with usable / manifest counts; exits 1 if any shard is missing, cut
short or holds unusable samples.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .manifest import load_manifest
from .shard_index import build_shard_set_indexes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.index_shards", description=__doc__.splitlines()[0])
    parser.add_argument("shard_set", help="shard-set folder or its manifest.json")
    parser.add_argument("--part", type=int, default=0, help="index only shards part, part+num_parts, ...")
    parser.add_argument("--num-parts", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest, directory = load_manifest(args.shard_set)
    expected = {os.path.join(directory, entry["name"]): int(entry["num_samples"]) for entry in manifest["shards"]}
    bad = 0
    for url, index in build_shard_set_indexes(args.shard_set, part=args.part, num_parts=args.num_parts).items():
        want = expected[url]
        if index is None:
            bad += 1
            print(f"{url}: MISSING (manifest: {want} samples)")
            continue
        mask, _ = index.usable(manifest["latent_shape"], (manifest["latent_dtype"],), manifest.get("num_classes") or None)
        usable = int(mask.sum())
        state = "ok" if index.complete else f"BROKEN ({index.error})"
        bad += (not index.complete) or usable < want
        print(f"{url}: {usable} usable of {want} in the manifest ({index.num_entries} present), {state}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
