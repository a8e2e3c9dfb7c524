"""``python -m trainer.evaluate RUN_DIR|CHECKPOINT --per-class N [...]``: sample batch for FID/IS, and FID/IS.

Runs as one process or on several ranks (``torchrun --nproc_per_node K -m trainer.evaluate ...``, or srun):
sample i (class i // per_class) is drawn from its own noise, seeded by (seed, i), and rank r draws the
samples i with i % world == r, so the batch does not depend on how many ranks made it. EMA weights,
classifier-free guidance scale, sampler and steps as chosen. Rank 0 gathers the parts and writes

    OUT/samples_<N>x<H>x<W>x3.npz     arr_0: uint8 (N, H, W, 3) images, arr_1: int64 labels

which is the sample-batch format of the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py)
used by facebookresearch/DiT. With ``--inception PATH`` (a local TorchScript Inception; nothing is
downloaded, see trainer/monitor/fid.py) and ``--ref REF.npz`` (an ADM reference batch: mu/sigma or arr_0) it also
computes FID (and IS when the network gives class probabilities) and appends a record to
``RUN_DIR/evals.jsonl``, which ``trainer.status`` shows and the training run's W&B sink forwards as
``eval/fid`` (axis ``eval/step``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from trainer.monitor.sampling import noise_for, sample_batch, sample_indices
from trainer.rundir import evals_path


def _dist_setup():
    """(rank, world, device). The device is chosen (and set) before the process group starts, as NCCL binds
    the current device at its first collective; the same mapping as training (trainer/engine/device.py)."""
    import torch.distributed as dist

    from trainer.engine.device import pick_device

    device = pick_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def compute_metrics(images: np.ndarray, inception: str, ref: str | None, device="cpu",
                    extractor_name: str | None = None) -> dict:
    """The Fréchet distance to ``ref`` under the feature extractor, named ``fid`` only for Inception-v3 pool3 features
    (else ``fd_<extractor>``), and the extractor that produced it (``feature_extractor``: name, file, dim, sha256).
    Errors inside the extractor propagate."""
    from trainer.monitor.fid import frechet_distance, gaussian_statistics, inception_score, load_feature_extractor, \
        reference_statistics

    extractor = load_feature_extractor(inception, device, extractor_name)
    feats, probs = extractor(images)
    out = {}
    if ref:
        mu_r, sigma_r = reference_statistics(ref, extractor)
        if np.shape(mu_r)[-1] != feats.shape[1]:
            raise ValueError(f"{ref}: reference statistics are {np.shape(mu_r)[-1]}-d, the extractor "
                             f"{extractor.name} gives {feats.shape[1]}-d features")
        mu, sigma = gaussian_statistics(feats)
        out[extractor.metric_name()] = frechet_distance(mu, sigma, mu_r, sigma_r)
    if probs is not None and extractor.is_inception:
        out["inception_score"], out["inception_score_std"] = inception_score(probs)
    out["feature_extractor"] = extractor.describe()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Sample an ADM-format .npz batch from a DiT checkpoint (all ranks) "
                                            "and compute FID/IS with a local Inception network.")
    p.add_argument("checkpoint", help="run dir (newest checkpoint), checkpoints dir, or one checkpoint dir")
    p.add_argument("--per-class", type=int, default=50, help="images per class (ADM: 50,000 in total)")
    p.add_argument("--classes", type=int, nargs="*", default=None, help="default: every class")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the run's sample.cfg_scale")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--method", default=None, choices=["ddim", "ddpm", "euler", "heun"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the last stage's)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval/<checkpoint tag>)")
    p.add_argument("--inception", default=None, help="local TorchScript Inception file (enables FID/IS)")
    p.add_argument("--extractor-name", default=None, help="name of the --inception network (default: its file name; "
                   "the distance is called fid only for Inception-v3 pool3 2048-d features, else fd_<name>)")
    p.add_argument("--ref", default=None, help="ADM reference batch .npz (mu/sigma, or arr_0 images) for FID")
    p.add_argument("--no-record", action="store_true", help="do not append to RUN_DIR/evals.jsonl")
    args = p.parse_args(argv)

    from trainer.state.checkpoint import read_trainer_state
    from trainer.config.schema import ConfigError
    from trainer.state.consolidate import load_ema_model, open_run_checkpoint
    from trainer.engine.objective import build_objective_from_config

    rank, world, device = _dist_setup()
    try:
        ck, run_dir, cfg, shards = open_run_checkpoint(args.checkpoint, args.resolution)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    step = read_trainer_state(ck).step
    model, arch = load_ema_model(ck, input_size=shards.latent_shape[1], device=device)
    objective = build_objective_from_config(cfg, arch.learn_sigma)
    from data_pipeline.vae import load_vae_from_manifest

    vae = load_vae_from_manifest(shards.directory, device=device)  # decodes on this rank's device
    s = cfg.sample
    cfg_scale = s.cfg_scale if args.cfg_scale is None else args.cfg_scale
    steps, method = args.steps or s.steps, args.method or s.method
    classes = args.classes if args.classes is not None else list(range(arch.num_classes))
    total = len(classes) * args.per_class
    out_dir = args.out or os.path.join(run_dir, "eval", os.path.basename(ck))
    os.makedirs(out_dir, exist_ok=True)

    mine = sample_indices(total, rank, world)
    images, t0 = [], time.time()
    for b in range(0, len(mine), args.batch_size):
        idx = mine[b:b + args.batch_size]
        labels = torch.tensor([classes[i // args.per_class] for i in idx])
        images.append(sample_batch(model, objective, vae, labels, noise_for(idx, shards.latent_shape, args.seed),
                                   cfg_scale=cfg_scale, steps=steps, method=method,
                                   num_classes=arch.num_classes, device=device))
    part = os.path.join(out_dir, f".part-rank{rank:05d}.npz")
    h, w = shards.latent_shape[1:] if not images else images[0].shape[1:3]
    np.savez(part, images=np.concatenate(images) if images else np.zeros((0, h, w, 3), np.uint8),
             index=np.array(mine, dtype=np.int64))
    _barrier()
    if rank == 0:
        arr = None
        for r in range(world):
            path = os.path.join(out_dir, f".part-rank{r:05d}.npz")
            with np.load(path) as d:
                if arr is None:
                    arr = np.zeros((total, *d["images"].shape[1:]), np.uint8)
                arr[d["index"]] = d["images"]
            os.remove(path)
        labels = np.array([classes[i // args.per_class] for i in range(total)], dtype=np.int64)
        n, hh, ww, _ = arr.shape
        npz = os.path.join(out_dir, f"samples_{n}x{hh}x{ww}x3.npz")
        np.savez(npz, arr_0=arr, arr_1=labels)
        record = {"step": step, "checkpoint": os.path.basename(ck), "num_samples": n, "cfg_scale": cfg_scale,
                  "sampler": method, "sampling_steps": steps, "seed": args.seed, "world_size": world,
                  "npz": os.path.abspath(npz), "seconds": time.time() - t0, "time": time.time()}
        if args.inception:
            record.update(compute_metrics(arr, args.inception, args.ref, device, args.extractor_name))
        if not args.no_record:
            with open(evals_path(run_dir), "a") as f:
                f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "time"}))
    _barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
